"""End to end on a real local Prefect server: deploy from deployments/prefect.yaml, a process worker runs the runs.

One server, pool, set of deployments and worker for the module (deployments/README.md's commands). The tests
trigger runs by deployment as a user does from the CLI or UI, and read back what the UI shows.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from uuid import UUID

import pytest

from tests.conftest import REPO, write_config
from tests.deployments.browser import Chromium, chromium_path
from tests.deployments.local_prefect import LocalPrefect

pytestmark = pytest.mark.timeout(300)

CONVERT = "convert-model/convert-model"
CALIBRATE = "build-calibration-set/build-calibration-set"
RETRAIN = "retrain-to-deploy/retrain-to-deploy"
SCREENSHOTS = REPO / ".edgeq" / "test-artifacts"
NUMBER = re.compile(r"\d+\.\d+")


def raw_floats(text: str) -> list[str]:
    """Numbers printed with all their digits (0.9696969696969697): more than 6 significant digits."""
    return [n for n in NUMBER.findall(text) if len(n.replace(".", "").lstrip("0")) > 6]


@pytest.fixture(scope="module")
def local_prefect(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    lp = LocalPrefect(tmp_path_factory.mktemp("local-prefect"))
    try:
        lp.start()
        with temporary_settings({PREFECT_API_URL: lp.api}):
            yield lp
    except Exception as exc:
        raise RuntimeError(f"{exc}\n--- server log ---\n{lp.tail('server')}\n--- worker log ---\n{lp.tail('worker')}")
    finally:
        lp.stop()


def client():
    from prefect import get_client

    return get_client(sync_client=True)


def wait_for(run_id: UUID, lp: LocalPrefect, done=("COMPLETED", "FAILED", "CRASHED", "CANCELLED"),
             timeout: float = 240):
    deadline = time.monotonic() + timeout
    with client() as c:
        while True:
            run = c.read_flow_run(run_id)
            if run.state and run.state.type.value in done:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {run.name} still {run.state and run.state.name} after {timeout}s\n"
                                     f"--- worker log ---\n{lp.tail('worker')}")
            time.sleep(1)


def assert_completed(run, lp: LocalPrefect) -> None:
    assert run.state.type.value == "COMPLETED", (
        f"flow run {run.name} ended {run.state.name}: {run.state.message}\n--- worker log ---\n{lp.tail('worker', 120)}")


def artifacts_of(run_id: UUID) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        arts = c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {a.key: a for a in arts if a.key}


def table_rows(artifact) -> list[dict]:
    return artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)


def logs_of(run_id: UUID, until: str | None = None, timeout: float = 30.0) -> list[str]:
    """The run's log messages. The flow's process ships its logs in batches, and the run can reach Completed before
    the last batch arrives: with `until`, read again until a message holds that text (or the timeout passes)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        with client() as c:
            logs = [log.message for log in
                    c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
        if until is None or any(until in m for m in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(1.0)


def approved_config(folder: Path, demo_root: Path) -> Path:
    """A demo config whose store holds an approved calibration set (built without Prefect)."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.store import ArtifactStore
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.config import load_prepared

    path = write_config(folder, demo_root)
    cfg = load_prepared(path)
    cand = build_calibration_candidate(cfg)
    record_decision(ArtifactStore(cfg.store_url), cand.version.version, True, "edgeq-tests", via="test fixture")
    return path


@pytest.fixture(scope="module")
def converted(local_prefect, demo_root, tmp_path_factory):
    """convert-model triggered by deployment, as `prefect deployment run convert-model/convert-model` does."""
    from prefect.deployments import run_deployment

    cfg = approved_config(tmp_path_factory.mktemp("convert"), demo_root)
    run = run_deployment(CONVERT, parameters={"params": {"config": str(cfg), "calibration": "latest"}},
                         timeout=0, as_subflow=False)
    return wait_for(run.id, local_prefect), cfg


def test_prefect_yaml_deploys_three_flows_with_schedule_limits_and_trigger(local_prefect):
    with client() as c:
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
        automations = c.read_automations()
    assert set(deps) == {CONVERT, CALIBRATE, RETRAIN}
    assert all(d.work_pool_name == "edgeq-process" for d in deps.values())
    cron = [s.schedule.cron for s in deps[RETRAIN].schedules]
    assert cron == ["0 3 * * 1"] and deps[RETRAIN].schedules[0].active
    assert deps[CONVERT].global_concurrency_limit.limit == 1
    assert deps[CONVERT].concurrency_options.collision_strategy.value == "ENQUEUE"
    assert deps[RETRAIN].concurrency_options.collision_strategy.value == "CANCEL_NEW"
    trigger = next(a for a in automations if a.name == "convert-on-calibration-approved")
    assert trigger.trigger.expect == {"edgeq.calibration.approved"}
    assert trigger.actions[0].deployment_id == deps[CONVERT].id


def test_convert_by_deployment_publishes_and_artifacts_read_back(local_prefect, converted):
    run, _ = converted
    assert_completed(run, local_prefect)
    arts = artifacts_of(run.id)
    for key in ("export-report", "compile-matrix", "quantization-attempts", "four-way-table", "four-way-validation",
                "four-way-chart", "published-bundle"):
        assert key in arts, f"artifact {key} missing from the flow run; it has {sorted(arts)}"
    table = arts["four-way-table"]
    assert table.type == "table"
    rows = table_rows(table)
    assert len(rows) == 4, rows  # PyTorch FP32, ONNX FP32, ONNX INT8, device INT8
    assert "bundle-" in arts["published-bundle"].data


def test_convert_run_artifacts_read_well(local_prefect, converted):
    """What the UI shows: rounded numbers, the chart as an embedded picture, the device row's INT8, progress."""
    run, _ = converted
    assert_completed(run, local_prefect)
    arts = artifacts_of(run.id)
    tables = {k: a for k, a in arts.items() if a.type == "table"}
    assert {"compile-matrix", "compile-details", "four-way-table", "four-way-gates", "quantization-attempts"} <= set(tables)
    for key, art in tables.items():
        data = json.dumps(table_rows(art))
        assert not raw_floats(data), f"{key} shows unrounded numbers: {raw_floats(data)[:5]}"
        assert '"-"' not in data, f"{key} has a bare '-' cell"
    device = next(r for r in table_rows(tables["four-way-table"]) if r["stage"] == "device INT8")
    assert device["precision"].startswith("int8"), device  # not the runtime's f32 inference hint alone
    chart = arts["four-way-chart"]
    assert chart.type == "markdown" and "](data:image/png;base64," in chart.data
    progress = arts["quantization-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0, progress.data


def test_calibration_review_through_api_triggers_conversion(local_prefect, demo_root, tmp_path):
    """Resume the paused review with the UI's form input; the approval event triggers convert-model."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run

    from edgeq.calibration.versions import load_version
    from edgeq.core.specs import load_config
    from edgeq.core.store import ArtifactStore

    cfg = write_config(tmp_path / "review", demo_root)
    run = run_deployment(CALIBRATE, parameters={"params": {"config": str(cfg), "poll_interval_s": 1}},
                         timeout=0, as_subflow=False)
    paused = wait_for(run.id, local_prefect, done=("PAUSED", "COMPLETED", "FAILED", "CRASHED"), timeout=180)
    assert paused.state.type.value == "PAUSED", f"{paused.state.name}: {paused.state.message}"
    keys = paused.state.state_details.run_input_keyset
    with client() as c:  # what the UI's Resume dialog reads: the form schema and its markdown description
        schema = json.loads(c.read_flow_run_input(run.id, keys["schema"]))
        description = c.read_flow_run_input(run.id, keys["description"])
    assert {"decision", "reviewer", "comment"} <= set(schema["properties"])
    assert schema["properties"]["decision"]["enum"] == ["approve", "reject"]
    assert "Calibration set cal-" in description
    version = paused.state.state_details.pause_key.removeprefix("review-")

    resume_flow_run(run.id, run_input={"decision": "approve", "reviewer": "ui-reviewer", "comment": "coverage ok"})
    done = wait_for(run.id, local_prefect)
    assert_completed(done, local_prefect)
    v = load_version(ArtifactStore(load_config(cfg).store_url), version)
    assert (v.status, v.decision.reviewer, v.decision.comment) == ("approved", "ui-reviewer", "coverage ok")

    # The deployment trigger: a convert-model run with this config and this version.
    deadline = time.monotonic() + 60
    triggered = None
    with client() as c:
        while triggered is None and time.monotonic() < deadline:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["convert-model"])),
                                    flow_run_filter=FlowRunFilter())
            triggered = next((r for r in runs if r.parameters.get("params", {}).get("calibration") == version), None)
            time.sleep(1)
    assert triggered is not None, f"no convert-model run was triggered for {version}\n{local_prefect.tail('worker')}"
    assert triggered.parameters["params"]["config"] == str(cfg)
    finished = wait_for(triggered.id, local_prefect)
    assert_completed(finished, local_prefect)
    assert "four-way-table" in artifacts_of(triggered.id)


def test_retrain_to_deploy_by_deployment_publishes_the_new_weights(local_prefect, converted):
    from prefect.deployments import run_deployment

    from edgeq.core.specs import load_config
    from edgeq.core.store import ArtifactStore, sha256_file
    from edgeq.publish import read_manifest

    _, cfg = converted  # its store holds an approved calibration set
    run = run_deployment(RETRAIN, parameters={"params": {"config": str(cfg), "train_kwargs": {"epochs": 12}}},
                         timeout=0, as_subflow=False)
    done = wait_for(run.id, local_prefect)
    assert_completed(done, local_prefect)
    arts = artifacts_of(run.id)
    assert "retrain-to-deploy" in arts, sorted(arts)
    store = ArtifactStore(load_config(cfg).store_url)
    summary = arts["retrain-to-deploy"].data
    bundle_id = summary.split("`")[1]
    manifest = read_manifest(store, bundle_id)
    assert manifest is not None, f"bundle {bundle_id} has no manifest in {store.root}"
    assert manifest["model"]["weights_sha256"][:16] in summary  # built from the retrained weights...
    assert manifest["model"]["weights_sha256"] != sha256_file(load_config(cfg).model.weights)  # ...not the demo's


def test_flow_run_page_shows_artifacts_in_chromium(local_prefect, converted, capsys):
    binary = chromium_path()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it where apt works)")
    run, _ = converted
    assert_completed(run, local_prefect)
    tables = {k: a for k, a in artifacts_of(run.id).items() if a.type == "table"}
    shot = SCREENSHOTS / f"flow-run-{run.name}-artifacts.png"
    matrix_shot = SCREENSHOTS / f"flow-run-{run.name}-compile-matrix.png"
    pages: dict[str, str] = {}
    browser = Chromium(binary)
    try:
        browser.goto(f"{local_prefect.url}/runs/flow-run/{run.id}")
        browser.wait_for_text([run.name, "Completed", "Artifacts"])
        assert browser.click_text("Artifacts"), "the flow run page has no Artifacts tab"
        text = browser.wait_for_text(["four-way-table", "four-way-validation", "published-bundle", "compile-matrix"],
                                     scroll=True)
        browser.screenshot(shot)
        for key, art in sorted(tables.items()):  # every table as the UI shows it, on the artifact's own page
            cell = next(iter(table_rows(art)[0].values()))  # the first cell, as the UI prints it
            # the compile matrix's reasons too: its key and first cell can show before the table has rendered
            reasons = [str(r["reason"]) for r in table_rows(art)] if key == "compile-matrix" else []
            browser.goto(f"{local_prefect.url}/artifacts/artifact/{art.id}")
            pages[key] = browser.wait_for_text([key, str(cell).lower() if isinstance(cell, bool) else str(cell),
                                                *reasons])
            if key == "compile-matrix":
                browser.screenshot(matrix_shot)
                overflow = browser.horizontal_overflow()
    finally:
        browser.close()
    assert "Can't connect to Server API" not in text
    assert shot.stat().st_size > 10_000
    for key, page in pages.items():
        assert not raw_floats(page), f"the {key} page shows unrounded numbers: {raw_floats(page)[:5]}"
    # The reason column is readable where it is: nothing on the compile matrix's page scrolls sideways.
    assert overflow == [], f"the compile matrix scrolls sideways: {overflow}"
    shown = " ".join(pages["compile-matrix"].split())
    for row in table_rows(tables["compile-matrix"]):
        assert " ".join(str(row["reason"]).split()) in shown, row
    with capsys.disabled():
        print(f"\nscreenshots of the flow run's Artifacts tab and its compile matrix: {shot}, {matrix_shot}")


def test_review_form_embeds_the_coverage_histogram_in_chromium(local_prefect, demo_root, tmp_path, capsys):
    """The Resume form a reviewer sees: the coverage report with its histogram as a picture (not a file path no
    browser opens), and what each decision means. The reviewer here rejects, so nothing is converted."""
    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run

    binary = chromium_path()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it where apt works)")
    cfg = write_config(tmp_path / "form", demo_root)
    run = run_deployment(CALIBRATE, parameters={"params": {"config": str(cfg), "poll_interval_s": 1}},
                         timeout=0, as_subflow=False)
    paused = wait_for(run.id, local_prefect, done=("PAUSED", "COMPLETED", "FAILED", "CRASHED"), timeout=180)
    assert paused.state.type.value == "PAUSED", f"{paused.state.name}: {paused.state.message}"
    keys = paused.state.state_details.run_input_keyset
    with client() as c:
        schema = json.loads(c.read_flow_run_input(run.id, keys["schema"]))
        description = c.read_flow_run_input(run.id, keys["description"])
    help_text = schema["properties"]["decision"].get("description", "")
    assert "approve:" in help_text and "reject:" in help_text, help_text
    assert "](data:image/png;base64," in description and "file://" not in description

    shot = SCREENSHOTS / f"flow-run-{paused.name}-review-form.png"
    browser = Chromium(binary)
    try:
        browser.goto(f"{local_prefect.url}/runs/flow-run/{run.id}")
        browser.wait_for_text([paused.name, "Paused", "Resume"])
        assert browser.click_text("Resume"), "the paused run has no Resume button"
        form = browser.wait_for_text(["Calibration set cal-", "Decision", "Reviewer", "Submit"])
        images = browser.dialog_images()
        browser.evaluate("document.querySelector('[role=dialog] img')?.scrollIntoView({block: 'center'})")
        browser.screenshot(shot)
    finally:
        browser.close()
        resume_flow_run(run.id, run_input={"decision": "reject", "reviewer": "ui-tests", "comment": "form check"})
    assert "approve: quantization may use" in form
    assert any(i["src"].startswith("data:image/png") and i["width"] > 100 for i in images), images
    assert_completed(wait_for(run.id, local_prefect), local_prefect)
    with capsys.disabled():
        print(f"\nscreenshot of the calibration review form: {shot}")


def test_build_of_an_approved_set_says_so_in_its_logs_and_an_artifact(local_prefect, converted):
    """Building again from the same captures selects the same, already approved, set: no review, and the run says
    why in its log and in a markdown artifact."""
    from prefect.deployments import run_deployment

    _, cfg = converted  # its store holds the set these captures give, approved by edgeq-tests
    run = run_deployment(CALIBRATE, parameters={"params": {"config": str(cfg), "poll_interval_s": 1}},
                         timeout=0, as_subflow=False)
    done = wait_for(run.id, local_prefect, timeout=180)
    assert_completed(done, local_prefect)
    logs = " ".join(logs_of(run.id, until="already approved by edgeq-tests"))
    assert "already approved by edgeq-tests" in logs, logs[-2000:]
    review = artifacts_of(run.id).get("calibration-review")
    assert review is not None and review.type == "markdown", sorted(artifacts_of(run.id))
    assert "is already approved" in review.data and "edgeq-tests" in review.data
