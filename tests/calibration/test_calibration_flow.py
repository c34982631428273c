"""The build_calibration_set flow on a real Prefect server: pause, resume with input, timeout."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import paused_review, write_config


def _start(params):
    from edgeq.flows.calibration import build_calibration_set

    out = {}
    th = threading.Thread(target=lambda: out.setdefault("state", build_calibration_set(params, return_state=True)))
    th.start()
    return th, out


@pytest.fixture
def cfg_path(tmp_path, demo_root):
    return write_config(tmp_path, demo_root)


def _params(cfg_path, **kw):
    from edgeq.flows.calibration import CalibrationParams

    return CalibrationParams(config=str(cfg_path), poll_interval_s=1, **kw)


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_review_through_the_paused_flow(prefect_server, cfg_path, decision):
    from prefect.flow_runs import resume_flow_run

    from edgeq.calibration import open_calibration
    from edgeq.core.errors import NotApproved
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(cfg_path)
    th, out = _start(_params(cfg_path, review_timeout_s=120))
    v = paused_review(cfg.store_url)
    assert v.status == "candidate"
    resume_flow_run(v.review.flow_run_id, run_input={"decision": decision, "reviewer": "ann", "comment": "checked"})
    th.join(120)
    state = out["state"]
    assert state.is_completed(), state.message
    result = state.result()
    status = "approved" if decision == "approve" else "rejected"
    assert result.status == status and result.version == v.version
    d = result.record.decision
    assert (d.status, d.reviewer, d.comment) == (status, "ann", "checked") and d.decided_at
    assert d.via == f"flow run {v.review.flow_run_id}"
    if decision == "approve":
        assert len(open_calibration(cfg.store_url, v.version)) == 400
    else:
        with pytest.raises(NotApproved, match="was rejected by ann"):
            open_calibration(cfg.store_url, v.version)


def test_cli_review_resumes_the_paused_run(prefect_server, cfg_path):
    from typer.testing import CliRunner

    from edgeq.calibration.versions import load_version
    from edgeq.cli import app
    from edgeq.core.store import ArtifactStore
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(cfg_path)
    th, out = _start(_params(cfg_path, review_timeout_s=120))
    v = paused_review(cfg.store_url)
    res = CliRunner().invoke(app, ["calibration", "review", v.version, "--approve", "--reviewer", "bob",
                                   "--comment", "coverage ok", "-c", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert f"resumed paused flow run {v.review.flow_run_id}" in res.output
    th.join(120)
    assert out["state"].is_completed()
    rec = load_version(ArtifactStore(cfg.store_url), v.version)
    assert rec.status == "approved" and rec.decision.reviewer == "bob" and rec.decision.via.startswith("flow run")


def test_review_timeout_leaves_candidate(prefect_server, cfg_path):
    from edgeq.calibration.versions import list_versions
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.calibration import build_calibration_set
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(cfg_path)
    state = build_calibration_set(_params(cfg_path, review_timeout_s=2), return_state=True)
    assert state.is_failed() and "never resumed" in state.message  # Prefect fails a pause that times out
    [v] = list_versions(ArtifactStore(cfg.store_url))
    assert v.status == "candidate" and v.decision is None
    assert v.review.timed_out_at and v.review.flow_run_id is None


def test_no_wait_builds_a_candidate_without_pausing(prefect_server, cfg_path):
    from edgeq.flows.calibration import build_calibration_set

    state = build_calibration_set(_params(cfg_path, wait_for_review=False), return_state=True)
    result = state.result()
    assert result.status == "candidate" and result.size == 400 and result.coverage == "36/36 strata covered"
    assert "edgeq calibration review" in result.message
