"""Flow: build a calibration set from production captures, then pause for a human review."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import BaseModel, Field

from edgeq.calibration.versions import CalibrationVersion, Review, load_version, record_decision, set_review
from edgeq.calibration.versions import now as utc_now
from edgeq.core.errors import VersionNotFound
from edgeq.core.store import ArtifactStore
from edgeq.tasks.calibration import (
    Candidate,
    augmentation_task,
    candidate_task,
    capture_spec,
    dedupe_task,
    ingest_task,
    leakage_task,
    sample_task,
)
from edgeq.tasks.caching import call_cached, on_store
from edgeq.tasks.config import load_prepared


class CalibrationParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config")
    target_size: int | None = Field(None, ge=1, description="samples to select (default: data.captures.target_size)")
    min_size: int | None = Field(None, ge=1, description="minimum usable samples (default: data.captures.min_size)")
    override_reason: str | None = Field(
        None, description="accept fewer usable samples than the minimum, for this reason (recorded in the version)")
    wait_for_review: bool = Field(True, description="pause for a review after building the candidate")
    review_timeout_s: int = Field(3600, ge=1, description="seconds to wait for a review; then the version stays candidate")
    poll_interval_s: int = Field(5, ge=1, le=60, description="seconds between checks for the review")


class ReviewInput(RunInput):
    """The review form shown in the Prefect UI (and filled by `edgeq calibration review`)."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: quantization may use this calibration set, and the approval starts a conversion; "
                    "reject: it is never used. Either decision is final and recorded with your name.")
    reviewer: str = Field(min_length=1, description="your name (recorded with the decision)")
    comment: str = Field("", description="why; what you checked (recorded)")


class CalibrationResult(BaseModel):
    version: str
    status: str
    size: int
    coverage: str
    record: CalibrationVersion
    message: str


def _result(v: CalibrationVersion, message: str) -> CalibrationResult:
    return CalibrationResult(version=v.version, status=v.status, size=v.size, coverage=v.coverage, record=v,
                             message=message)


def _step(store: ArtifactStore, step, *args):
    """A cached step, re-run when its cached output has gone from the store."""
    state, _ = call_cached(on_store(step, store.root), *args,
                           gone=lambda out: not all(store.exists(ref) for ref in out.refs()))
    return state


def _candidate_step(store: ArtifactStore, cfg, state, selection) -> Candidate:
    """The candidate, its version as the record in the store says now (a cached candidate was built by an earlier
    run and may since have been approved or rejected); built again when its record or an artifact has gone."""
    def gone(candidate: Candidate) -> bool:
        try:
            v = load_version(store, candidate.version.version)
        except VersionNotFound:
            return True
        return not all(store.exists(ref) for ref in v.artifacts.values())

    candidate, _ = call_cached(on_store(candidate_task, store.root), cfg, state, selection, gone=gone)
    return candidate.model_copy(update={"version": load_version(store, candidate.version.version)})


def emit_calibration_approved(v: CalibrationVersion, config: str) -> None:
    """Prefect event `edgeq.calibration.approved`; the `convert-model` deployment's trigger converts on it."""
    from prefect.events import emit_event

    emit_event(event="edgeq.calibration.approved",
               resource={"prefect.resource.id": f"edgeq.calibration.{v.version}", "prefect.resource.name": v.model},
               payload={"version": v.version, "model": v.model, "config": config,
                        "reviewer": v.decision.reviewer if v.decision else None})


def report_already_decided(v: CalibrationVersion) -> str:
    """A build that selected exactly the samples of a decided version: no review (a decision is final). Says so in
    the run's log and in a markdown artifact, since nothing else in the run would tell a reviewer why it did not
    pause."""
    d = v.decision
    message = (f"calibration set {v.version}: this build selected the same samples, and it is already {v.status} "
               f"by {d.reviewer} at {d.decided_at}; nothing to review (new captures give a new version)")
    get_run_logger().info(message)
    use = (f"Quantization can use it now: `edgeq convert CONFIG --calibration {v.version}` (or `latest`)."
           if v.status == "approved" else "Quantization will not use it.")
    comment = f" (comment: {d.comment})" if d.comment else ""
    create_markdown_artifact(
        key="calibration-review", description=f"{v.version}: already {v.status}, nothing to review",
        markdown=f"# Calibration set `{v.version}` is already {v.status}\n\n"
                 f"This build selected exactly the samples of `{v.version}`, which **{d.reviewer}** {v.status} at "
                 f"{d.decided_at}{comment}. A decision is final, so the run did not pause for a review. {use} "
                 f"New captures give a new version.\n")
    return message


@flow(name="build-calibration-set", log_prints=True)
def build_calibration_set(params: CalibrationParams = CalibrationParams()) -> CalibrationResult:
    logger = get_run_logger()
    cfg = load_prepared(params.config)
    capture_spec(cfg)
    store = ArtifactStore(cfg.store_url)
    state = _step(store, ingest_task, cfg)
    state = _step(store, dedupe_task, cfg, state)
    state = _step(store, leakage_task, cfg, state)
    state = _step(store, augmentation_task, cfg, state)
    selection = on_store(sample_task, cfg.store_url)(cfg, state, params.target_size, params.min_size,
                                                     params.override_reason)
    candidate = _candidate_step(store, cfg, state, selection)
    v = candidate.version
    if v.status != "candidate":
        return _result(v, report_already_decided(v))
    if not params.wait_for_review:
        return _result(v, f"candidate {v.version} built; review it with `edgeq calibration review {v.version}`")

    run_id = str(FlowRunContext.get().flow_run.id)
    set_review(store, v.version, Review(flow_run_id=run_id, paused_at=utc_now(), timeout_s=params.review_timeout_s,
                                        poll_interval_s=params.poll_interval_s))
    logger.info("calibration set %s waits for review: approve or reject it in the UI (Resume), or run "
                "`edgeq calibration review %s --approve|--reject --reviewer NAME`", v.version, v.version)
    try:
        answer = pause_flow_run(
            wait_for_input=ReviewInput.with_initial_data(description=candidate.markdown),
            timeout=params.review_timeout_s, poll_interval=params.poll_interval_s, key=f"review-{v.version}")
    except FlowPauseTimeout:
        v = set_review(store, v.version, Review(timed_out_at=utc_now()))
        return _result(v, f"no review within {params.review_timeout_s}s: {v.version} stays candidate "
                          f"(`edgeq calibration review {v.version} ...` can still decide it)")
    v = record_decision(store, v.version, answer.decision == "approve", answer.reviewer, answer.comment,
                        via=f"flow run {run_id}")
    v = load_version(store, v.version)
    if v.status == "approved":
        emit_calibration_approved(v, params.config)
    return _result(v, f"{v.version} {v.status} by {v.decision.reviewer} at {v.decision.decided_at}")
