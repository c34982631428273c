"""Why INT8 is not faster: real ONNX Runtime and OpenVINO sessions on a tiny quantized Conv + MatMul + Gemm model.

The model: Conv -> Relu -> Reshape -> two MatMuls reading the same tensor -> Add -> Gemm. Quantized by ONNX Runtime's
quantizer in QDQ form, U8S8 (the x86 scheme): ONNX Runtime 1.32 fuses every node into an integer kernel. With signed
activations (S8S8), the DequantizeLinear the two MatMuls share is not fused: both still run as DequantizeLinear ->
float MatMul (measured with ONNX Runtime 1.32 on x86), which is what the explanation must find and name.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.backends import get_backend
from edgeq.cli.pipeline import speed_text
from edgeq.core.specs import TargetSpec
from edgeq.quantization.escalate import Attempt, Latency, QuantizationReport, explain_int8_speed, speed_verdict
from edgeq.quantization.explain import ARTIFACT_KEY, explain_speed, explanation_lines
from edgeq.quantization.policy import ArchitectureScan, PolicyDecision
from edgeq.tasks.quantize import quantization_markdown

ORT = TargetSpec(name="ort-cpu", backend="onnxruntime", precision="int8", threads=1)
OV = TargetSpec(name="openvino-cpu", backend="openvino", precision="int8", threads=1)


def _fp32_model(path):
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((8, 3, 3, 3)) * 0.2, "B": np.zeros(8),
             "M1": rng.standard_normal((8 * 8 * 8, 16)) * 0.05, "M2": rng.standard_normal((8 * 8 * 8, 16)) * 0.05,
             "G": rng.standard_normal((16, 4)) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "M1"], ["y1"], name="fc1"),
             helper.make_node("MatMul", ["f", "M2"], ["y2"], name="fc2"),
             helper.make_node("Add", ["y1", "y2"], ["y3"], name="add"),
             helper.make_node("Gemm", ["y3", "G"], ["y"], name="gemm")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """FP32, U8S8 and S8S8 QDQ forms of the tiny model (ONNX Runtime's quantizer, per-channel weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("explain")
    fp32 = folder / "fp32.onnx"
    _fp32_model(fp32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.it = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    out = {"fp32": fp32}
    for name, act in (("u8s8", QuantType.QUInt8), ("s8s8", QuantType.QInt8)):
        out[name] = folder / f"{name}.onnx"
        quantize_static(str(fp32), str(out[name]), Reader(), quant_format=QuantFormat.QDQ, activation_type=act,
                        weight_type=QuantType.QInt8, per_channel=True)
    return out


def _by_op(rows):
    return {r.op_type: r for r in rows}


def test_onnx_runtime_fuses_every_u8s8_node_into_an_integer_kernel(models):
    rows = _by_op(explain_speed(models["u8s8"], ORT))
    assert (rows["Conv"].integer, rows["Conv"].float_quantized) == (1, 0)
    assert (rows["MatMul"].integer, rows["MatMul"].float_quantized) == (2, 0)
    assert (rows["Gemm"].integer, rows["Gemm"].float_quantized) == (1, 0)
    assert "QLinearConv" in rows["Conv"].kernels and "QLinearMatMul x2" in rows["MatMul"].kernels
    assert "QGemm" in rows["Gemm"].kernels
    assert not any(r.unfused for r in rows.values())
    assert "every quantized Conv/MatMul/Gemm runs an integer kernel" in explanation_lines(list(rows.values()))


def test_onnx_runtime_names_the_s8s8_matmuls_it_leaves_as_dequantize_then_float(models):
    rows = explain_speed(models["s8s8"], ORT)
    ops = _by_op(rows)
    assert ops["Conv"].integer == 1 and ops["Gemm"].integer == 1
    assert (ops["MatMul"].integer, ops["MatMul"].float_quantized) == (0, 2)
    assert sorted(ops["MatMul"].unfused) == ["fc1", "fc2"]
    assert ops["MatMul"].kernels == "MatMul x2"
    assert "DequantizeLinear" in ops["QuantizeLinear/DequantizeLinear"].kernels
    text = explanation_lines(rows)
    assert "MatMul 0/2 quantized in integer kernels" in text and "Conv 1/1" in text
    assert "not fused, run in float after DequantizeLinear: fc" in text and ARTIFACT_KEY in text


def test_openvino_reports_each_layers_runtime_precision_and_kernel_beside_fp32(models):
    rows = _by_op(explain_speed(models["u8s8"], OV, fp32_onnx=models["fp32"]))
    conv, fc = rows["Convolution"], rows["FullyConnected"]
    assert conv.integer == 1 and "(u8)" in conv.kernels and "(f32)" in conv.fp32_kernels
    assert fc.integer + fc.float_quantized + fc.float_unquantized == 3  # fc1, fc2, gemm
    assert fc.integer >= 2 and ("(i8)" in fc.kernels or "(u8)" in fc.kernels)
    assert "(f32)" in fc.fp32_kernels and "(i8)" not in fc.fp32_kernels
    assert conv.int8_ms is not None and conv.fp32_ms is not None and rows["other layers"].int8_ms is not None


def test_a_backend_that_cannot_explain_says_why(models):
    device = TargetSpec(name="board", backend="command", command=["true"])
    (row,) = get_backend("command").explain_int8(models["u8s8"], device)
    assert row.note.startswith("not available: the command backend")
    gpu = TargetSpec(name="trt", backend="tensorrt", device="cuda", precision="int8")
    (row,) = explain_speed(models["u8s8"], gpu)
    assert row.note.startswith("not available")
    assert explanation_lines([row]).startswith("why (tensorrt on trt): not available")


def test_a_slower_verdict_carries_the_explanation_into_the_markdown_and_the_cli(models):
    chosen = Attempt(index=0, kind="ptq", label="ptq s8s8", settings={}, metric=0.9, drop=0.0, meets_sla=True,
                     latency=[Latency(target="ort-cpu", int8_ms=2.0, fp32_ms=1.0)])
    report = QuantizationReport(
        model="tiny", metric_name="top1", fp32_metric=0.9, fp32_ci95=0.01, max_drop=0.01, calibration_version="v",
        calibration_samples=4, policy=PolicyDecision(start="ptq", allow_ptq=True, allow_qat=False, reasons=[],
                                                     scan=ArchitectureScan()),
        types="s8s8", types_reason="test", deploy_target="ort-cpu", attempts=[chosen], chosen=0)
    report.faster_than_fp32, report.speed_note = speed_verdict(chosen, "ort-cpu")
    assert report.faster_than_fp32 is False
    explain_int8_speed(report, models["s8s8"], ORT)
    assert any(r.unfused for r in report.int8_kernels)
    md = quantization_markdown(report)
    assert "2.00x SLOWER" in md and "  - not fused, run in float after DequantizeLinear: fc" in md
    cli = speed_text(report.speed_note)
    assert cli.startswith("speed: INT8 is 2.00x SLOWER") and "MatMul 0/2" in cli and ARTIFACT_KEY in cli
    assert len(cli.splitlines()) == 3
    assert QuantizationReport.model_validate_json(report.model_dump_json()).int8_kernels == report.int8_kernels
