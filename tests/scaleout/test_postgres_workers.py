"""Scale-out on Prefect's own engine, for real: PostgreSQL, a Prefect server on it, a process pool, two workers.

One rig for the module (edgeq.benchmarks.localpool), set up with the commands of README "Scale-out":
- a throw-away PostgreSQL cluster on a free loopback port (as the `postgres` account when the tests run as root:
  PostgreSQL refuses to run as root), and `prefect server start` on it (PREFECT_API_DATABASE_CONNECTION_URL);
- the process pool `edgeq-process`, the convert deployment of deployments/prefect.yaml with its concurrency limit
  raised to the number of workers, and the crashed-run automation of deployments/crashed-runs.yaml;
- two workers, separate processes with their own PREFECT_HOME, one flow run at a time each (`--limit 1`), sharing
  one edgeq store (which holds Prefect's task results and cache records too) and one PREFECT_LOCAL_STORAGE_PATH.

Then: conversions submitted at once through the deployment, re-submissions, a worker SIGKILLed mid-conversion, and
PostgreSQL stopped for a few seconds mid-run. Every conversion is a different model (the demo CNN's weights with a
little seeded noise): a cache hit or a bundle can then only come from the run that made it, so "lost" and
"executed twice" are visible. The same config submitted N times would make the N runs race for one bundle, which
tests/reliability covers.
"""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from edgeq.benchmarks.localpool import REPO, Postgres, PrefectServer, postgres_bin
from tests.conftest import SMALL_WEIGHTS
from tests.reliability.rel_helpers import copy_store, fast_config, seed, snapshot, verify_store

pytestmark = pytest.mark.timeout(900)  # the first test also waits for the rig and the batch

POOL = "edgeq-process"
WORKERS = ("scaleout-a", "scaleout-b")
BATCH = 4  # conversions submitted at once: two per worker
HEARTBEAT_S = 30  # flow-run heartbeats (Prefect's minimum); the crashed-run automation watches for them
NO_HEARTBEAT_S = 50  # the automation's `within`, tightened from the shipped 90 s to keep this module short
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
STAGES = ("export", "compile-check", "quantize", "validate", "publish")


def convert_deployment_name() -> str:
    """The convert deployment's name in deployments/prefect.yaml (read fresh: names there may change)."""
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    return next(d["name"] for d in spec["deployments"] if d["entrypoint"].endswith("flows.convert:convert_model"))


def seeded_weights(demo_root: Path, folder: Path, seed_: int) -> Path:
    """The demo CNN's weights with a little seeded noise: another model (every cache key and bundle differs), the
    same accuracy and the same cost to convert. Training one from each seed instead crawled on a loaded 2-core box."""
    import safetensors.torch
    import torch

    weights = safetensors.torch.load_file(str(demo_root / SMALL_WEIGHTS))
    gen = torch.Generator().manual_seed(seed_)
    noisy = {k: (v + 1e-3 * v.std() * torch.randn(v.shape, generator=gen)).contiguous()
             if v.is_floating_point() and v.numel() > 1 else v for k, v in weights.items()}
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"digits-seed{seed_}.safetensors"
    safetensors.torch.save_file(noisy, out)
    return out


@dataclass
class Rig:
    pg: Postgres
    server: PrefectServer
    store: Path
    version: str
    deployment: UUID
    configs: list[Path] = field(default_factory=list)

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.server.api)

    def submit(self, cfg: Path) -> UUID:
        """What `prefect deployment run <convert deployment> --param params=...` does."""
        with self.client() as c:
            run = c.create_flow_run_from_deployment(
                self.deployment, parameters={"params": {"config": str(cfg), "calibration": self.version}})
        return run.id

    def wait(self, run_ids: list[UUID], timeout: float = 300, done=TERMINAL) -> dict[UUID, object]:
        deadline, out = time.monotonic() + timeout, {}
        with self.client() as c:
            while True:
                for rid in run_ids:
                    run = c.read_flow_run(rid)
                    if run.state and run.state.type.value in done:
                        out[rid] = run
                if len(out) == len(run_ids):
                    return out
                if time.monotonic() > deadline:
                    states = {str(r): c.read_flow_run(r).state.name for r in run_ids if r not in out}
                    raise AssertionError(f"runs not finished after {timeout:.0f}s: {states}\n{self.logs()}")
                time.sleep(1)

    def task_runs(self, run_id: UUID, settle: float = 0) -> list:
        """The flow run's task runs; with `settle`, waiting up to that long for every one to reach a final state.

        The server records task run states from the events the flow run sends, after the fact (its task run
        recorder retries what it could not write): a finished flow run's last task may still read Running.
        """
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        deadline = time.monotonic() + settle
        with self.client() as c:
            while True:
                runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
                if time.monotonic() >= deadline or all(t.state and t.state.is_final() for t in runs):
                    return runs
                time.sleep(1)

    def worker_of(self, run_id: UUID, timeout: float = 30) -> str:
        """The one worker that ran a flow run.

        Every idle worker may pick up a scheduled run and log "Worker 'NAME' submitting flow run"; the server lets
        one of them move it to Pending and answers the others with an abort ("Aborted submission of flow run").
        Read back from the API (the flow run's logs in the UI): N submissions, N - 1 aborts; the worker that ran it
        is the one whose own log has its submission and no abort.
        """
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:  # the workers send their logs in batches
                messages = [log.message for log in
                            c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]
                submitted = [m.group(1) for msg in messages
                             if (m := re.match(r"Worker '([^']+)' submitting flow run", msg))]
                aborted = sum(msg.startswith("Aborted submission of flow run") for msg in messages)
                if (submitted and len(submitted) - aborted == 1) or time.monotonic() > deadline:
                    break
                time.sleep(1)
        assert submitted and len(submitted) - aborted == 1, \
            f"flow run {run_id}: submitted by {submitted}, {aborted} aborted: it ran {len(submitted) - aborted} times"
        ran = self.server.ran_by(run_id)
        assert len(ran) == 1 and ran[0] in submitted, f"worker logs: {ran} ran {run_id}; the API: {submitted}"
        return ran[0]

    def times_running(self, run_id: UUID) -> int:
        """How often the flow run entered Running, from its state history on the server."""
        with self.client() as c:
            return sum(s.type.value == "RUNNING" for s in c.read_flow_run_states(run_id))

    def bundle_of(self, run_id: UUID, timeout: float = 30) -> str:
        """The bundle a conversion ended with, from its flow run's log line "published <id> at <uri>" (a re-run that
        finds its bundle in place logs it too, without a second "published-bundle" artifact or event)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        deadline = time.monotonic() + timeout
        while True:  # logs reach the API shortly after the run's state
            with self.client() as c:
                logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            found = {m for log in logs for m in re.findall(r"published (bundle-[0-9a-f]{20}) at", log.message)}
            if found or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(found) == 1, f"flow run {run_id}: published {found or 'nothing'}"
        return found.pop()

    def start_worker(self, name: str) -> None:
        self.server.worker(name, pool=POOL, limit=1)

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.server.tail(n, 40)}" for n in ("server", *WORKERS))


def task_states(task_runs) -> dict[str, str]:
    """Task run name -> state name, for one flow run (whose task run names are unique: one per stage and target)."""
    names = [t.name for t in task_runs]
    assert len(names) == len(set(names)), f"a task ran twice: {sorted(names)}"
    return {t.name: t.state.name if t.state else "no state recorded" for t in task_runs}


def of(states: dict[str, str], prefix: str) -> list[str]:
    found = [s for name, s in sorted(states.items()) if name.startswith(prefix)]
    assert found, f"no {prefix!r} task in {sorted(states)}"
    return found


@pytest.fixture(scope="module")
def rig(tmp_path_factory, demo_root):
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl, postgres) are not installed: not on PATH, not "
                    "under /usr/lib/postgresql/*/bin, EDGEQ_PG_BIN unset (Debian: apt-get install postgresql)")
    folder = tmp_path_factory.mktemp("scaleout")
    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, folder / "shared-store")  # the one edgeq store every worker uses
    configs = [fast_config(folder / f"model-{i}", demo_root, store=store,
                           model={"weights": str(seeded_weights(demo_root, folder / "weights", 100 + i))})
               for i in range(BATCH + 3)]
    t0 = time.monotonic()
    pg = Postgres()
    server = PrefectServer(folder / "prefect", database_url=pg.url, results=folder / "shared-results",
                           worker_env={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
                                       # While PostgreSQL is down the server answers 500 (a refused connection is
                                       # not among the errors it maps to 503); without this, a flow run that
                                       # talks to the API then fails, and cannot even record that it failed.
                                       "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"})
    try:
        pg.start()
        server.start()
        server.cli("work-pool", "create", POOL, "--type", "process")
        for w in WORKERS:
            server.worker(w, pool=POOL, limit=1)
        name = convert_deployment_name()
        automation = yaml.safe_load((REPO / "deployments" / "crashed-runs.yaml").read_text())
        automation["trigger"]["within"] = NO_HEARTBEAT_S
        (folder / "crashed-runs.yaml").write_text(yaml.safe_dump(automation))
        with ThreadPoolExecutor(2) as ex:  # each `prefect` command takes seconds to start: side by side
            done = [
                # prefect.yaml runs one conversion at a time; a pool of K workers needs K at once.
                ex.submit(server.cli, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", name,
                          "--concurrency-limit", str(len(WORKERS)), "--collision-strategy", "ENQUEUE"),
                ex.submit(server.cli, "automation", "create", "--from-file", str(folder / "crashed-runs.yaml")),
            ]
            for f in done:
                f.result()
        server.wait_for_workers(POOL, WORKERS)
        print(f"rig ready in {time.monotonic() - t0:.0f} s (PostgreSQL, server, pool, deployment, 2 workers)")
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with SyncPrefectClient(server.api) as c:
            (dep,) = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        yield Rig(pg=pg, server=server, store=store, version=version, deployment=dep.id, configs=configs)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n--- postgres ---\n{pg.tail()}\n"
                           + "\n".join(f"--- {n} ---\n{server.tail(n)}" for n in ("server", *WORKERS))) from exc
    finally:
        server.close()
        pg.close()


@pytest.fixture(scope="module")
def batch(rig):
    """BATCH different conversions submitted at once through the convert deployment, and how they ended."""
    t0 = time.monotonic()
    ids = [rig.submit(c) for c in rig.configs[:BATCH]]
    runs = rig.wait(ids, timeout=420)
    return ids, runs, time.monotonic() - t0


def test_conversions_submitted_at_once_run_once_each_on_both_workers(rig, batch):
    ids, runs, seconds = batch
    failed = {str(r): f"{runs[r].state.name}: {runs[r].state.message}" for r in ids
              if runs[r].state.type.value != "COMPLETED"}
    assert not failed, f"{failed}\n{rig.logs()}"
    assert all(runs[r].run_count == 1 and rig.times_running(r) == 1 for r in ids), \
        {str(r): (runs[r].run_count, rig.times_running(r)) for r in ids}
    workers = [rig.worker_of(r) for r in ids]
    assert sorted(set(workers)) == sorted(WORKERS), f"runs went to {workers}"
    for r in ids:  # every stage ran exactly once, nothing came from a cache: each model is new
        tasks = rig.task_runs(r, settle=30)
        states = task_states(tasks)
        assert set(states.values()) == {"Completed"} and all(t.run_count == 1 for t in tasks), states
        assert all(of(states, s) for s in STAGES)
    bundles = [rig.bundle_of(r) for r in ids]
    assert len(set(bundles)) == BATCH, bundles
    checked = verify_store(rig.store)  # every object matches its sha256; every bundle file matches its manifest
    assert checked["bundles"] == BATCH
    assert sorted(p.name for p in (rig.store / "bundles").iterdir()) == sorted(bundles)
    print(f"{BATCH} conversions on {len(WORKERS)} workers: {seconds:.0f} s, workers {workers}")


def test_resubmissions_hit_the_cache_on_either_worker(rig, batch):
    ids, _, _ = batch
    before = {k: h for k, h in snapshot(rig.store).items() if k.startswith("bundles/")}
    again = [rig.submit(c) for c in rig.configs[:2]]  # two at once: one per worker (each runs one at a time)
    runs = rig.wait(again, timeout=240)
    assert all(runs[r].state.type.value == "COMPLETED" for r in again), {str(r): runs[r].state.name for r in again}
    assert sorted(rig.worker_of(r) for r in again) == sorted(WORKERS)
    for r, first in zip(again, ids):
        states = task_states(rig.task_runs(r, settle=30))
        # Every stage a cache hit; publishing finds its bundle in place (it has no cache of its own to hit).
        assert {n: s for n, s in states.items() if not n.startswith("publish")} == dict.fromkeys(
            [n for n in states if not n.startswith("publish")], "Cached"), states
        assert rig.bundle_of(r) == rig.bundle_of(first)
    after = {k: h for k, h in snapshot(rig.store).items() if k.startswith("bundles/")}
    assert after == before  # the bundles were found, not written again


def _wait_for_stage(rig: Rig, run_id: UUID, prefix: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(t.name.startswith(prefix) and t.state and t.state.type.value == "RUNNING" for t in rig.task_runs(run_id)):
            return
        time.sleep(0.3)
    raise AssertionError(f"no {prefix!r} task of {run_id} ran within {timeout}s\n{rig.logs()}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkilled_machine_run_is_marked_crashed_and_the_other_worker_resumes_from_cache(rig, batch):
    """SIGKILL while a worker's flow run quantizes: the worker's process group and the flow run's, as when its
    machine dies (the process worker starts each flow run in a session of its own, so a SIGKILL of the worker's group
    alone would leave the run going). Nobody is left to report the run: the crashed-run automation marks it Crashed
    once its heartbeats stop, while a re-submission resumes it from cache on the other worker."""
    cfg = rig.configs[BATCH]
    bundles_before = {p.name for p in (rig.store / "bundles").iterdir()}
    run_id = rig.submit(cfg)
    _wait_for_stage(rig, run_id, "quantize")  # mid-conversion: export and compile checks are done and cached
    victim = rig.worker_of(run_id)
    survivor = next(w for w in WORKERS if w != victim)
    with rig.client() as c:
        flow_pid = int(c.read_flow_run(run_id).infrastructure_pid)
    rig.server.stop_process(victim, signal.SIGKILL)
    restarted = None
    try:
        deadline = time.monotonic() + 10
        while alive(flow_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(flow_pid), "the killed machine's flow run is still running"
        verify_store(rig.store)  # nothing half-written under a final name
        again = rig.submit(cfg)
        resumed = rig.wait([again], timeout=240)[again]
        assert resumed.state.type.value == "COMPLETED", f"{resumed.state.message}\n{rig.logs()}"
        assert rig.worker_of(again) == survivor
        # The machine comes back while the automation is still to mark the killed run (up to NO_HEARTBEAT_S after
        # its last heartbeat): the worker's start overlaps that wait. Nothing is queued for it to take.
        restarted = time.time()
        rig.start_worker(victim)
        states = task_states(rig.task_runs(again, settle=30))
        assert of(states, "export") == ["Cached"] and set(of(states, "compile-check")) == {"Cached"}, states
        assert of(states, "quantize") == ["Completed"], states  # the stage the kill cut short runs again
        assert of(states, "publish") == ["Completed"], states
        killed = rig.wait([run_id], timeout=HEARTBEAT_S + NO_HEARTBEAT_S + 60)[run_id]
        assert killed.state.type.value == "CRASHED", f"{killed.state.name}: {killed.state.message}"
        verify_store(rig.store)  # every object and bundle file matches its sha256: nothing half-written
        assert {p.name for p in (rig.store / "bundles").iterdir()} - bundles_before == {rig.bundle_of(again)}
    finally:
        if restarted is None:
            restarted = time.time()
            rig.start_worker(victim)
        rig.server.wait_for_workers(POOL, WORKERS, since=restarted)


def _wait_until_converting(rig: Rig, run_ids: list[UUID], timeout: float = 240) -> None:
    """Until every run is Running (its process started and talks to the API) and one has its first task recorded
    (it has imported edgeq and begun converting: about 15 s of work are left), failing if one ends first. Not a
    task's Running state: the server records task states from the flow run's events, and polling may see a short
    task Completed at once."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with rig.client() as c:
        while time.monotonic() < deadline:
            states = {r: c.read_flow_run(r).state.type.value for r in run_ids}
            ended = {str(r): s for r, s in states.items() if s in TERMINAL}
            assert not ended, f"runs ended before the outage: {ended}"
            tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(run_ids))))
            begun = {t.flow_run_id for t in tasks}
            if all(s == "RUNNING" for s in states.values()) and begun & set(run_ids):
                return
            time.sleep(0.3)
    raise AssertionError(f"runs not converting within {timeout}s: {states}\n{rig.logs()}")


def test_database_outage_mid_run_is_ridden_out_and_each_model_is_published_once(rig, batch):
    """PostgreSQL stopped (`pg_ctl stop -m fast`: every connection cut) for 5 s while two conversions run, one per
    worker, then started again on the same data and port.

    While the database refuses connections the server answers 500, which Prefect's clients retry only when told to
    (PREFECT_CLIENT_RETRY_EXTRA_CODES=500, on the workers here and in README "Scale-out"). Observed without it: each
    flow run's next API call (setting a state) failed and its process exited 1; one run was reported Crashed by
    its worker ("Process exited with status code: 1") once the database was back, the other, whose report failed
    too, by the crashed-run automation from its missing heartbeats.
    """
    cfgs = rig.configs[BATCH + 1:BATCH + 3]
    bundles_before = {p.name for p in (rig.store / "bundles").iterdir()}
    ids = [rig.submit(c) for c in cfgs]
    _wait_until_converting(rig, ids)
    rig.pg.stop("fast")
    assert not rig.pg.is_ready()
    time.sleep(5)
    rig.pg.start()
    back = time.time()
    runs = rig.wait(ids, timeout=300)
    outcome = {str(r): f"{runs[r].state.name}: {runs[r].state.message}" for r in ids}
    assert all(runs[r].state.type.value == "COMPLETED" for r in ids), f"{outcome}\n{rig.logs()}"
    assert all(rig.times_running(r) == 1 for r in ids), outcome  # ridden out, not restarted
    assert sorted(rig.worker_of(r) for r in ids) == sorted(WORKERS)
    for r in ids:
        # The server records task runs from the events a flow run sends; events sent around the outage can be lost
        # (seen in a clean-clone CI run: a completed run's record lacked its publish task). What must hold: no task
        # recorded in another state (none failed or retried; names are unique per run). That each model was
        # published once is read from the store below, not from the event record.
        states = task_states(rig.task_runs(r, settle=60))
        assert states and set(states.values()) == {"Completed"}, states
    bundles = {rig.bundle_of(r) for r in ids}
    verify_store(rig.store)
    assert len(bundles) == 2 and {p.name for p in (rig.store / "bundles").iterdir()} - bundles_before == bundles
    assert rig.server.procs["server"].poll() is None and rig.server.healthy()
    rig.server.wait_for_workers(POOL, WORKERS, since=back)  # both workers lived through it and are heard from
    assert all(rig.server.procs[w].poll() is None for w in WORKERS)
