"""What the stages learn from a backend's capabilities, where a user sees it: the bundle manifest, the
compile-check cache, the device stage of four-way validation, the latency of quantization attempts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from edgeq.backends import get_backend
from edgeq.core.errors import SpecError
from edgeq.core.specs import TargetSpec
from edgeq.core.store import ArtifactRef
from edgeq.publish import publish_bundle
from edgeq.quantization.escalate import measure_latency
from edgeq.tasks.compile_check import BenchSettings, compile_check_key
from edgeq.validation import pick_device_target
from tests.conftest import write_config

DEVICE_PROGRAM = Path(__file__).resolve().parents[1] / "noisy_device.py"
NPU_OPS = ["Conv", "Relu", "Clip", "Gemm", "Flatten", "Constant", "Identity", "GlobalAveragePool"]


def write_profile(path: Path, ops: list[str] = NPU_OPS) -> Path:
    path.write_text(yaml.safe_dump({"name": "tiny-npu", "max_opset": 17, "ops": ops}))
    return path


def board() -> TargetSpec:
    return TargetSpec(name="board", backend="command", command=[sys.executable, str(DEVICE_PROGRAM)], required=False)


def test_manifest_names_why_each_target_ships_no_compiled_form(demo_cfg, demo_onnx_path, tmp_path):
    cfg = demo_cfg.model_copy(update={"store": str(tmp_path / "store"), "targets": [*demo_cfg.targets, board()]})
    manifest = publish_bundle(cfg, demo_onnx_path, {"model": {"name": cfg.model.name}}, {}, gates_passed=True)
    trt_ok, trt_why = get_backend("tensorrt").availability("cuda")
    want = {"ort-cpu": "ships the INT8 ONNX model itself",
            "hailo8-declared": "declared target: compile with the vendor toolchain"}
    if not trt_ok:
        want["tensorrt-gpu"] = trt_why
    assert manifest["targets_without_compiled_form"] == want
    forms = manifest["target_forms"]
    assert set(forms) == {"openvino-cpu", "board"} | ({"tensorrt-gpu"} if trt_ok else set())
    assert any(f.endswith(".xml") for f in forms["openvino-cpu"])
    assert len(forms["board"]) == 1 and forms["board"][0].startswith("board/") and forms["board"][0].endswith(".onnx")


def test_editing_a_declared_profile_changes_the_compile_check_key(tmp_path):
    profile = write_profile(tmp_path / "npu.yaml")
    target = TargetSpec(name="npu", backend="declared", profile=profile)
    onnx = ArtifactRef(uri="file:///m.onnx", sha256="0" * 64, size=1, name="m.onnx")
    before = compile_check_key(onnx, target, BenchSettings(), "store")
    assert compile_check_key(onnx, target, BenchSettings(), "store") == before
    write_profile(profile, ops=[op for op in NPU_OPS if op != "Gemm"])
    assert compile_check_key(onnx, target, BenchSettings(), "store") != before


def test_unknown_backend_still_has_a_compile_check_key():
    onnx = ArtifactRef(uri="file:///m.onnx", sha256="0" * 64, size=1, name="m.onnx")
    key = compile_check_key(onnx, TargetSpec(name="t", backend="tflite"), BenchSettings(), "store")
    assert key.startswith("edgeq-compile-check-")


def test_an_edited_profile_reruns_the_compile_check(prefect_server, tmp_path, demo_root):
    from edgeq.flows.compile_check import CompileCheckParams, compile_check

    profile = write_profile(tmp_path / "npu.yaml")
    targets = [{"name": "npu", "backend": "declared", "profile": str(profile), "max_opset": 17, "required": False}]
    params = CompileCheckParams(config=str(write_config(tmp_path / "cfg", demo_root, targets=targets)),
                                warmup=1, iters=5)
    assert [r.status for r in compile_check(params).reports] == ["declared-ok"]
    write_profile(profile, ops=[op for op in NPU_OPS if op != "Gemm"])
    [row] = compile_check(params).reports  # a cache hit would still say declared-ok
    assert row.status == "failed" and "Gemm" in row.reason


def test_default_device_stage_comes_from_the_backend(demo_cfg):
    odd = TargetSpec(name="odd", backend="tflite", required=False)
    cfg = demo_cfg.model_copy(update={"targets": [odd, board(), *demo_cfg.targets]})
    assert pick_device_target(cfg).name == "openvino-cpu"
    without = [t for t in demo_cfg.targets if not get_backend(t.backend).default_device_stage]
    with pytest.raises(SpecError, match="no device target: set validation.device_target"):
        pick_device_target(demo_cfg.model_copy(update={"targets": without}))


def test_only_onnx_runtime_on_the_cpu_runs_the_reference_runtime(tmp_path):
    """The four-way table's ONNX rows run ONNX Runtime's CPU provider: a device stage there would check nothing."""
    same = {t.name: get_backend(t.backend).runs_reference_runtime(t) for t in [
        TargetSpec(name="ort", backend="onnxruntime"), TargetSpec(name="ort-gpu", backend="onnxruntime", device="cuda"),
        TargetSpec(name="ov", backend="openvino"), board(),
        TargetSpec(name="npu", backend="declared", profile=write_profile(tmp_path / "npu.yaml"))]}
    assert same == {"ort": True, "ort-gpu": False, "ov": False, "board": False, "npu": False}


def test_quantization_times_only_targets_that_measure_latency(demo_onnx_path, demo_samples):
    """A declared profile runs nothing here; a `command` device starts its program for every run, so timing it would
    time that: neither is timed. The board's compile check still runs the model once."""
    targets = [TargetSpec(name="ort", backend="onnxruntime"),
               TargetSpec(name="npu", backend="declared", profile="hailo8-example"), board()]
    rows = measure_latency(demo_onnx_path, targets, demo_samples[0], "image", iters=10)
    assert [r.target for r in rows] == ["ort"]
    assert rows[0].int8_ms > 0 and not rows[0].error
    report = get_backend("command").check_compiles(demo_onnx_path, board())
    assert report.status == "compiled" and report.latency is None, report
