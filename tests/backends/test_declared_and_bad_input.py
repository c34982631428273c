"""Declared-profile checks, and bad input: corrupt files, opsets too high, unknown backends."""

from __future__ import annotations

import pytest
import yaml

from edgeq.backends import get_backend
from edgeq.core.errors import ModelFileError, SpecError
from edgeq.core.specs import TargetSpec
from tests.backends.backend_models import custom_op_model, standard_model


def declared(profile, **kw) -> TargetSpec:
    return TargetSpec(**{"name": "npu", "backend": "declared", "profile": profile, **kw})


def write_profile(path, **kw):
    data = {"name": "tiny-npu", "max_opset": 17, "ops": ["Conv", "Relu", "Clip", "Gemm", "Flatten", "Constant",
                                                          "Identity", "GlobalAveragePool"], **kw}
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_model_is_declared_ok_on_the_example_profile(demo_onnx_path):
    r = get_backend("declared").check_compiles(demo_onnx_path, declared("hailo8-example"))
    assert r.status == "declared-ok", r.reason
    assert r.latency is None and r.compile_s is None and r.opset == 17 and r.max_opset == 17
    assert get_backend("declared").max_opset(declared("hailo8-example")) == 17


def test_op_outside_the_profile_is_named(demo_onnx_path, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", ops=["Conv", "Clip", "Constant", "Identity", "GlobalAveragePool", "Flatten"])
    r = get_backend("declared").check_compiles(demo_onnx_path, declared(profile))
    assert r.status == "failed"
    assert "Gemm" in r.reason and "tiny-npu" in r.reason and "npu" in r.reason
    assert {u.op_type for u in r.unsupported_ops} == {"Gemm"}


def test_custom_op_is_named_by_the_declared_check(tmp_path):
    path = custom_op_model(tmp_path / "c.onnx")
    r = get_backend("declared").check_compiles(path, declared("hailo8-example"))
    assert r.status == "failed" and "com.acme::MyCustomOp" in r.reason and "custom0" in r.reason


def test_static_shape_and_layout_requirements(demo_onnx_path, tmp_path):
    backend = get_backend("declared")
    r = backend.check_compiles(demo_onnx_path, declared("hailo8-example", batch="dynamic"))
    assert r.status == "failed" and "static" in r.reason and "batch" in r.reason
    r = backend.check_compiles(demo_onnx_path, declared("hailo8-example", layout="NHWC"))
    assert r.status == "failed" and "NHWC" in r.reason


def test_opset_above_profile_max(tmp_path):
    path = standard_model(tmp_path / "m.onnx", opset=21)
    r = get_backend("declared").check_compiles(path, declared(write_profile(tmp_path / "p.yaml")))
    assert r.status == "failed" and "opset 21" in r.reason and "17" in r.reason


def test_missing_profile_is_a_failed_row_naming_the_file(demo_onnx_path, tmp_path):
    r = get_backend("declared").check_compiles(demo_onnx_path, declared(tmp_path / "nope.yaml"))
    assert r.status == "failed" and "nope.yaml" in r.reason and "hailo8-example" in r.reason
    with pytest.raises(SpecError, match="target 'x': backend 'declared' needs 'profile'"):
        get_backend("declared").check_target(TargetSpec(name="x", backend="declared"))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "declared"])
def test_truncated_onnx_names_the_file(backend, demo_onnx_path, tmp_path):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(demo_onnx_path.read_bytes()[:200])
    target = declared("hailo8-example") if backend == "declared" else TargetSpec(name="t", backend=backend)
    with pytest.raises(ModelFileError, match="truncated.onnx.*(truncated or corrupt|no ONNX graph)"):
        get_backend(backend).check_compiles(bad, target)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_opset_above_target_max_names_opset_and_target(backend, demo_onnx_path):
    r = get_backend(backend).check_compiles(demo_onnx_path, TargetSpec(name="old-rt", backend=backend, max_opset=13))
    assert r.status == "failed"
    assert "opset 17" in r.reason and "old-rt" in r.reason and "13" in r.reason


def test_unknown_backend_lists_known_ones():
    with pytest.raises(SpecError, match="unknown backend 'tflite'.*declared, onnxruntime, openvino, tensorrt"):
        get_backend("tflite")
