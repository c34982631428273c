"""`convert_model` through a real Prefect API: the whole pipeline, cache hits on a re-run, the CLI."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgeq.cli import app
from tests.conftest import write_config


@pytest.fixture(scope="module")
def convert_config(tmp_path_factory, demo_root):
    path = write_config(tmp_path_factory.mktemp("convert"), demo_root, wide=True)  # the demo's model, speed gate on
    data = yaml.safe_load(path.read_text())
    data["quantization"] = {"latency_iters": 10}
    data["validation"] = {"latency_iters": 10}
    path.write_text(yaml.safe_dump(data))
    return path


def test_convert_without_an_approved_calibration_version_says_what_to_do(prefect_server, convert_config):
    res = CliRunner().invoke(app, ["convert", str(convert_config)])
    assert res.exit_code == 1
    assert "no approved calibration version for model 'digits-cnn'" in res.output
    assert "edgeq calibration review" in res.output
    assert not (Path(yaml.safe_load(convert_config.read_text())["store"]) / "bundles").exists()


def test_demo_command_converts_and_publishes_then_reruns_from_cache(prefect_server, convert_config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    res = CliRunner().invoke(app, ["demo", str(convert_config)])
    assert res.exit_code == 0, res.output
    assert "approved by edgeq-demo" in res.output
    for stage in ("PyTorch FP32", "ONNX FP32", "ONNX INT8", "device INT8"):
        assert stage in res.output
    assert res.output.count("[PASS]") == 3
    assert "x faster than FP32 on ort-cpu" in res.output  # the demo's model: the speed gate (1.0) let it ship
    store = Path(yaml.safe_load(convert_config.read_text())["store"])
    bundles = list((store / "bundles").iterdir())
    assert len(bundles) == 1
    manifest = json.loads((bundles[0] / "manifest.json").read_text())
    assert manifest["calibration"]["reviewer"] == "edgeq-demo"
    ran_on = manifest["measured_on"]  # where each target's latencies ran: provider, threads, CPU ISA
    assert ran_on["ort-cpu"]["provider"] == "cpu" and ran_on["ort-cpu"]["version"].startswith("onnxruntime ")
    assert ran_on["ort-cpu"]["cpu_isa"] == manifest["cpu"]["isa"] and ran_on["ort-cpu"]["threads"] >= 1
    assert ran_on["openvino-cpu"]["backend"] == "openvino" and "provider" not in ran_on["openvino-cpu"]
    assert "hailo8-declared" not in ran_on  # a declared target is never timed
    from edgeq.calibration.versions import load_version
    from edgeq.core.store import ArtifactStore

    version = load_version(ArtifactStore(store), manifest["calibration"]["version"])
    assert manifest["calibration"]["decision_sha256"] == version.decision.sha256 != ""  # the sealed decision
    assert f"published {manifest['bundle_id']}" in res.output

    # The published event reached the Prefect API, for automations.
    import time

    from prefect.events.filters import EventFilter, EventNameFilter

    async def published_events():
        async with get_client() as client:
            page = await client.read_events(  # the server caps limit at 50; the client defaults to 100
                filter=EventFilter(event=EventNameFilter(name=["edgeq.model.published"])), limit=50)
            return [e for e in page.events if e.payload.get("bundle_id") == manifest["bundle_id"]]

    import asyncio

    deadline = time.time() + 30
    while not asyncio.run(published_events()) and time.time() < deadline:
        time.sleep(1)  # events are written by the server's event pipeline, shortly after emission
    assert asyncio.run(published_events()), "no edgeq.model.published event for the bundle"

    # Nothing changed: every cached stage is a cache hit, and the same bundle comes back.
    from edgeq.flows.convert import ConvertParams, convert_model

    state = convert_model(ConvertParams(config=str(convert_config)), return_state=True)
    assert state.is_completed() and state.result()["bundle_id"] == manifest["bundle_id"]

    async def task_states():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return {r.name: r.state.name if r.state else None for r in runs}  # a run not yet given its state: polled again

    stages = {"export", "compile-check-ort-cpu", "compile-check-openvino-cpu", "compile-check-hailo8-declared",
              "quantize", "validate-four-way"}
    deadline = time.time() + 30
    while True:  # task runs reach the API as events, recorded by the server shortly after the flow returns
        states = asyncio.run(task_states())
        cached = {stage for stage in stages for name, st in states.items() if name.startswith(stage) and st == "Cached"}
        if cached == stages or time.time() > deadline:
            break
        time.sleep(1)
    assert cached == stages, states

    # A cache hit re-creates nothing: no UI artifact is made again (the keyed ones keep their latest version), and
    # the bundle already in place is not announced a second time (automations would deploy it twice).
    async def run_artifacts_and_logs(run_id):
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            arts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [a.key for a in arts], [log.message for log in logs]

    again = f"bundle {manifest['bundle_id']} was already published"
    deadline = time.time() + 30
    while True:  # logs reach the API shortly after the run ends
        arts, logs = asyncio.run(run_artifacts_and_logs(state.state_details.flow_run_id))
        if any(again in m for m in logs) or time.time() > deadline:
            break
        time.sleep(1)
    assert arts == [], arts
    assert any(again in m for m in logs), logs

    # The calibration flow again: its candidate is a cache hit, and the version reads as the store says now
    # (approved by the demo), not as the cached build left it (candidate).
    from edgeq.flows.calibration import CalibrationParams, build_calibration_set

    cal = build_calibration_set(CalibrationParams(config=str(convert_config), wait_for_review=False),
                                return_state=True)
    assert cal.result().version == manifest["calibration"]["version"] and cal.result().status == "approved"
    assert "nothing to review" in cal.result().message
    deadline = time.time() + 30
    while True:
        cal_states = asyncio.run(_task_states(cal.state_details.flow_run_id))
        cached = {n.split("-")[1] for n, st in cal_states.items() if st == "Cached"}
        if cached >= {"ingest", "candidate"} or time.time() > deadline:
            break
        time.sleep(1)
    assert cached >= {"ingest", "candidate"}, cal_states


def test_a_target_pinned_to_nncf_gets_its_own_model_validated_on_it_and_published_beside_the_shared_one(
        prefect_server, convert_config, tmp_path):
    """quantization.target_engines {openvino-cpu: nncf}: the deployment target (ort-cpu) ships the ladder's choice,
    OpenVINO gets the same settings quantized by NNCF, validated four-way with OpenVINO as the device stage, and the
    bundle carries both ONNX models, the IR prepared from NNCF's, and says in its manifest which target got which.
    Runs on the demo test's store and its approved calibration version (that test builds and approves it)."""
    data = yaml.safe_load(convert_config.read_text())
    data["quantization"]["target_engines"] = {"openvino-cpu": "nncf"}
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["convert", str(path)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "INT8 model per target: openvino-cpu: attempt " in out and "(nncf PTQ" in out and "pinned to nncf" in out
    bundle_id = out.split("published ", 1)[1].split()[0]
    bundle = Path(data["store"]) / "bundles" / bundle_id
    manifest = json.loads((bundle / "manifest.json").read_text())
    models = manifest["target_models"]
    assert models["ort-cpu"] == {"onnx": "digits-cnn-int8.onnx", "shared": True}
    ov = models["openvino-cpu"]
    assert ov["onnx"] == "digits-cnn-int8.openvino-cpu.onnx" and ov["label"].startswith("nncf PTQ")
    assert ov["reason"] == "pinned to nncf (quantization.target_engines)"
    assert manifest["quantization_attempts"][ov["attempt"]]["attempt"] == ov["label"]
    assert manifest["quantization"]["chosen"].startswith("ort PTQ")  # the deployment target's model: the ladder's
    files = manifest["files"]
    assert files[ov["onnx"]] == ov["int8_onnx_sha256"] != files["digits-cnn-int8.onnx"]
    # Validated on its own: its ONNX INT8 row is NNCF's model, its device stage OpenVINO, every gate passed.
    assert ov["device_stage"] == "openvino-cpu" and ov["passed"]
    assert {g["gate"] for g in ov["four_way"]["gates"]} == {"export parity", "INT8 accuracy SLA", "device agreement"}
    # The IR in the bundle was made from NNCF's model: OpenVINO running it agrees with that ONNX model on ONNX
    # Runtime more closely than with the shared model (two quantizers differ by more than two runtimes do).
    import numpy as np
    import openvino as ov_rt

    from edgeq.core.data import load_inputs
    from edgeq.export import run_onnx
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(path)
    x = load_inputs(cfg.data.test, cfg.model.inputs, cfg.data.preprocess)[0]["image"][:64]
    (xml,) = [f for f in manifest["target_forms"]["openvino-cpu"] if f.endswith(".xml")]
    compiled = ov_rt.Core().compile_model(str(bundle / xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    device = np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))])
    own = run_onnx(bundle / ov["onnx"], {"image": x}, outputs=["logits"])["logits"]
    shared = run_onnx(bundle / "digits-cnn-int8.onnx", {"image": x}, outputs=["logits"])["logits"]
    assert np.abs(device - own).max() < np.abs(device - shared).max(), (np.abs(device - own).max(),
                                                                         np.abs(device - shared).max())


async def _task_states(run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return {r.name: r.state.name if r.state else None for r in runs}  # a run not yet given its state: polled again


def test_quantize_cli_prints_the_attempts(prefect_server, convert_config):
    res = CliRunner().invoke(app, ["quantize", str(convert_config)])
    assert res.exit_code == 0, res.output
    assert "policy: start with ptq — mobile-style" in res.output
    assert "u8s8" in res.output and "chosen: attempt 0" in res.output


def test_an_int8_model_slower_than_fp32_does_not_ship(prefect_server, demo_root, tmp_path):
    """The demo CNN without its wide head (0.05 ms at batch 1): its quantize/dequantize steps cost more than its
    integer kernels save, INT8 is slower than FP32 on ONNX Runtime, and the speed gate (on, at 1.0) refuses it,
    saying why per op type. Nothing is published."""
    path = write_config(tmp_path, demo_root, targets=[{"name": "ort-cpu", "backend": "onnxruntime"},
                                                      {"name": "openvino-cpu", "backend": "openvino"}],
                        quantization={"mode": "ptq", "latency_iters": 20, "max_sensitive_fp32": 0})
    data = yaml.safe_load(path.read_text())
    assert data["model"]["kwargs"]["hidden"] == 0
    data["thresholds"]["int8_min_speedup"] = 1.0
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["demo", str(path)])
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    assert "speed gate: the INT8 model runs at 0." in out and "below thresholds.int8_min_speedup 1" in out, out
    assert "Conv 5/5 quantized in integer kernels" in out and "left between kernels" in out, out  # why, per op type
    assert "`thresholds.int8_min_speedup: 0` turns this gate off" in out
    assert not (tmp_path / "store" / "bundles").exists()
