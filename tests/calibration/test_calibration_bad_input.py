"""Bad input: a clear error naming what to change, nothing approved, no half-written version."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.calibration.cal_helpers import config_with_captures, load_cfg, records, tiny_pool, write_array_pool

STRATA = ["lighting", "camera"]


def _build(cfg, **kw):
    from edgeq.tasks.calibration import build_calibration_candidate

    return build_calibration_candidate(cfg, **kw)


def test_pool_below_minimum_fails_without_override(tmp_path, demo_root):
    from edgeq.core.errors import CalibrationError

    cap = tiny_pool(tmp_path, demo_root, 40)
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA))
    with pytest.raises(CalibrationError, match=r"only 40 usable captures .* below the minimum of 256.*--override-reason"):
        _build(cfg)
    assert records(cfg) == []


def test_override_with_reason_builds_and_records_it(tmp_path, demo_root):
    cap = tiny_pool(tmp_path, demo_root, 40)
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA,
                                        min_size_override="pilot line: only 40 captures so far"))
    v = _build(cfg).version
    assert v.size == 40 and v.status == "candidate"
    assert v.override_reason == "pilot line: only 40 captures so far"
    assert any("accepted by override (pilot line" in n for n in v.notes)
    assert [r.version for r in records(cfg)] == [v.version]


def test_strata_column_the_table_lacks(tmp_path, demo_root):
    from edgeq.core.errors import SpecError

    cap = tiny_pool(tmp_path, demo_root, 10)
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv",
                                        strata=["lighting", "product"]))
    with pytest.raises(SpecError, match=r"lacks strata column 'product' \(has \['capture_id', 'path'"):
        _build(cfg, override_reason="test")
    assert records(cfg) == []


def test_metadata_rows_pointing_to_missing_files(tmp_path, demo_root):
    from edgeq.core.errors import SpecError

    cap = tiny_pool(tmp_path, demo_root, 10)
    meta = pd.read_csv(cap / "metadata.csv")
    (cap / meta["path"][3]).unlink()
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA))
    with pytest.raises(SpecError, match=rf"1 row\(s\) point to files missing .*row 3 \({meta['path'][3]}\)"):
        _build(cfg, override_reason="test")
    assert records(cfg) == []


def test_corrupt_image_is_listed_and_never_used(tmp_path, demo_root):
    cap = tiny_pool(tmp_path, demo_root, 30)
    meta = pd.read_csv(cap / "metadata.csv")
    (cap / meta["path"][5]).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA))
    cand = _build(cfg, override_reason="small test pool")
    bad = meta["capture_id"][5]
    assert cand.version.excluded == {"unreadable": 1} and cand.version.size == 29
    assert f"| {bad} | unreadable | image " in cand.markdown and "cannot be decoded" in cand.markdown


def test_only_corrupt_images_is_an_error(tmp_path, demo_root):
    from edgeq.core.errors import CalibrationError

    cap = tiny_pool(tmp_path, demo_root, 3)
    for p in pd.read_csv(cap / "metadata.csv")["path"]:
        (cap / p).write_bytes(b"garbage")
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA))
    with pytest.raises(CalibrationError, match=r"none of the 3 captures .* is usable: .*cannot be decoded"):
        _build(cfg, override_reason="test")
    assert records(cfg) == []


def test_nan_and_inf_arrays_are_listed_and_skipped(tmp_path, demo_root):
    from edgeq.core.errors import CalibrationError

    x = np.load(demo_root / "pool.npz")["x"][:20].astype(np.float32)
    x[2, 0, 0, 0] = np.nan
    x[7, 0, 3, 3] = np.inf
    path, meta = write_array_pool(tmp_path / "arr", x, {"camera": ["cam-A", "cam-B"] * 10})
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=path, metadata=meta, strata=["camera"]))
    cand = _build(cfg, override_reason="array test")
    assert cand.version.excluded == {"non-finite": 2} and cand.version.size == 18
    assert "| a2 | non-finite | 1 NaN/Inf value(s) |" in cand.markdown

    path, meta = write_array_pool(tmp_path / "nan", np.full((4, 1, 8, 8), np.nan, np.float32))
    cfg = load_cfg(config_with_captures(tmp_path / "c2", demo_root, path=path, metadata=meta))
    with pytest.raises(CalibrationError, match=r"none of the 4 captures .* a0: 64 NaN/Inf value\(s\)"):
        _build(cfg, override_reason="test")
    assert records(cfg) == []


def test_pool_entirely_in_training_set(tmp_path, demo_root):
    from edgeq.core.errors import CalibrationError

    x = np.load(demo_root / "train.npz")["x"][:30]
    path, meta = write_array_pool(tmp_path / "arr", x)
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=path, metadata=meta))
    with pytest.raises(CalibrationError, match=r"all 30 usable captures .* already in the training set \(30\)"):
        _build(cfg, override_reason="test")
    assert records(cfg) == []


def _cli(*args):
    from typer.testing import CliRunner

    from edgeq.cli import app

    return CliRunner().invoke(app, list(args))


def test_review_of_unknown_version(tmp_path, demo_root):
    cap = tiny_pool(tmp_path, demo_root, 10)
    cfgp = config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA)
    res = _cli("calibration", "review", "cal-0000000000000000", "--approve", "--reviewer", "ann", "-c", str(cfgp))
    assert res.exit_code == 1
    assert "calibration version 'cal-0000000000000000' not found" in res.output


def test_approving_a_rejected_version_is_refused(tmp_path, demo_root):
    cap = tiny_pool(tmp_path, demo_root, 20)
    cfgp = config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv", strata=STRATA,
                                min_size_override="test")
    cfg = load_cfg(cfgp)
    vid = _build(cfg).version.version
    res = _cli("calibration", "review", vid, "--reject", "--reviewer", "ann", "--comment", "too dark", "-c", str(cfgp))
    assert res.exit_code == 0, res.output
    res = _cli("calibration", "review", vid, "--approve", "--reviewer", "bob", "-c", str(cfgp))
    assert res.exit_code == 1
    assert f"{vid} was already rejected by ann" in res.output and "a decision is final" in res.output
    [v] = records(cfg)
    assert v.status == "rejected" and v.decision.reviewer == "ann" and v.decision.comment == "too dark"
    res = _cli("calibration", "list", "-c", str(cfgp))
    assert vid in res.output and "rejected" in res.output and "ann" in res.output
