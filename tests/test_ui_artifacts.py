"""How results read in the Prefect UI: table cells and markdown (tasks/artifacts.py)."""

from __future__ import annotations

import numpy as np

from edgeq.tasks.artifacts import CELL_CHARS, MISSING, display_rows, markdown_table, short_text


def test_table_cells_are_rounded_numbers_and_missing_values_read_as_such():
    rows = display_rows([{"metric": 0.9696969696969697, "ms": np.float32(0.054432), "n": np.int64(297),
                          "drop": -0.003367003367003367, "ok": True, "latency": None, "ops": "-", "note": "fine"}])
    assert rows == [{"metric": 0.9697, "ms": 0.05443, "n": 297, "drop": -0.003367, "ok": True, "latency": MISSING,
                     "ops": MISSING, "note": "fine"}]
    assert isinstance(rows[0]["metric"], float)  # still a number: the UI's columns sort numerically


def test_markdown_cells_never_hold_a_bare_dash_and_long_reasons_are_cut_to_fit():
    lines = markdown_table([{"target": "t", "latency": None, "unsupported": "-", "pipe": "a|b", "ok": False}])
    assert lines[2] == f"| t | {MISSING} | {MISSING} | a\\|b | no |"
    reason = "the tensorrt package is not installed (pip install 'edgeq[tensorrt]'); no NVIDIA GPU on this machine"
    short = short_text(reason)
    assert len(short) <= CELL_CHARS and short.endswith("…") and reason.startswith(short[:-2])
    assert short_text(None) == MISSING and short_text("ok") == "ok"


def test_quantization_progress_follows_the_ladders_attempts_and_qat_epochs(monkeypatch, demo_cfg):
    """The stage's log lines drive two progress bars; every line still reaches the log."""
    import edgeq.tasks.quantize as tq

    bars: dict[str, list[tuple[float, str | None]]] = {}

    class Bar:
        def __init__(self, key, description, min_interval_s=1.0):
            self.key = key
            bars[key] = []

        def update(self, percent, description=None, force=False):
            bars[self.key].append((percent, description))

    monkeypatch.setattr(tq, "UIProgress", Bar)
    cfg = demo_cfg.model_copy(update={"quantization": demo_cfg.quantization.model_copy(
        update={"mode": "auto", "sla": "flexible", "max_sensitive_fp32": 3, "qat_epochs": 2})})
    logged: list[str] = []
    progress = tq.QuantizeProgress(cfg, logged.append)
    assert progress.most == 1 + 2 + 1 + 3 + 1 + 1  # base, other methods, other engine, FP32 layers, speed remedy, QAT
    lines = ["attempt 0 ptq minmax: top1=0.9 drop=0.05 meets SLA=False ",
             f"QAT epoch {dict(epoch=1, loss=0.4, train_top1=0.9, seconds=1.0)}",
             f"QAT epoch {dict(epoch=2, loss=0.3, train_top1=0.9, seconds=1.0)}",
             "attempt 1 QAT 2 epochs lr 1e-05: top1=0.96 drop=0.0 meets SLA=True "]
    for line in lines:
        progress(line)
    progress.finish("chose attempt 1")
    assert logged == lines
    assert [p for p, _ in bars["qat-progress"]] == [50.0, 100.0]
    assert [round(p, 1) for p, _ in bars["quantization-progress"]] == [11.1, 22.2, 100.0]  # 1 and 2 of 9
    assert bars["quantization-progress"][-1][1] == "2 attempt(s): chose attempt 1"
