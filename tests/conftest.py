"""Shared fixtures: one Prefect test server per session, one demo build per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

# `make test` runs two pytest-xdist workers. Each gets its own share of the CPUs, set before torch (OpenMP), ONNX
# Runtime or OpenVINO load and inherited by the servers and workers it starts: every runtime then sizes its thread
# pool to that share. Unpinned, two workers' spinning thread pools on two cores slowed the demo build 30-fold.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKER.startswith("gw") and _WORKERS > 1 and hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    if len(_cpus) >= _WORKERS:
        _share = _cpus[int(_WORKER[2:]) % _WORKERS::_WORKERS]
        os.sched_setaffinity(0, _share)
        os.environ["OMP_NUM_THREADS"] = str(len(_share))

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="edgeq-tests-"))
# Before Prefect is imported anywhere: results of this session stay in this session.
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(_SESSION_TMP / "prefect-results"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))

from edgeq.core.quiet import quiet_environment  # noqa: E402
from tests import prebuild  # noqa: E402
from tests.prebuild import SMALL_WEIGHTS  # noqa: E402,F401 - re-exported: the tests import it from here

quiet_environment()

REPO = Path(__file__).resolve().parents[1]

# --- The demos, built once for all workers. Each xdist worker used to build both (35 s and 21 s on its one CPU)
# while the other built the same. The controller starts tests/prebuild.py for each, one per CPU, before the workers
# start (they inherit EDGEQ_TEST_PREBUILT), so the builds overlap the workers' start and collection; a worker's
# fixture waits for its .done file. Without xdist, or if a shared build fails, the fixture builds in its process.
_PREBUILDS: list = []
PREBUILD_TIMEOUT_S = 900


def pytest_configure(config):
    import subprocess
    import sys

    if (_WORKER or os.environ.get("EDGEQ_TEST_PREBUILT") or not getattr(config.option, "numprocesses", None)
            or config.option.collectonly):
        return
    folder = _SESSION_TMP / "prebuilt"
    folder.mkdir()
    workers = int(config.option.numprocesses)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for i, kind in enumerate(("digits", "text")):
        # On the CPUs and threads of worker gw{i} (the pinning at the top): a build that trains the same way as one
        # in a worker gives the same weights (test_demo compares them).
        share = cpus[i % workers::workers] if len(cpus) >= workers > 1 else cpus
        env = {**os.environ, "OMP_NUM_THREADS": str(len(share))} if share else dict(os.environ)
        with open(folder / f"{kind}.log", "wb") as log:
            _PREBUILDS.append(subprocess.Popen(
                [sys.executable, "-m", "tests.prebuild", kind, str(folder), ",".join(map(str, share))],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    os.environ["EDGEQ_TEST_PREBUILT"] = str(folder)


def pytest_unconfigure(config):
    for proc in _PREBUILDS:  # a run that needed no demo (-k, a single module) does not leave its build running
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _prebuilt(kind: str) -> Path | None:
    """The shared build of demo `kind` once it is done; None without one, or if it failed (its log says why)."""
    import time

    folder = os.environ.get("EDGEQ_TEST_PREBUILT")
    if not folder:
        return None
    deadline = time.monotonic() + PREBUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        done = Path(folder) / f"{kind}.done"
        if done.is_file():
            return Path(done.read_text())
        if (Path(folder) / f"{kind}.failed").is_file():
            return None
        time.sleep(0.5)
    return None


DEMO_YAML = REPO / "digits-demo.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API (temporary SQLite server), started once per test session."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    # Prefect's console handler keeps the stream it was created with: created inside a CliRunner invocation, it
    # writes to that invocation's stream after it closed, and the next invocation's flow fails with a RecursionError
    # in logging (seen when tests/test_convert_flow.py runs alone). Created here, it holds pytest's stream.
    ensure_logging_setup()
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_root() -> Path:
    """The demo data and weights (the demo's model and the small one, SMALL_WEIGHTS): the build every worker shares
    (tests/prebuild.py), else one built here."""
    return _prebuilt("digits") or prebuild.build("digits", _SESSION_TMP / "demo")


def write_config(folder: Path, demo_root: Path, _source: Path = DEMO_YAML, _built: str = ".edgeq/demo",
                 wide: bool = False, **overrides) -> Path:
    """A copy of a demo config (default: the digits demo's) in `folder`, pointing at the session's build of that
    demo and at a store in `folder`; top-level keys overridable (None removes one). The digits demo's model is the
    small one (SMALL_WEIGHTS, speed gate off) unless `wide`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(_source.read_text().replace(_built, str(demo_root)))
    if _source == DEMO_YAML and not wide:
        data["model"]["kwargs"]["hidden"] = 0
        data["model"]["weights"] = str(demo_root / SMALL_WEIGHTS)
        data["thresholds"]["int8_min_speedup"] = 0
    data["store"] = str(folder / "store")
    data["prepare_kwargs"] = {"root": str(demo_root)}
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    if _source == DEMO_YAML and not wide:  # thresholds replaced by an override: still no speed gate
        data.setdefault("thresholds", {}).setdefault("int8_min_speedup", 0)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def text_demo_root() -> Path:
    """The text demo's data and trained encoder (edgeq.demo_text), built once per session."""
    return _prebuilt("text") or prebuild.build("text", _SESSION_TMP / "text-demo")


def write_text_config(folder: Path, text_root: Path, **overrides) -> Path:
    """A copy of text-demo.yaml in `folder`, pointing at the session's text demo build (see write_config)."""
    return write_config(folder, text_root, REPO / "text-demo.yaml", ".edgeq/text-demo", **overrides)


@pytest.fixture(scope="session")
def demo_config_path(demo_root: Path) -> Path:
    return write_config(_SESSION_TMP / "demo-config", demo_root)


@pytest.fixture(scope="session")
def demo_cfg(demo_config_path: Path):
    from edgeq.tasks.config import load_prepared

    return load_prepared(demo_config_path)


@pytest.fixture(scope="session")
def demo_export(demo_cfg):
    """The demo model exported once per session (plain function, no Prefect)."""
    from edgeq.tasks.export import export_to_store

    return export_to_store(demo_cfg)


@pytest.fixture(scope="session")
def demo_onnx_path(demo_cfg, demo_export) -> Path:
    from edgeq.core.store import ArtifactStore

    return ArtifactStore(demo_cfg.store_url).local_path(demo_export.onnx)


def paused_review(store_url: str, timeout: float = 120):
    """The newest calibration version record once its build run is paused for review (polls the Prefect API)."""
    import time

    from prefect.client.orchestration import get_client

    from edgeq.calibration.versions import list_versions
    from edgeq.core.store import ArtifactStore

    store = ArtifactStore(store_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vs = list_versions(store)
        if vs and vs[0].review.flow_run_id:
            with get_client(sync_client=True) as client:
                if client.read_flow_run(vs[0].review.flow_run_id).state.is_paused():
                    return vs[0]
        time.sleep(0.3)
    raise AssertionError("the calibration flow never paused for review")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


# --- The bad-input catalogue's size in the summary (tests/reliability/test_bad_input_catalogue.py).
# A hook here, not in a tests/reliability/conftest.py: a second `conftest` module would shadow `from tests.conftest import`.
def pytest_terminal_summary(terminalreporter):
    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
               if getattr(r, "when", "") == "call" and "test_bad_input_catalogue.py::" in r.nodeid]
    if reports:
        passed = sum(r.passed for r in reports)
        terminalreporter.write_line(f"bad-input catalogue: {len(reports)} bad inputs checked, {passed} refused "
                                    "with their specific error and an unchanged store")


# --- The longest modules first. `make test` runs the suite on two processes, module by module (pytest-xdist,
# --dist loadfile, each module's fixtures built once); a long module that starts last would run alone at the end.
# xdist hands out modules in collection order only with --no-loadscope-reorder (the Makefile passes it): by default
# it reorders them by their number of tests, and the PostgreSQL module (4 tests, 5 minutes) then started last.
# Ordered by measured time (a full run on 2 CPUs, seconds per module in the comments).
LONG_MODULES_FIRST = (
    "tests/scaleout/test_postgres_workers.py",  # 327
    "tests/deployments/test_deployments.py",  # 237
    "tests/reliability/test_crash_and_concurrency.py",  # 112
    "tests/test_text_demo_pipeline.py",  # 79
    "tests/test_convert_flow.py",  # 57
    "tests/reliability/test_scale_out.py",  # 54
    "tests/reliability/test_bad_input_catalogue.py",  # 44
    "tests/quantization/test_escalation.py",  # 44
    "tests/quantization/test_multi_input.py",  # 40 with the SmoothQuant tests (21 before them)
    "tests/test_validate.py",  # 37
    "tests/reliability/test_faults.py",  # 36
    "tests/test_demo_text.py",  # 31
    "tests/calibration/test_calibration_flow.py",  # 26
    "tests/test_cli.py",  # 25
    "tests/test_demo.py",  # 22
)


def pytest_collection_modifyitems(session, config, items):
    rank = {m: i for i, m in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: two workers, one per CPU share (see the pinning at the top); one where only one CPU is ours."""
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
