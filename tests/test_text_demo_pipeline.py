"""The text demo end to end as a user runs it: `edgeq demo text-demo.yaml` builds the calibration set from the
tokenised captures, approves it as the demo reviewer and converts — export, compile check, quantize, four-way
validation, publish — on a transformer encoder with two int64 inputs and a dynamic sequence axis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from edgeq.cli import app
from tests.conftest import write_text_config


def test_text_demo_calibrates_converts_and_publishes(prefect_server, text_demo_root, tmp_path, capfd):
    from edgeq.calibration.versions import load_version
    from edgeq.core.store import ArtifactStore

    cfg = write_text_config(tmp_path, text_demo_root, quantization={"latency_iters": 10},
                            validation={"latency_iters": 10})
    capfd.readouterr()
    res = CliRunner().invoke(app, ["demo", str(cfg)])
    assert res.exit_code == 0, res.output
    assert res.output.count("[PASS]") == 3, res.output
    # NNCF's per-node INFO notes ("Not adding activation input quantizer ...") stay off the user's console
    console = res.output + "".join(capfd.readouterr())
    assert "INFO:nncf" not in console and "Not adding activation input quantizer" not in console
    store = Path(yaml.safe_load(cfg.read_text())["store"])
    (bundle,) = list((store / "bundles").iterdir())
    manifest = json.loads((bundle / "manifest.json").read_text())

    # Calibration: every distinct real sentence of the pool is usable, exactly the planted faults are removed.
    meta = pd.read_csv(text_demo_root / "captures" / "metadata.csv")
    planted = meta["simulated_origin"].value_counts().to_dict()
    version = load_version(ArtifactStore(store), manifest["calibration"]["version"])
    assert version.excluded == {"duplicate": planted["duplicate"], "in-train": planted["train-copy"],
                                "in-test": planted["test-copy"], "augmented-flag": int(meta["augmented"].sum())}, \
        (version.excluded, planted)
    assert version.usable == planted["pool"] and version.size == min(512, planted["pool"])
    assert [(i.name, i.dtype) for i in version.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]

    # The four-way evidence: parity on real ids and masks, INT8 cosine and retrieval agreement on the test split.
    gates = {g["gate"]: g for g in manifest["four_way"]["gates"]}
    assert gates["export parity"]["max_abs_diff"] <= 1e-5
    stages = {s["stage"]: s for s in manifest["four_way"]["stages"]}
    assert stages["ONNX INT8"]["metric"] >= 0.999
    assert stages["ONNX INT8"]["extra_metrics"]["retrieval overlap@10"] >= 0.96
    assert stages["device INT8"]["metric"] >= 0.999
    assert "cosine" in gates["device agreement"]["threshold"] and gates["device agreement"]["passed"]
    # Both transformer-aware PTQ attempts ran and scored: NNCF's TRANSFORMER model loads in ONNX Runtime (its
    # Reshape/Transpose after a Q/DQ pair hoisted, edgeq.quantization.ptq.hoist_transposes_above_qdq).
    attempts = {a["attempt"].split(" (")[0]: a for a in manifest["quantization_attempts"]}
    for name in ("ort PTQ transformer", "nncf PTQ transformer"):
        assert not attempts[name]["error"] and attempts[name]["val cosine"] >= 0.999, attempts[name]
    int8 = bundle / "text-encoder-int8.onnx"
    assert int8.is_file() and manifest["files"]["text-encoder-int8.onnx"]

    # The published INT8 model takes any sequence length up to the stored 32 (the axis stayed dynamic).
    from edgeq.export import run_onnx

    with np.load(text_demo_root / "test.npz") as z:
        feeds = {k: z[k][:4, :20] for k in ("input_ids", "attention_mask")}
    out = run_onnx(int8, feeds, outputs=["embedding"])["embedding"]
    assert out.shape == (4, 64) and np.isfinite(out).all()
