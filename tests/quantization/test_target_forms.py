"""quantization.target_forms: each target may get the INT8 model fastest on it, chosen by a side-by-side timing."""

import onnx

from edgeq.core.modeling import build_model
from edgeq.quantization.escalate import (
    REMEDY_MIN_GAIN,
    Attempt,
    fastest_form,
    run_quantization,
)
from tests.quantization.test_escalation import _ptq_setup


def _attempt(index: int, metric: float) -> Attempt:
    return Attempt(index=index, kind="ptq", label=f"attempt {index}", settings={}, metric=metric, meets_sla=True)


def test_the_fastest_form_wins_beyond_the_noise_and_ties_keep_the_shared_model_or_go_to_accuracy():
    shared, other, third = _attempt(0, 0.95), _attempt(1, 0.94), _attempt(2, 0.96)
    assert REMEDY_MIN_GAIN == 1.05
    # within 5 % of the fastest: the shared model stays (one model fewer to ship and validate)
    assert fastest_form([shared, other], {0: 1.04, 1: 1.0}, shared) is shared
    # more than 5 % faster: the other one
    assert fastest_form([shared, other], {0: 1.06, 1: 1.0}, shared) is other
    # two faster ones tied with each other: the more accurate of them, though not the fastest
    assert fastest_form([shared, other, third], {0: 2.0, 1: 1.0, 2: 1.03}, shared) is third
    # the shared model could not run on the target (no timing): the fastest that could
    assert fastest_form([shared, other, third], {1: 1.0, 2: 1.2}, shared) is other
    # nothing timed: the shared model
    assert fastest_form([shared, other], {}, shared) is shared


def test_fastest_tries_openvinos_own_quantizer_times_both_there_and_follows_the_rule(tmp_path, demo_root):
    """ort-cpu deploys (the ladder's choice: ONNX Runtime's PTQ); openvino-cpu may get NNCF's model, made with the
    same settings because the ladder stopped before it, and timed against the shared model on OpenVINO side by side.
    Which one OpenVINO gets depends on this CPU; what must hold is that the choice follows the rule from the
    recorded timings, and that a chosen form is written beside the shared model."""
    targets = [{"name": "ort-cpu", "backend": "onnxruntime"}, {"name": "openvino-cpu", "backend": "openvino"}]
    cfg, fp32, calib, val, opset = _ptq_setup(tmp_path, demo_root, targets, latency_iters=20)
    cfg = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"target_forms": "fastest"})})
    out = tmp_path / "out"
    rep = run_quantization(cfg, fp32, build_model(cfg.model), calib, "v-test", val, None, out, opset)
    chosen = rep.chosen_attempt
    assert chosen.settings["engine"] == "onnxruntime"
    (nncf,) = [a for a in rep.attempts if a.settings.get("engine") == "nncf"]
    assert nncf.notes[-1] == "made for openvino-cpu (openvino's own quantizer)"
    own = ("engine", "folded_activations")  # ONNX Runtime's quantizer folds Relu/Clip; NNCF places its own Q/DQ
    assert {k: v for k, v in nncf.settings.items() if k not in own} == {
        k: v for k, v in chosen.settings.items() if k not in own}  # the same settings, the other engine
    eligible = [a for a in rep.attempts if a.eligible]
    assert nncf in eligible, rep.attempts_table()
    ms = {a.index: a.latency_on("openvino-cpu").int8_ms for a in eligible}  # the side-by-side medians
    pick = fastest_form(eligible, ms, chosen)
    (line,) = [n for n in rep.forms_note.split("\n") if n.startswith("openvino-cpu:")]
    assert "side by side, 5 rounds" in line and f"attempt {nncf.index} " in line, line
    fp32_ms = nncf.latency_on("openvino-cpu").fp32_ms  # FP32 timed in the same rounds: is INT8 faster there?
    assert f"FP32 {fp32_ms:.3f} ms" in line and f"{fp32_ms / ms[pick.index]:.2f}x FP32's speed there" in line, line
    assert ("NOT faster than FP32" in line) == (fp32_ms / ms[pick.index] <= 1), line
    if pick is chosen:
        assert rep.target_forms == {} and "the shared model" in line
        assert sorted(p.name for p in out.iterdir()) == ["digits-cnn-int8.onnx"]
    else:
        form = rep.target_forms["openvino-cpu"]
        assert form.attempt == pick.index and form.reason.startswith("fastest: ")
        shipped = out / "digits-cnn-int8.openvino-cpu.onnx"
        assert form.file == shipped.name and shipped.read_bytes() != (out / "digits-cnn-int8.onnx").read_bytes()
        onnx.checker.check_model(str(shipped), full_check=True)  # a whole, valid ONNX model
    assert rep.target_forms.keys() <= {"openvino-cpu"}  # the deployment target keeps the ladder's choice


def _one_op_model(path, node, opsets):
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets]), str(path))
    return str(path)


def test_a_model_a_runtime_refuses_is_out_for_that_target_with_its_error_and_the_others_are_timed(tmp_path):
    """Two models of the same function (y = 2x): a Mul, and ONNX-ML's Scaler, which ONNX Runtime runs and OpenVINO
    cannot convert. On OpenVINO the Scaler one is recorded as failed there with OpenVINO's own error, the Mul one is
    timed (FP32 beside it), and the rule picks the one that ran, although the refused one was the shared model."""
    import numpy as np
    from onnx import helper

    from edgeq.core.specs import TargetSpec
    from edgeq.quantization.escalate import time_on

    mul = _one_op_model(tmp_path / "mul.onnx", helper.make_node("Mul", ["x", "two"], ["y"]), [("", 17)])
    scaler = _one_op_model(tmp_path / "scaler.onnx", helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml",
                                                                      offset=[0.0], scale=[2.0]),
                           [("", 17), ("ai.onnx.ml", 3)])
    refused, runs = _attempt(0, 0.9), _attempt(1, 0.9)
    refused.onnx_path, runs.onnx_path = scaler, mul
    feeds = {"x": np.ones((1, 4), np.float32)}
    ort_ms, ort_failed, _ = time_on([refused, runs], TargetSpec(name="ort-cpu", backend="onnxruntime"), feeds, 2, 10)
    assert ort_failed == {} and set(ort_ms) == {0, 1}  # ONNX Runtime runs both
    ms, failed, fp32_ms = time_on([refused, runs], TargetSpec(name="openvino-cpu", backend="openvino"), feeds, 2, 10,
                                  fp32_onnx=tmp_path / "mul.onnx")
    assert set(failed) == {0} and "ai.onnx.ml.Scaler" in failed[0], failed
    assert set(ms) == {1} and ms[1] > 0 and fp32_ms and fp32_ms > 0
    assert fastest_form([refused, runs], ms, shared=refused) is runs
