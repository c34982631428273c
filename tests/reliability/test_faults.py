"""Faults that must lose nothing: a flaky device (retried), a dead device (fails, publishes nothing),
a tampered artifact (refused by hash), a calibration review that times out or is resumed twice."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import paused_review
from tests.reliability.rel_helpers import (
    FAST_TARGETS,
    copy_store,
    fast_config,
    seed,
    settled_task_runs,
    settled_task_states,
    snapshot,
    verify_store,
)

FLAKY = Path(__file__).with_name("flaky_device.py")


def _board(counter: Path, fail_first: int) -> dict:
    return {"name": "board", "backend": "command", "batch": "dynamic", "required": True,
            "command": [sys.executable, str(FLAKY), "--fail-first", str(fail_first), "--counter", str(counter)]}


def test_device_busy_for_its_first_calls_succeeds_through_retries(prefect_server, demo_root, tmp_path):
    from edgeq.flows.compile_check import CompileCheckParams, compile_check

    counter = tmp_path / "calls"
    cfg = fast_config(tmp_path, demo_root, targets=[FAST_TARGETS[0], _board(counter, fail_first=2)])
    state = compile_check(CompileCheckParams(config=str(cfg), warmup=0, iters=1), return_state=True)
    assert state.is_completed(), state.message
    board = next(r for r in state.result().reports if r.target == "board")
    assert board.status == "compiled", board.reason
    runs = {r.name: r for r in settled_task_runs(str(state.state_details.flow_run_id))}
    assert runs["compile-check-board"].run_count == 3  # two transient failures, then success
    assert runs["compile-check-board"].state.name == "Completed"
    assert runs["compile-check-ort-cpu"].run_count == 1
    assert int(counter.read_text()) >= 3


def test_device_that_stays_busy_fails_the_run_after_retries_and_publishes_nothing(prefect_server, demo_root,
                                                                                  tmp_path):
    from edgeq.flows.convert import ConvertParams, convert_model

    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, tmp_path / "store")
    counter = tmp_path / "calls"
    cfg = fast_config(tmp_path / "cfg", demo_root, store=store, targets=[FAST_TARGETS[0], _board(counter, -1)],
                      validation={"device_target": "board", "latency_iters": 10})
    before = snapshot(store)
    state = convert_model(ConvertParams(config=str(cfg), calibration=version), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"device command .*flaky_device.py.* reported a transient failure: "
                                        r"device busy \(call 3\)"):
        state.result()
    runs = {r.name: r for r in settled_task_runs(str(state.state_details.flow_run_id))}
    assert runs["compile-check-board"].run_count == 3 and runs["compile-check-board"].state.name == "Failed"
    assert not any(name.startswith(("quantize", "publish")) for name in runs), sorted(runs)
    assert not (store / "bundles").exists()
    after = snapshot(store)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed, the export was added
    assert not any(k.startswith("bundles/") for k in after)
    verify_store(store)


def test_tampered_fp32_onnx_is_refused_by_the_pipeline_naming_the_file(prefect_server, demo_root, tmp_path):
    import os

    from edgeq.flows.convert import ConvertParams, convert_model
    from edgeq.flows.export import ExportParams, export_model

    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, tmp_path / "store")
    cfg = fast_config(tmp_path / "cfg", demo_root, store=store)
    exported = export_model(ExportParams(config=str(cfg)))
    path = Path(exported.onnx.uri.removeprefix("file://"))
    assert path.is_file() and path.is_relative_to(store)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes: only the hash can tell
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))

    state = convert_model(ConvertParams(config=str(cfg), calibration=version), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=rf"artifact {exported.onnx.name} at .*{exported.onnx.sha256}.* was changed "
                                        r"after it was written: sha256 .* != recorded .*refusing to use it"):
        state.result()
    assert not (store / "bundles").exists()
    runs = dict(settled_task_states(str(state.state_details.flow_run_id)))
    assert runs["compile-check-ort-cpu"] == "Failed", runs  # the first task that reads the file refuses it
    assert not any(name.startswith(("quantize", "validate", "publish")) for name in runs), runs


def _start_review(params):
    from edgeq.flows.calibration import build_calibration_set

    out = {}
    th = threading.Thread(target=lambda: out.setdefault("state", build_calibration_set(params, return_state=True)))
    th.start()
    return th, out


def _cli(*args):
    from typer.testing import CliRunner

    from edgeq.cli import app

    return CliRunner().invoke(app, list(args))


def test_resuming_a_paused_review_twice_is_harmless(prefect_server, demo_root, tmp_path):
    from prefect.exceptions import NotPausedError
    from prefect.flow_runs import resume_flow_run

    from edgeq.calibration.versions import load_version
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.calibration import CalibrationParams
    from edgeq.tasks.config import load_prepared

    cfg_path = fast_config(tmp_path, demo_root)
    cfg = load_prepared(cfg_path)
    th, out = _start_review(CalibrationParams(config=str(cfg_path), poll_interval_s=1, review_timeout_s=120))
    v = paused_review(cfg.store_url)
    resume_flow_run(v.review.flow_run_id, run_input={"decision": "approve", "reviewer": "ann", "comment": "ok"})
    with pytest.raises(NotPausedError):  # a second resume (another reviewer, a double click) is refused by Prefect
        resume_flow_run(v.review.flow_run_id, run_input={"decision": "reject", "reviewer": "bob", "comment": "no"})
    th.join(120)
    assert out["state"].is_completed(), out["state"].message
    store = ArtifactStore(cfg.store_url)
    rec = load_version(store, v.version)
    assert (rec.status, rec.decision.reviewer, rec.decision.comment) == ("approved", "ann", "ok")
    # The same decision again through the CLI is a no-op; another decision is refused; the record never changes.
    res = _cli("calibration", "review", v.version, "--approve", "--reviewer", "ann", "--comment", "ok",
               "-c", str(cfg_path))
    assert res.exit_code == 0 and f"{v.version} was already approved by ann" in res.output, res.output
    res = _cli("calibration", "review", v.version, "--reject", "--reviewer", "bob", "-c", str(cfg_path))
    assert res.exit_code == 1 and "a decision is final" in res.output, res.output
    assert load_version(store, v.version) == rec


def test_review_that_times_out_stays_candidate_and_a_late_resume_changes_nothing(prefect_server, demo_root,
                                                                                  tmp_path):
    from prefect.exceptions import NotPausedError
    from prefect.flow_runs import resume_flow_run

    from edgeq.calibration import open_calibration
    from edgeq.calibration.versions import list_versions
    from edgeq.core.errors import NotApproved
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.calibration import CalibrationParams, build_calibration_set
    from edgeq.tasks.config import load_prepared

    cfg_path = fast_config(tmp_path, demo_root)
    cfg = load_prepared(cfg_path)
    state = build_calibration_set(CalibrationParams(config=str(cfg_path), poll_interval_s=1, review_timeout_s=2),
                                  return_state=True)
    [v] = list_versions(ArtifactStore(cfg.store_url))
    assert v.status == "candidate" and v.decision is None and v.review.timed_out_at
    with pytest.raises(NotPausedError):
        resume_flow_run(state.state_details.flow_run_id,
                        run_input={"decision": "approve", "reviewer": "late", "comment": ""})
    [v2] = list_versions(ArtifactStore(cfg.store_url))
    assert v2 == v
    with pytest.raises(NotApproved, match="is a candidate awaiting review"):
        open_calibration(cfg.store_url, v.version)
