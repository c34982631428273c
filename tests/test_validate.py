"""Four-way validation: each planted fault is caught by the right gate, and nothing is published."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edgeq.calibration.readers import CalibrationReader
from edgeq.calibration.versions import record_decision
from edgeq.core.data import load_split
from edgeq.core.errors import GateError
from edgeq.core.modeling import build_model
from edgeq.core.platform import x86_without_vnni
from edgeq.core.store import ArtifactStore
from edgeq.publish import publish_bundle, read_manifest
from edgeq.quantization.ptq import PTQSettings, quantize
from edgeq.tasks.calibration import build_calibration_candidate
from edgeq.tasks.config import load_prepared
from edgeq.tasks.export import export_to_store
from edgeq.tasks.validate import validate_to_store
from edgeq.validation import validate_four_way
from tests.conftest import write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_root):
    folder = tmp_path_factory.mktemp("validate")
    path = write_config(folder, demo_root)
    data = yaml.safe_load(path.read_text())
    data["validation"] = {"latency_iters": 10}
    path.write_text(yaml.safe_dump(data))
    cfg = load_prepared(path)
    store = ArtifactStore(cfg.store_url)
    exported = export_to_store(cfg)
    version = build_calibration_candidate(cfg).version
    record_decision(store, version.version, approve=True, reviewer="test-reviewer")
    fp32 = store.local_path(exported.onnx)
    calib = np.load(store.local_path(version.artifacts["samples"]))
    int8 = folder / "int8.onnx"
    quantize(fp32, int8, CalibrationReader({"image": calib}), PTQSettings.from_spec(reduce_range=x86_without_vnni()))
    return {"cfg": cfg, "store": store, "exported": exported, "version": version, "fp32": fp32, "int8": int8,
            "calib": calib, "model": build_model(cfg.model), "test": load_split(cfg.data.test, cfg.data.preprocess),
            "folder": folder}


def _validate(s, fp32=None, int8=None, cfg=None):
    return validate_four_way(cfg or s["cfg"], s["model"], fp32 or s["fp32"], int8 or s["int8"], s["test"], s["calib"],
                             s["version"].version, s["exported"].report.opset)


def test_happy_path_passes_every_gate_and_publishes_a_complete_bundle(setup):
    rep = _validate(setup)
    assert rep.passed, rep.gates
    assert [r.stage for r in rep.stages] == ["PyTorch FP32", "ONNX FP32", "ONNX INT8", "device INT8"]
    assert all(r.samples == 297 and 0.9 < r.metric <= 1 and r.ci95 > 0 for r in rep.stages)
    assert rep.gates[0].max_abs_diff <= 1e-5
    lineage = {"model": {"name": "digits-cnn"}, "calibration": {"version": setup["version"].version,
                                                                "reviewer": "test-reviewer"}}
    m = publish_bundle(setup["cfg"], setup["int8"], lineage, {"four_way": rep.model_dump(mode="json")}, rep.passed)
    again = publish_bundle(setup["cfg"], setup["int8"], lineage, {"four_way": rep.model_dump(mode="json")}, rep.passed)
    assert again["bundle_id"] == m["bundle_id"] and again["published_at"] == m["published_at"]
    for key in ("bundle_id", "files", "target_forms", "toolchain", "cpu", "published_at", "calibration", "four_way"):
        assert key in m, key
    assert set(m["toolchain"]) >= {"torch", "onnx", "onnxruntime", "openvino", "nncf", "prefect"}
    assert "digits-cnn-int8.onnx" in m["files"]
    assert any(f.endswith(".xml") for f in m["target_forms"]["openvino-cpu"])
    bundle = Path(setup["store"].root) / "bundles" / m["bundle_id"]
    assert (bundle / "manifest.json").is_file() and (bundle / "digits-cnn-int8.onnx").is_file()


def test_perturbed_weight_after_export_fails_parity_and_names_the_node(setup):
    model = onnx.load(str(setup["fp32"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1)
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bad = setup["folder"] / "perturbed.onnx"
    onnx.save(model, str(bad))
    rep = _validate(setup, fp32=bad)
    g = rep.gates[0]
    assert not rep.passed and not g.passed and g.gate == "export parity"
    assert g.where and g.where[0]["node"] == conv.name, g.where
    assert g.where[0]["max_abs_diff"] > 1e-5


def test_calibration_on_one_repeated_blank_frame_fails_the_int8_gate(setup):
    blank = np.repeat(np.zeros_like(setup["calib"][:1]), 256, axis=0)
    bad = setup["folder"] / "int8-blank.onnx"
    quantize(setup["fp32"], bad, CalibrationReader({"image": blank}),
             PTQSettings.from_spec(reduce_range=x86_without_vnni()))
    rep = _validate(setup, int8=bad)
    g = rep.gates[1]
    assert [x.gate for x in rep.failed_gates()][0] == "INT8 accuracy SLA"
    assert "drop" in g.measured and float(g.measured.split("drop ")[1].split(",")[0]) > 0.01
    assert g.where and "node" in g.where[0] and "qdq_sqnr_db" in g.where[0]  # the sensitivity table


def test_test_split_overlapping_calibration_is_refused(setup, tmp_path, demo_root):
    path = write_config(tmp_path, demo_root)
    data = yaml.safe_load(path.read_text())
    data["store"] = setup["cfg"].store
    data["data"]["test"] = {"kind": "arrays", "path": str(demo_root / "pool.npz")}
    path.write_text(yaml.safe_dump(data))
    cfg = load_prepared(path)
    store = setup["store"]
    int8 = store.put_file(setup["int8"])
    bundles_before = sorted((Path(store.root) / "bundles").glob("*")) if (Path(store.root) / "bundles").exists() else []
    with pytest.raises(GateError, match=rf"the test split shares \d+ of 434 samples with calibration version {setup['version'].version}"):
        validate_to_store(cfg, setup["exported"].onnx, int8, setup["version"].version, 18)
    after = sorted((Path(store.root) / "bundles").glob("*")) if (Path(store.root) / "bundles").exists() else []
    assert after == bundles_before


def test_publish_refuses_when_a_gate_failed(setup):
    with pytest.raises(GateError, match="do not ship"):
        publish_bundle(setup["cfg"], setup["int8"], {"model": {"name": "x"}}, {}, gates_passed=False)
    assert read_manifest(setup["store"], "bundle-none") is None


def _with_device(setup, tmp_path, noise: float):
    import sys

    from edgeq.core.specs import TargetSpec

    device = TargetSpec(name="board", backend="command", batch="dynamic", required=False,
                        command=[sys.executable, str(Path(__file__).with_name("noisy_device.py")), "--noise", str(noise)])
    cfg = setup["cfg"]
    return cfg.model_copy(update={"targets": [*cfg.targets, device],
                                  "validation": cfg.validation.model_copy(update={"device_target": "board"})})


def test_remote_device_runner_that_agrees_passes(setup, tmp_path):
    rep = _validate(setup, cfg=_with_device(setup, tmp_path, noise=0.0))
    assert rep.device_target == "board" and rep.passed
    assert rep.gates[2].max_abs_diff == 0.0


def test_device_runner_adding_noise_fails_the_device_gate(setup, tmp_path):
    rep = _validate(setup, cfg=_with_device(setup, tmp_path, noise=2.0))
    assert [g.gate for g in rep.failed_gates()] == ["device agreement"]
    g = rep.gates[2]
    assert "board" in g.pair and "output steps" in g.measured and g.where and "worst_sample" in g.where[0]
