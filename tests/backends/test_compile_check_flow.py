"""The compile-check stage through Prefect (a real test server) and the `edgeq check` CLI."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from typer.testing import CliRunner

from edgeq.core.errors import CompileCheckFailed
from tests.conftest import write_config


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return sorted(arts, key=lambda a: a.created)

    return asyncio.run(read())


@pytest.fixture(scope="module")
def flow_config(tmp_path_factory, demo_root):
    return write_config(tmp_path_factory.mktemp("compile-check"), demo_root)


def test_flow_builds_the_matrix_artifact_and_caches(prefect_server, flow_config):
    from edgeq.flows.compile_check import CompileCheckParams, compile_check

    params = CompileCheckParams(config=str(flow_config), warmup=2, iters=20)
    first = compile_check(params)
    by_target = {r.target: r for r in first.reports}
    assert by_target["ort-cpu"].status == "compiled" and by_target["openvino-cpu"].status == "compiled"
    assert by_target["openvino-cpu"].precision == "f32" and by_target["ort-cpu"].latency.median_ms > 0
    assert by_target["tensorrt-gpu"].status in ("unavailable", "compiled")
    assert by_target["hailo8-declared"].status == "declared-ok"
    # the OpenVINO IR and the optimized ONNX went to the store
    assert {"ir_xml", "ir_bin"} <= set(by_target["openvino-cpu"].artifacts)

    table = _artifact("compile-matrix")[-1]
    rows = table.data if isinstance(table.data, list) else yaml.safe_load(table.data)
    assert {r["target"]: r["status"] for r in rows}["openvino-cpu"] == "compiled"
    assert {"target", "backend", "status", "required", "reason"} == set(rows[0])  # what failed and why, first
    details = _artifact("compile-details")[-1]
    rows = details.data if isinstance(details.data, list) else yaml.safe_load(details.data)
    assert {"latency median ms", "latency p90 ms", "precision", "layout", "unsupported ops"} <= set(rows[0])

    second = compile_check(params)  # same ONNX sha256 + targets + toolchain: every task is a cache hit
    assert [r.model_dump() for r in second.reports] == [r.model_dump() for r in first.reports]


def test_required_target_failure_stops_the_flow_and_the_cli(prefect_server, tmp_path, demo_root):
    from edgeq.cli import app
    from edgeq.flows.compile_check import CompileCheckParams, compile_check

    profile = tmp_path / "no-gemm.yaml"
    profile.write_text(yaml.safe_dump({"name": "no-gemm-npu", "max_opset": 17, "ops": [
        "Conv", "Clip", "Constant", "Identity", "GlobalAveragePool", "Flatten"]}))
    targets = [{"name": "ort-cpu", "backend": "onnxruntime"},
               {"name": "npu", "backend": "declared", "profile": str(profile), "max_opset": 17, "required": True}]
    cfg = write_config(tmp_path / "cfg", demo_root, targets=targets)

    state = compile_check(CompileCheckParams(config=str(cfg), warmup=1, iters=5), return_state=True)
    assert state.is_failed()
    with pytest.raises(CompileCheckFailed, match=r"(?s)stops before quantization.*npu.*Gemm") as info:
        state.result()
    assert [r.target for r in info.value.report.failed_required] == ["npu"]

    result = CliRunner().invoke(app, ["check", str(cfg), "--iters", "5", "--warmup", "1"])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "npu" in out and "Gemm" in out and "compiled" in out  # the matrix is printed before the error


def test_cli_check_on_the_demo_exits_zero(prefect_server, flow_config):
    from edgeq.cli import app

    result = CliRunner().invoke(app, ["check", str(flow_config), "--iters", "5", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "compiled" in out and "declared-ok" in out and "unavailable" in out and "tensorrt" in out


def test_cli_check_names_an_execution_provider_this_onnxruntime_lacks_and_where_it_comes_from(prefect_server, tmp_path,
                                                                                              demo_root):
    import onnxruntime as ort

    from edgeq.cli import app

    if "DmlExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has DirectML: the row would compile")
    targets = [{"name": "ort-cpu", "backend": "onnxruntime"},
               {"name": "windows-gpu", "backend": "onnxruntime", "provider": "DirectML", "required": False}]
    path = write_config(tmp_path, demo_root, targets=targets)
    result = CliRunner().invoke(app, ["check", str(path), "--iters", "5", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "windows-gpu (unavailable): DmlExecutionProvider is not in this onnxruntime build" in out
    assert "pip install onnxruntime-directml" in out and "Windows" in out


def test_a_provider_is_for_onnxruntime_targets_and_is_their_device():
    from edgeq.core.specs import TargetSpec

    t = TargetSpec(name="npu", backend="onnxruntime", provider="QNN")
    assert (t.provider, t.device) == ("qnn", "qnn")
    with pytest.raises(ValueError, match="'provider' is for onnxruntime targets"):
        TargetSpec(name="x", backend="openvino", provider="cuda")
    with pytest.raises(ValueError, match="sets provider 'cuda' and device 'npu'"):
        TargetSpec(name="x", backend="onnxruntime", provider="cuda", device="npu")


def test_the_int8_graph_that_ships_is_compile_checked_on_every_required_target(prefect_server, tmp_path, demo_root,
                                                                              demo_onnx_path):
    """A declared NPU profile that takes the FP32 graph but has no QuantizeLinear/DequantizeLinear cannot take the
    INT8 model: the INT8 stage stops the run before validation and publishing."""
    from prefect import flow

    from edgeq.calibration.readers import CalibrationReader
    from edgeq.core.data import load_split
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.compile_check import run_int8_compile_check_stage
    from edgeq.quantization.ptq import PTQSettings, quantize
    from edgeq.tasks.config import load_prepared

    targets = [{"name": "ort-cpu", "backend": "onnxruntime"},
               {"name": "npu", "backend": "declared", "profile": "hailo8-example", "required": True}]
    cfg = load_prepared(write_config(tmp_path / "cfg", demo_root, targets=targets))
    x = load_split(cfg.data.validation, cfg.data.preprocess)[0]
    quantize(demo_onnx_path, tmp_path / "int8.onnx", CalibrationReader({"image": x[:64]}), PTQSettings.from_spec())
    int8 = ArtifactStore(cfg.store_url).put_file(tmp_path / "int8.onnx")

    @flow(name="int8-compile-check-test")
    def check_int8():
        return run_int8_compile_check_stage(cfg, int8)

    state = check_int8(return_state=True)
    assert state.is_failed()
    with pytest.raises(CompileCheckFailed, match=r"(?s)cannot take the INT8 model of digits-cnn .*neither "
                                                 r"validated nor published.*npu \(declared, failed\): op\(s\) "
                                                 r"outside profile 'hailo8-example'.*QuantizeLinear") as info:
        state.result()
    assert info.value.report.graph == "INT8"
    assert {r.target: r.status for r in info.value.report.reports} == {"ort-cpu": "compiled", "npu": "failed"}
