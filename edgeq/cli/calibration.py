"""`edgeq calibrate` and `edgeq calibration list|show|review`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from edgeq.cli.common import console, fail, run_flow
from edgeq.core.errors import EdgeqError

DEFAULT_CONFIG = Path("digits-demo.yaml")
_CONFIG = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="edgeq YAML config (its `store` names the store)")
_STORE = typer.Option(None, "--store", envvar="EDGEQ_STORE",
                      help="artifact store folder or fsspec URL, instead of --config")


def _store(config: Path, store: str | None):
    from edgeq.core.specs import load_config
    from edgeq.core.store import ArtifactStore

    if store:
        return ArtifactStore(store)
    if config == DEFAULT_CONFIG and not config.is_file():
        # Outside the repository there is no demo config to read the store from: say how to name one.
        fail(f"which artifact store? There is no {config} in {Path.cwd()}: pass --store PATH|URL, set "
             f"EDGEQ_STORE=PATH|URL, or --config CONFIG (the config's `store`)")
    try:
        return ArtifactStore(load_config(config).store_url)
    except EdgeqError as exc:
        fail(f"{exc} (pass --config CONFIG, or --store PATH|URL / EDGEQ_STORE)")


def _print_version(v) -> None:
    t = Table(title=f"calibration version {v.version}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    d = v.decision
    recs = v.input_records()
    held = (f"input {v.input_name}, sample {v.sample_shape}" if len(recs) == 1 else
            "inputs " + "; ".join(f"{r.name} {r.dtype} {r.shape}" for r in recs))
    rows = [("status", _status(v.status)), ("model", f"{v.model} ({held})"),
            ("size", f"{v.size} (target {v.target_size}, minimum {v.min_size})"),
            ("pool", f"{v.pool_rows} captures, {v.usable} usable"),
            ("excluded", ", ".join(f"{n} {k}" for k, n in sorted(v.excluded.items())) or "none"),
            ("coverage", f"{v.coverage} over {v.strata}"), ("created", v.created_at)]
    if v.override_reason:
        rows.append(("override", v.override_reason))
    rows += [("note", n) for n in v.notes]
    if d:
        rows += [("reviewer", d.reviewer), ("decided", d.decided_at), ("comment", d.comment or "-"), ("via", d.via)]
    elif v.review.flow_run_id:
        rows.append(("review", f"waiting in paused flow run {v.review.flow_run_id}"))
    elif v.review.timed_out_at:
        rows.append(("review", f"review timed out at {v.review.timed_out_at}; decide with `edgeq calibration review`"))
    rows += [(f"artifact {k}", r.uri) for k, r in v.artifacts.items()]
    for k, val in rows:
        t.add_row(k, str(val))
    console.print(t)


def _status(s: str) -> str:
    return {"approved": "[green]approved[/]", "rejected": "[red]rejected[/]"}.get(s, "[yellow]candidate[/]")


def calibrate(
    config: Path = typer.Argument(..., help="edgeq YAML config (data.captures names the pool)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="build the candidate and exit without pausing for review"),
    target_size: int = typer.Option(None, min=1, help="samples to select (default data.captures.target_size)"),
    min_size: int = typer.Option(None, min=1, help="minimum usable samples (default data.captures.min_size)"),
    override_reason: str = typer.Option(None, help="accept fewer usable samples than the minimum, for this reason"),
    timeout: int = typer.Option(3600, min=1, help="seconds to wait for the review; then the version stays candidate"),
    poll_interval: int = typer.Option(5, min=1, max=60, help="seconds between checks for the review"),
) -> None:
    """Build a calibration set from production captures and wait for its review."""
    from edgeq.flows.calibration import CalibrationParams, build_calibration_set

    params = CalibrationParams(config=str(config), target_size=target_size, min_size=min_size,
                               override_reason=override_reason, wait_for_review=not no_wait,
                               review_timeout_s=timeout, poll_interval_s=poll_interval)

    def explain(exc: Exception):
        if "never resumed" in str(exc):
            return (f"no review within {timeout}s: the calibration set stays a candidate "
                    f"(`edgeq calibration list`, then `edgeq calibration review VERSION ...`)", 2)
        return None

    result = run_flow(build_calibration_set, params, explain=explain)
    _print_version(result.record)
    console.print(result.message)


def list_cmd(config: Path = _CONFIG, store: str = _STORE) -> None:
    """Versions with status, size, coverage and reviewer."""
    from edgeq.calibration.versions import list_versions

    versions = list_versions(_store(config, store))
    if not versions:
        console.print("no calibration versions yet: `edgeq calibrate CONFIG`")
        return
    t = Table(title="calibration versions")
    for col in ("version", "status", "size", "reviewer"):
        t.add_column(col, no_wrap=True)
    for col in ("model", "coverage", "created", "decided"):
        t.add_column(col)
    for v in versions:
        d = v.decision
        t.add_row(v.version, _status(v.status), str(v.size), d.reviewer if d else "-", v.model, v.coverage,
                  v.created_at, d.decided_at if d else "-")
    console.print(t)


def show_cmd(version: str = typer.Argument(..., help="version id (cal-...)"), config: Path = _CONFIG,
             store: str = _STORE) -> None:
    """One version's record: status, coverage, exclusions, review, artifacts."""
    from edgeq.calibration.versions import load_version

    try:
        _print_version(load_version(_store(config, store), version))
    except EdgeqError as exc:
        fail(str(exc))


def _resume(run_id: str, run_input: dict) -> str:
    """Resume the paused review run with the decision; '' when done, else why it could not be."""
    from uuid import UUID

    from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound
    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(UUID(run_id), run_input=run_input)
        return ""
    except NotPausedError:
        return f"flow run {run_id} is no longer paused"
    except FlowPauseTimeout:
        return f"flow run {run_id} timed out waiting for review"
    except ObjectNotFound:
        return (f"flow run {run_id} is not on this Prefect API (set PREFECT_API_URL to the server the build "
                f"ran on)")
    except Exception as exc:  # noqa: BLE001 - an unreachable API must not block a decision
        return f"cannot reach the Prefect API to resume flow run {run_id}: {type(exc).__name__}: {exc}"


def review_cmd(
    version: str = typer.Argument(..., help="version id (cal-...)"),
    approve: bool = typer.Option(None, "--approve/--reject", help="approve or reject the calibration set"),
    reviewer: str = typer.Option(..., "--reviewer", help="your name (recorded)"),
    comment: str = typer.Option("", "--comment", help="why; what you checked (recorded)"),
    config: Path = _CONFIG,
    store: str = _STORE,
    wait: int = typer.Option(60, min=0, help="seconds to wait for the resumed flow to record the decision"),
) -> None:
    """Approve or reject a candidate: resumes its paused build run, or records the decision directly."""
    from edgeq.calibration.versions import load_version, record_decision

    if approve is None:
        fail("say --approve or --reject")
    if not reviewer.strip():
        fail("--reviewer NAME must not be empty")
    st = _store(config, store)
    try:
        v = load_version(st, version)
        if v.decision is not None:  # final: the same decision again is a no-op, any other an error
            v = record_decision(st, version, approve, reviewer, comment, via="cli")
            console.print(f"{version} was already {v.status} by {v.decision.reviewer} at {v.decision.decided_at}")
            return
        why = "no paused build run is waiting for it"
        if v.review.flow_run_id:
            why = _resume(v.review.flow_run_id, {"decision": "approve" if approve else "reject",
                                                 "reviewer": reviewer, "comment": comment})
            if not why:
                console.print(f"resumed paused flow run {v.review.flow_run_id}")
                deadline = time.monotonic() + max(wait, 2 * (v.review.poll_interval_s or 10) + 5)
                while time.monotonic() < deadline and load_version(st, version).decision is None:
                    time.sleep(0.5)
        v = load_version(st, version)
        if v.decision is None:
            if why:
                console.print(f"[yellow]{why}[/]: writing the decision to the version record directly")
            v = record_decision(st, version, approve, reviewer, comment, via="cli")
    except EdgeqError as exc:
        fail(str(exc))
    _print_version(v)
