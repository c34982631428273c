"""Four-way validation: each planted fault is caught by the right gate, and nothing is published."""

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edgeq.calibration.readers import CalibrationReader
from edgeq.calibration.versions import record_decision
from edgeq.core.data import load_split
from edgeq.core.errors import GateError, SpecError
from edgeq.core.modeling import build_model
from edgeq.core.onnx_graph import output_step
from edgeq.core.platform import x86_without_vnni
from edgeq.core.specs import TargetSpec, Thresholds
from edgeq.core.store import ArtifactStore
from edgeq.publish import publish_bundle
from edgeq.quantization.ptq import PTQSettings, quantize
from edgeq.tasks.calibration import build_calibration_candidate
from edgeq.tasks.config import load_prepared
from edgeq.tasks.export import export_to_store
from edgeq.tasks.validate import validate_to_store
from edgeq.validation import format_table, validate_four_way
from tests.conftest import write_config
from tests.reliability.rel_helpers import snapshot

DEVICE = Path(__file__).with_name("noisy_device.py")


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
            "folder": folder, "config_path": path}


def _validate(s, fp32=None, int8=None, cfg=None):
    return validate_four_way(cfg or s["cfg"], s["model"], fp32 or s["fp32"], int8 or s["int8"], s["test"], s["calib"],
                             s["version"].version, s["exported"].report.opset)


def test_happy_path_passes_every_gate_and_publishes_a_complete_bundle(setup):
    rep = _validate(setup)
    assert rep.passed, rep.gates
    assert [r.stage for r in rep.stages] == ["PyTorch FP32", "ONNX FP32", "ONNX INT8", "device INT8"]
    assert all(r.samples == 297 and 0.9 < r.metric <= 1 and r.ci95 > 0 for r in rep.stages)
    assert rep.gates[0].max_abs_diff <= 1e-5
    device = rep.gates[2]  # OpenVINO against ONNX Runtime: a rounding step apart, well within 3 output steps
    assert device.max_abs_diff <= device.tolerance and device.confident_top1_agreement >= 0.99
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


def _perturbed_fp32(setup, delta: float) -> tuple[Path, str]:
    """The exported FP32 ONNX file with one weight of its first conv moved by `delta`; the file and the conv's name."""
    model = onnx.load(str(setup["fp32"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1)
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[0] += delta
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bad = setup["folder"] / f"perturbed-{delta:g}.onnx"
    onnx.save(model, str(bad))
    return bad, conv.name


def test_a_small_real_perturbation_fails_export_parity_at_the_default_tolerance(setup):
    from edgeq.core.ort import ort_session
    from edgeq.export import check_parity

    th = setup["cfg"].thresholds
    assert (th.export_atol, th.export_rtol) == (Thresholds().export_atol, Thresholds().export_rtol) == (1e-5, 1e-5)
    x = setup["test"][0][:32]
    # one weight of 144 in the first conv off by a ten-thousandth: the tolerance's relative part (1e-5 x the largest
    # |logit|) does not hide it
    small, _ = _perturbed_fp32(setup, 1e-4)
    rows = check_parity(setup["model"], setup["cfg"].model, ort_session(small), x, th)
    assert [r.passed for r in rows] == [False] and rows[0].max_abs_diff > rows[0].tolerance > 1e-5, rows
    bad, conv = _perturbed_fp32(setup, 1e-3)  # off by a thousandth
    rows = check_parity(setup["model"], setup["cfg"].model, ort_session(bad), x, th)
    assert [r.passed for r in rows] == [False] and rows[0].max_abs_diff > 1e-5
    rep = _validate(setup, fp32=bad)  # the four-way gate on the same file, which also names the node
    g = rep.gates[0]
    assert not rep.passed and not g.passed and g.gate == "export parity"
    assert g.where and g.where[0]["node"] == conv, g.where
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


@pytest.mark.parametrize("form", ["float32-preprocessed", "nhwc"])
def test_test_split_stored_otherwise_overlapping_calibration_is_refused(setup, tmp_path, demo_root, form):
    """Five calibration captures hidden in a test split stored scaled as float32, or channels-last, are found."""
    with np.load(demo_root / "test.npz") as z, np.load(demo_root / "pool.npz") as p:
        x, y = np.concatenate([z["x"], p["x"][:5]]), np.concatenate([z["y"], p["y"][:5]])
    test = {"kind": "arrays", "path": str(tmp_path / "test.npz")}
    if form == "float32-preprocessed":
        x = (x / 255.0).astype(np.float32)
        test["preprocessed"] = True
    else:
        x = x.transpose(0, 2, 3, 1)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    path = write_config(tmp_path, demo_root)
    data = yaml.safe_load(path.read_text())
    data["store"] = setup["cfg"].store
    data["data"]["test"] = test
    path.write_text(yaml.safe_dump(data))
    store = setup["store"]
    int8 = store.put_file(setup["int8"])
    bundles = Path(store.root) / "bundles"
    before = sorted(bundles.glob("*")) if bundles.exists() else []
    with pytest.raises(GateError, match=rf"the test split shares 5 of 302 samples with calibration version "
                                        rf"{setup['version'].version} \(the same model input after data.preprocess\)"):
        validate_to_store(load_prepared(path), setup["exported"].onnx, int8, setup["version"].version, 18)
    assert (sorted(bundles.glob("*")) if bundles.exists() else []) == before


def test_a_gate_failed_on_the_real_convert_path_publishes_nothing(prefect_server, setup, tmp_path):
    """The whole pipeline through Prefect until the device gate fails (OpenVINO is a rounding step off ONNX Runtime
    where the activations run in float between a DequantizeLinear and a QuantizeLinear, here allowed half a step):
    no bundle folder, no bundle manifest, nothing in the store changed."""
    from edgeq.flows.convert import ConvertParams, convert_model

    store = tmp_path / "store"  # the approved calibration version and the export, without the other tests' bundles
    shutil.copytree(setup["store"].root, store, ignore=shutil.ignore_patterns("bundles"))
    data = yaml.safe_load(setup["config_path"].read_text())
    # Relu/Clip kept FP32: folded into the convs (the default), both runtimes round alike and agree exactly here
    data.update(store=str(store), quantization={"mode": "ptq", "latency_iters": 10,
                                                "keep_fp32_op_types": ["Relu", "Clip"]})
    data["thresholds"]["device_quant_steps"] = 0.5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    before = snapshot(store)
    state = convert_model(ConvertParams(config=str(path), calibration=setup["version"].version), return_state=True)
    assert state.is_failed()
    with pytest.raises(GateError, match=r"do not ship: device agreement failed at ONNX INT8 -> device INT8 "
                                        r"\(openvino-cpu\): max abs diff"):
        state.result()
    assert not (store / "bundles").exists()
    after = snapshot(store)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed
    added = [k for k in after if k not in before]
    assert all(k.startswith("objects/") for k in added), added  # only the stages' content-addressed outputs
    assert not any(k.endswith("/manifest.json") for k in added), added  # no bundle was assembled


def _with_device(setup, *args: str, **thresholds):
    """The config with a `command` board as the device stage, running tests/noisy_device.py with `args`."""
    device = TargetSpec(name="board", backend="command", batch="dynamic", required=False,
                        command=[sys.executable, str(DEVICE), *args])
    cfg = setup["cfg"]
    return cfg.model_copy(update={"targets": [*cfg.targets, device],
                                  "validation": cfg.validation.model_copy(update={"device_target": "board"}),
                                  "thresholds": cfg.thresholds.model_copy(update=thresholds)})


def _int8_step(setup) -> float:
    return output_step(onnx.load(str(setup["int8"])), "logits").step


def test_the_device_tolerance_is_read_from_the_int8_graph(setup):
    model = onnx.load(str(setup["int8"]))
    dq = next(n for n in model.graph.node if "logits" in n.output)
    scale = next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == dq.input[1])
    step = output_step(model, "logits")
    assert dq.op_type == "DequantizeLinear" and step.step == pytest.approx(float(scale))
    assert f"DequantizeLinear {dq.name!r}" in step.source
    fp32 = output_step(onnx.load(str(setup["fp32"])), "logits")  # a float Gemm on float weights: no step
    assert fp32.step is None and "computed in float by Gemm" in fp32.source
    rep = _validate(setup)
    g = rep.gates[2]
    assert g.tolerance == pytest.approx(3 * step.step) and step.source in g.tolerance_source


def test_the_output_step_of_a_float_head_on_a_quantized_input_uses_its_float_weights():
    """A head whose weight the quantizer left in float (one computed in forward(), folded by the exporter into a
    Div of two constants): the step is the input's DequantizeLinear scale x the largest sum of |weights| over one
    output, as for INT8 weights. Without a quantized input there is still no step."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[1.0, -2.0, 0.5, 4.0], [3.0, 3.0, -3.0, 0.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
    inits = [numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.uint8(0), "zp"),
             numpy_helper.from_array(w * 4, "w_raw"), numpy_helper.from_array(np.float32(4.0), "four"),
             numpy_helper.from_array(np.zeros(3, np.float32), "bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("Div", ["w_raw", "four"], ["w"]),
             helper.make_node("Gemm", ["xd", "w", "bias"], ["logits"], transB=1, name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    step = output_step(model, "logits")
    assert step.step == pytest.approx(0.5 * 9.0)  # the second row: |3| + |3| + |-3| + |0|
    assert "Gemm 'head' computes the output in float from float weights" in step.source
    assert "(9)" in step.source

    nodes[1] = helper.make_node("Identity", ["x"], ["xd"])  # the input no longer quantized
    graph = helper.make_graph(nodes[1:], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    fp32 = output_step(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), "logits")
    assert fp32.step is None and "computed in float by Gemm 'head'" in fp32.source


def test_remote_device_runner_that_agrees_passes(setup):
    rep = _validate(setup, cfg=_with_device(setup))
    assert rep.device_target == "board" and rep.passed
    assert rep.gates[2].max_abs_diff == 0.0


def test_device_runner_adding_noise_fails_the_device_gate(setup):
    rep = _validate(setup, cfg=_with_device(setup, "--noise", "2.0"))
    assert [g.gate for g in rep.failed_gates()] == ["device agreement"]
    g = rep.gates[2]
    assert "board" in g.pair and "output steps" in g.measured and g.where and "worst_sample" in g.where[0]


def test_device_outputs_beyond_the_steps_fail_the_max_abs_clause_alone(setup):
    rep = _validate(setup, cfg=_with_device(setup, "--shift", str(5 * _int8_step(setup))))  # 5 steps, rankings kept
    assert [g.gate for g in rep.failed_gates()] == ["device agreement"]
    g = rep.gates[2]
    assert g.max_abs_diff > g.tolerance
    assert g.top1_agreement == 1.0 and g.confident_top1_agreement == 1.0
    assert g.where[0]["max_abs_within_tolerance"] is False and g.where[0]["confident_agreement_ok"] is True


def test_confident_samples_flipped_within_the_tolerance_fail_the_agreement_clause_alone(setup):
    # At 10 steps, enough test samples have a top-1 margin between 1x and 2x the tolerance: the device swaps their
    # best and runner-up, moving neither by more than the tolerance.
    tol = 10 * _int8_step(setup)
    cfg = _with_device(setup, "--flip-margins", str(1.05 * tol), str(1.9 * tol), device_quant_steps=10.0)
    rep = _validate(setup, cfg=cfg)
    assert [g.gate for g in rep.failed_gates()] == ["device agreement"]
    g = rep.gates[2]
    assert 0 < g.max_abs_diff <= g.tolerance == pytest.approx(tol)
    assert g.confident_top1_agreement < 0.99 and "confident samples" in g.measured
    assert g.where[0]["max_abs_within_tolerance"] is True and g.where[0]["confident_agreement_ok"] is False


def test_a_device_output_of_another_shape_is_refused_not_broadcast(setup):
    with pytest.raises(GateError, match=r"device agreement refused on target 'board': output 'logits': ONNX INT8 "
                                        r"shape \(297, 10\) != device INT8 shape \(1, 10\); .*never broadcast"):
        _validate(setup, cfg=_with_device(setup, "--first-row-only"))


def test_an_onnx_runtime_cpu_device_is_no_independent_check(setup):
    cfg = setup["cfg"]
    on_ort = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"device_target": "ort-cpu"})})
    before = snapshot(Path(setup["store"].root))
    with pytest.raises(SpecError, match=r"validation.device_target: device target 'ort-cpu' runs the INT8 model on "
                                        r"the runtime and device of the ONNX INT8 row .*no independent device check "
                                        r"would run.*require_independent_device: false"):
        validate_to_store(on_ort, setup["exported"].onnx, setup["exported"].onnx, setup["version"].version,
                          setup["exported"].report.opset)
    assert snapshot(Path(setup["store"].root)) == before  # refused before any work

    accepted = on_ort.model_copy(update={"validation": on_ort.validation.model_copy(
        update={"require_independent_device": False})})
    rep = _validate(setup, cfg=accepted)
    g = rep.gates[2]
    assert not g.ran and not g.passed and g.waived and g.result.startswith("NOT RUN")
    assert rep.passed  # the config accepted shipping without an independent device check...
    table = format_table(rep)
    assert "[NOT RUN, waived by the config] device agreement" in table and "no independent device check ran" in table
    unaccepted = rep.model_copy(update={"gates": [*rep.gates[:2], g.model_copy(update={"waived": False})]})
    assert not unaccepted.passed and unaccepted.failed_gates() == [unaccepted.gates[2]]  # ...which is never a pass
