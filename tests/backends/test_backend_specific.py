"""What only one backend does: OpenVINO's pinned precision and layout, TensorRT's unavailable row."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.backends import get_backend
from edgeq.core.specs import TargetSpec


def _ov_caps() -> set[str]:
    import openvino as ov

    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def test_openvino_reports_the_precision_that_ran(demo_onnx_path):
    ov = get_backend("openvino")
    pinned = ov.check_compiles(demo_onnx_path, TargetSpec(name="ov", backend="openvino", precision="fp32"), iters=5)
    assert pinned.status == "compiled" and pinned.precision == "f32"
    caps = _ov_caps()
    if "BF16" in caps and "FP16" not in caps:
        # This CPU has bf16 but no fp16 arithmetic: OpenVINO quietly runs an f16 hint as bf16; the row says so.
        r = ov.check_compiles(demo_onnx_path, TargetSpec(name="ov16", backend="openvino", precision="fp16"), iters=5)
        assert r.status == "failed" and r.precision == "bf16"
        assert "asked fp16" in r.reason and "bf16" in r.reason


def test_openvino_nhwc_layout_via_preprocessing(demo_onnx_path, demo_samples):
    ov = get_backend("openvino")
    x = demo_samples[:1]
    with ov.runner(demo_onnx_path, TargetSpec(name="nchw", backend="openvino")) as a, \
            ov.runner(demo_onnx_path, TargetSpec(name="nhwc", backend="openvino", layout="NHWC")) as b:
        assert b.inputs[0].shape == [1, 8, 8, 1]
        np.testing.assert_allclose(b.infer({"image": np.ascontiguousarray(x.transpose(0, 2, 3, 1))})["logits"],
                                   a.infer({"image": x})["logits"], atol=1e-5)


def test_openvino_ir_keeps_fp32_weights(demo_onnx_path, tmp_path):
    prepared = get_backend("openvino").prepare(demo_onnx_path, TargetSpec(name="ov", backend="openvino"), tmp_path)
    assert 'element_type="f16"' not in prepared.files["ir_xml"].read_text()


def test_onnxruntime_refuses_nhwc_and_fp16_naming_the_setting(demo_onnx_path):
    ort = get_backend("onnxruntime")
    r = ort.check_compiles(demo_onnx_path, TargetSpec(name="ort-nhwc", backend="onnxruntime", layout="NHWC"))
    assert r.status == "failed" and "NHWC" in r.reason and "ort-nhwc" in r.reason
    r = ort.check_compiles(demo_onnx_path, TargetSpec(name="ort16", backend="onnxruntime", precision="fp16"))
    assert r.status == "failed" and "fp16" in r.reason


def test_tensorrt_unavailable_row_not_import_error(demo_onnx_path):
    trt = get_backend("tensorrt")
    ok, why = trt.availability("cuda")
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    r = trt.check_compiles(demo_onnx_path, TargetSpec(name="trt", backend="tensorrt", device="cuda", required=False))
    assert r.status == "unavailable" and r.reason == why and why
    assert trt.max_opset() >= 17  # choosing the export opset works without tensorrt
