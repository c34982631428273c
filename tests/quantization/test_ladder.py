"""The escalation ladder as data: which rungs the policy climbs in which order, and the choice among attempts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.calibration.readers import CalibrationReader
from edgeq.core.specs import QuantizationSpec
from edgeq.quantization.escalate import (
    Attempt,
    Latency,
    build_ladder,
    choose_attempt,
    keep_sensitive_fp32,
    ptq_base,
    ptq_variants,
    qat,
    retime_ties,
    side_by_side,
    speed_gate,
    speed_verdict,
)
from edgeq.quantization.policy import ArchitectureScan, PolicyDecision
from edgeq.quantization.ptq import PTQSettings, quantize


def _policy(start: str, allow_ptq: bool = True, allow_qat: bool = True) -> PolicyDecision:
    return PolicyDecision(start=start, allow_ptq=allow_ptq, allow_qat=allow_qat, reasons=[], scan=ArchitectureScan())


PTQ = [ptq_base, ptq_variants, keep_sensitive_fp32]


@pytest.mark.parametrize("policy, can_train, rungs", [
    (_policy("ptq"), True, PTQ + [qat]),
    (_policy("qat"), True, [qat] + PTQ),
    (_policy("ptq"), False, PTQ),  # no training data: QAT is not a rung
    (_policy("qat", allow_ptq=False), True, [qat]),
    (_policy("ptq", allow_qat=False), True, PTQ),
])
def test_the_policy_orders_the_rungs(policy, can_train, rungs):
    assert build_ladder(policy, can_train) == rungs


def _attempt(index, metric, meets, ms=None, fp32_ms=2.0):
    lat = [Latency(target="cpu", int8_ms=ms, fp32_ms=fp32_ms)] if ms else []
    return Attempt(index=index, kind="ptq", label=f"a{index}", settings={}, metric=metric, meets_sla=meets, latency=lat)


def test_the_most_accurate_passing_attempt_wins_and_latency_breaks_ties():
    attempts = [_attempt(0, 0.99, False), _attempt(1, 0.95, True, 1.0), _attempt(2, 0.97, True, 3.0),
                _attempt(3, 0.9700000001, True, 1.5), _attempt(4, 0.97, True)]
    assert choose_attempt(attempts, "cpu").index == 3  # equal to 6 places with 2, faster; 4 has no latency
    assert choose_attempt(attempts[:1], "cpu") is None


def test_speed_verdict_on_the_deployment_target():
    assert speed_verdict(_attempt(0, 0.9, True, 1.0), "cpu") == (
        True, "INT8 is 2.00x faster than FP32 on cpu (1.000 ms vs 2.000 ms at batch 1)")
    faster, note = speed_verdict(_attempt(0, 0.9, True, 4.0), "cpu")
    assert faster is False and note.startswith("INT8 is 2.00x SLOWER") and "NOT faster" in note
    assert speed_verdict(_attempt(0, 0.9, True), "cpu") == (
        None, "latency on deployment target cpu could not be measured here")


def test_the_speed_gate_refuses_below_its_minimum_and_says_by_how_much():
    slow = _attempt(0, 0.9, True, 4.0)  # INT8 4 ms vs FP32 2 ms
    slow.latency[0].round_ratios = [0.45, 0.5, 0.55]
    why = speed_gate(slow, "cpu", 1.0)
    assert why == ("speed gate: the INT8 model runs at 0.50x FP32's speed on the deployment target cpu (4.000 ms vs "
                   "2.000 ms at batch 1; FP32/INT8 0.45-0.55x over 3 alternating rounds), below "
                   "thresholds.int8_min_speedup 1: an INT8 model that does not pay on its target does not ship")
    fast = _attempt(0, 0.9, True, 1.0)  # 2.00x
    assert speed_gate(fast, "cpu", 1.0) is None and speed_gate(fast, "cpu", 2.0) is None
    assert "runs at 2.00x" in speed_gate(fast, "cpu", 2.5)
    assert speed_gate(slow, "cpu", 0) is None  # 0: the gate is off
    assert speed_gate(_attempt(0, 0.9, True), "cpu", 1.0) is None  # not timed here: the verdict says so
    assert speed_gate(slow, "other-target", 1.0) is None


def test_the_verdict_reads_the_side_by_side_rounds():
    a = _attempt(0, 0.9, True, 1.0)
    a.latency[0].round_ratios = [0.8, 1.3, 1.25, 1.2, 0.9]  # FP32/INT8 per round; medians of times say 2.00x
    faster, note = speed_verdict(a, "cpu")
    assert faster is True
    assert note == ("INT8 is 1.20x faster than FP32 on cpu (1.000 ms vs 2.000 ms at batch 1; side by side, median "
                    "of 5 alternating rounds, FP32/INT8 0.80-1.30x)")


def test_side_by_side_times_both_models_in_every_round(demo_onnx_path, tmp_path):
    from edgeq.core.specs import TargetSpec

    target = TargetSpec(name="ort-cpu", backend="onnxruntime")
    feeds = {"image": np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)}
    lat = side_by_side(demo_onnx_path, demo_onnx_path, target, feeds, rounds=3, iters=10)
    assert not lat.error and len(lat.round_ratios) == 3 and lat.fp32_ms > 0 and lat.int8_ms > 0
    assert lat.speedup == pytest.approx(float(np.median(lat.round_ratios)))
    # a model the runtime cannot load: a Latency that says why, never an exception
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    lat = side_by_side(demo_onnx_path, bad, target, feeds, rounds=3, iters=10)
    assert lat.error and lat.speedup is None and not lat.round_ratios


def _matmul_chain(path, n: int):
    """[1, 64] -> n MatMuls by a 64x64 matrix: a model whose latency grows with n."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], (np.eye(64, dtype=np.float32) * 0.5).ravel().tolist())
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}" if i < n - 1 else "y"])
             for i in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_tied_attempts_are_timed_side_by_side_before_the_faster_one_is_chosen(tmp_path):
    """The ladder's timings, taken minutes apart, say the 200-MatMul model is the faster one (as a busy machine can);
    timed against each other, the 1-MatMul model is, and it ships. An attempt outside the tie is not timed."""
    from edgeq.core.specs import TargetSpec

    slow = _attempt(0, 0.97, True, 0.01)
    slow.onnx_path = _matmul_chain(tmp_path / "slow.onnx", 200)
    fast = _attempt(1, 0.97, True, 5.0)
    fast.onnx_path = _matmul_chain(tmp_path / "fast.onnx", 1)
    assert choose_attempt([slow, fast], "cpu").index == 0  # on the ladder's timings
    target = TargetSpec(name="cpu", backend="onnxruntime")
    retime_ties([slow, fast], target, {"x": np.ones((1, 64), np.float32)}, rounds=3, iters=20)
    assert fast.latency[0].int8_ms < slow.latency[0].int8_ms, (fast.latency, slow.latency)
    assert choose_attempt([slow, fast], "cpu").index == 1


def test_ptq_settings_come_from_the_spec():
    spec = QuantizationSpec(engine="nncf", method="entropy", per_channel=False, keep_fp32_nodes=["head"],
                            keep_fp32_op_types=["Add"])
    s = PTQSettings.from_spec(spec, types="s8s8", reduce_range=True)
    assert s.record() == {"engine": "nncf", "method": "entropy", "types": "s8s8", "reduce_range": True,
                          "per_channel": False, "op_types": ["Conv", "ConvTranspose", "MatMul", "Gemm"],
                          "keep_fp32_nodes": ["head"], "keep_fp32_op_types": ["Add"]}
    assert s.label() == "nncf PTQ (bias correction), fp32: head"
    ort = s.model_copy(update={"engine": "onnxruntime"})
    assert ort.label() == "ort PTQ entropy s8s8 reduce-range per-tensor, fp32: head"
    assert PTQSettings.from_spec().record()["types"] == "u8s8"
    assert PTQSettings.from_spec().record()["folded_activations"] == ["Relu", "Clip"]
    assert "folded_activations" not in s.record() and "folded_activations" not in ort.record()  # NNCF; s8s8


def _conv_model(path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.random.default_rng(0).normal(size=36).tolist())
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _conv_act_chain(path):
    """Conv -> Clip(0, 6) -> Conv -> Relu -> Conv: a mobile net's ReLU6 and a ResNet's ReLU between three convs."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [8, 8, 3, 3], rng.normal(0, 0.2, 576).tolist())
             for i in range(3)]
    inits += [helper.make_tensor("lo", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor("hi", TensorProto.FLOAT, [], [6.0])]
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Clip", ["c0", "lo", "hi"], ["a0"], name="relu6"),
             helper.make_node("Conv", ["a0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["a1"], name="relu"),
             helper.make_node("Conv", ["a1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_relu_and_clip_between_quantized_convs_fold_so_no_conversion_stays_between_the_kernels(tmp_path):
    """ONNX Runtime's quantizer folds a Relu/Clip into the conv before it when asked to quantize it: the convs then
    feed one another in integer. Kept FP32, each activation leaves a DequantizeLinear/QuantizeLinear pair between
    two kernels (MobileNetV2's ReLU6s held its INT8 model at FP32's speed on ONNX Runtime)."""
    from edgeq.core.specs import TargetSpec
    from edgeq.export import run_onnx
    from edgeq.quantization.explain import CONVERSIONS, explain_speed

    src = _conv_act_chain(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(64, 8, 16, 16)).astype(np.float32)
    folded = quantize(src, tmp_path / "folded.onnx", CalibrationReader({"image": x}), PTQSettings.from_spec())
    kept = quantize(src, tmp_path / "kept.onnx", CalibrationReader({"image": x}),
                    PTQSettings.from_spec(QuantizationSpec(keep_fp32_op_types=["Relu", "Clip"])))
    assert not {"Relu", "Clip"} & {n.op_type for n in onnx.load(str(folded)).graph.node}
    assert {"Relu", "Clip"} <= {n.op_type for n in onnx.load(str(kept)).graph.node}

    target = TargetSpec(name="cpu", backend="onnxruntime")
    rows = {name: {r.op_type: r for r in explain_speed(path, target, src, {"image": x[:1]})}
            for name, path in (("folded", folded), ("kept", kept))}
    for r in rows.values():
        assert (r["Conv"].integer, r["Conv"].float_quantized) == (3, 0), r["Conv"]
    # the model's own input and output conversions stay; each kept activation adds a pair
    assert "DequantizeLinear x1, QuantizeLinear x1" in rows["folded"][CONVERSIONS].kernels, rows["folded"][CONVERSIONS]
    assert "DequantizeLinear x3, QuantizeLinear x3" in rows["kept"][CONVERSIONS].kernels, rows["kept"][CONVERSIONS]

    ref = run_onnx(src, x[:16], "image", "y")
    spread = float(ref.max() - ref.min())
    for path in (folded, kept):  # folding changes where the rounding happens, not what is computed
        assert float(np.abs(run_onnx(path, x[:16], "image", "y") - ref).max()) < 0.03 * spread


@pytest.mark.parametrize("engine", ["onnxruntime", "nncf"])
def test_one_reader_calibrates_attempt_after_attempt_alike(tmp_path, engine):
    src = _conv_model(tmp_path / "m.onnx")
    reader = CalibrationReader({"image": np.random.default_rng(2).normal(size=(16, 1, 8, 8))})
    settings = PTQSettings.from_spec(QuantizationSpec(engine=engine))
    first = onnx.load(quantize(src, tmp_path / "a.onnx", reader, settings))
    second = onnx.load(quantize(src, tmp_path / "b.onnx", reader, settings))

    def scales(m):
        return {i.name: onnx.numpy_helper.to_array(i).tolist() for i in m.graph.initializer if "scale" in i.name}

    assert scales(first) and scales(first) == scales(second)


def test_attempts_within_a_tenth_of_the_sla_are_ties_and_the_faster_one_ships():
    """The text demo's two transformer attempts scored 0.9998 and 0.9997 (cosine; SLA drop 0.01): noise next to
    what the SLA allows, while one ran 1.6x slower on the deployment target. Outside the band accuracy still wins."""
    near = [_attempt(0, 0.9997, True, 0.5), _attempt(1, 0.9998, True, 0.8)]
    assert choose_attempt(near, "cpu", max_drop=0.01).index == 0
    assert choose_attempt(near, "cpu").index == 1  # no band: the more accurate
    far = [_attempt(0, 0.995, True, 0.5), _attempt(1, 0.9998, True, 0.8)]
    assert choose_attempt(far, "cpu", max_drop=0.01).index == 1


@pytest.mark.parametrize("isa, reduce_range", [
    (["avx2", "fma"], True),  # x86 without VNNI: U8S8 saturates, weights in 7 bits
    (["avx512f", "avx512_vnni"], False),
    (["avx2", "avx_vnni"], False),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_target_declaring_its_cpu_gets_the_int8_scheme_of_that_cpu(backend, isa, reduce_range):
    """The model ships to another CPU than this machine's: the target's `cpu_isa` decides reduce_range, and the
    reason recorded with the types says so."""
    from edgeq.core.specs import TargetSpec
    from edgeq.quantization.escalate import first_ptq_settings

    settings, reason = first_ptq_settings(QuantizationSpec(), TargetSpec(name="edge", backend=backend, cpu_isa=isa))
    assert settings.types == "u8s8" and settings.reduce_range is reduce_range, reason
    assert f"the target's declared CPU (cpu_isa {', '.join(isa)})" in reason
    assert ("without VNNI" in reason) is reduce_range
