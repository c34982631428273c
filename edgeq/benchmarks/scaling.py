"""Scaling benchmark: N conversions on 1 vs 2 workers, each worker on a CPU of its own with one compute thread.

    python -m edgeq.benchmarks.scaling [--sizes 2 4 8] [--rounds 3] [--paths workpool dask] [--root .edgeq/demo]

A conversion is the same work on both paths: the `fanout` flow's tasks for one model (export with its parity gate
and dynamic-shape probe; compile check on ONNX Runtime, OpenVINO and a declared profile; INT8 PTQ from an approved
calibration version, FP32 vs INT8 on the validation data, batch-1 latencies). The model is ResNet-18's layout at
3x64x64 (edgeq.benchmarks.quantization.ResNet18) on the demo digits upscaled to 64x64, with random weights from a
seed per model (BatchNorm statistics taken from the data), so N models are N different conversions; every
measurement writes to a fresh store, so nothing is a cache hit. The INT8 SLA is relaxed (random weights: this
measures throughput, not accuracy).

Paths, both against one Prefect server on a throw-away PostgreSQL (edgeq.benchmarks.localpool):
- workpool: a process pool and two `prefect worker start --limit 1` processes, A on the first CPU, B on the second;
  a deployment of `fanout`; N flow runs of one model each, sent to the queue `solo` (only A polls it: 1 worker) or
  `pair` (both poll it: 2 workers). The time includes each flow run's process start (a fresh Python importing
  torch, ONNX Runtime and OpenVINO): that is what a flow run on a process worker costs.
- dask: `fanout` over the N models in this process, its tasks on a `distributed.LocalCluster` of 1 or 2
  single-threaded worker processes, the first on the first CPU, the second on the second; the workers are warm (one
  untimed run first), as long-lived Dask workers are.
Every worker process: one CPU (sched_setaffinity, inherited by what it starts), OMP/MKL/OpenBLAS threads 1 (torch
takes its thread count from OMP_NUM_THREADS), targets with `threads: 1` (ONNX Runtime intra-op threads, OpenVINO
inference threads). The server, PostgreSQL and this process are not pinned: they share the CPUs with the workers,
and the report gives the CPU time they took per conversion.

What 2 workers can gain depends on the machine as much as on edgeq: a machine check before and after times two
pinned single-threaded loops side by side against one alone, one in cache (compute) and one streaming 64 MB
(memory bandwidth). And each round measures the same work with no orchestration at all: one conversion as plain
function calls in a pinned single-threaded process, alone, then two side by side (one per CPU): what two workers could
gain at best on this machine for this work (`conversion_ceiling`). Rounds interleave sizes, paths and worker counts,
so drift on a shared machine hits all alike; the report gives each cell's median and range (min-max) over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeq.core.quiet import quiet_environment

SIZE = 64  # the default image side (--size)
POOL = "edgeq-scaling"
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TASKS_PER_MODEL = 5  # export, compile check x3, quantize
RESERVE_S = 60  # kept from a time budget for the machine check after the runs and the shutdown


# ---------------------------------------------------------------- the model, its data, its configs
def _dataset(root: Path, out: Path, size: int) -> Path:
    """The demo's validation, test and capture pool upscaled to 3 x size x size uint8 (the capture metadata as is)."""
    from edgeq.benchmarks.quantization import upscaled_dataset

    return upscaled_dataset(root, out, size)


def _weights(data: Path, folder: Path, seed: int) -> Path:
    """ResNet-18 with random weights from `seed`; BatchNorm running statistics from a few batches of the data
    (with the initial ones, mean 0 and variance 1, activations grow block after block)."""
    import numpy as np
    import safetensors.torch
    import torch

    from edgeq.benchmarks.quantization import ResNet18

    path = folder / f"resnet18-seed{seed}.safetensors"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = ResNet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    x = torch.from_numpy(np.load(data / "validation.npz")["x"][:128].astype(np.float32) / 255.0)
    model.train()
    with torch.no_grad():
        for batch in x.split(32):
            model(batch)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.eval().state_dict().items()}, path)
    return path


def _config(data: Path, folder: Path, store: Path, seed: int, weights: Path, size: int) -> Path:
    import yaml

    arrays = {split: {"kind": "arrays", "path": str(data / f"{split}.npz")} for split in ("validation", "test")}
    cfg = {
        "name": f"scaling-resnet18-{seed}", "store": str(store),
        "model": {"name": f"resnet18-{size}", "factory": "edgeq.benchmarks.quantization:ResNet18",
                  "kwargs": {"num_classes": 10}, "weights": str(weights),
                  "inputs": [{"name": "image", "shape": ["batch", 3, size, size]}], "outputs": ["logits"],
                  "example_dims": {"batch": 2}, "metric": "top1"},
        "targets": [{"name": "ort-cpu", "backend": "onnxruntime", "threads": 1},
                    {"name": "openvino-cpu", "backend": "openvino", "threads": 1},
                    {"name": "hailo8-declared", "backend": "declared", "profile": "hailo8-example",
                     "precision": "int8", "required": False}],
        "data": {"preprocess": {"scale": 1 / 255}, **arrays,
                 "captures": {"path": str(data / "captures" / "pool.npz"),
                              "metadata": str(data / "captures" / "metadata.csv"),
                              "strata": ["lighting", "camera", "time_of_day"], "target_size": 128, "min_size": 64}},
        "thresholds": {"int8_max_drop": 1.0},
        "quantization": {"mode": "ptq", "latency_iters": 10},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Models:
    """Configs of N different models on a fresh copy of a store holding the approved calibration version.

    Model i is the same in every measurement; the fresh store is what makes it a new conversion: every cache key
    holds the store's URL, and Prefect's results live in the store.
    """

    def __init__(self, root: Path, work: Path, size: int = SIZE):
        from edgeq.calibration.versions import record_decision
        from edgeq.core.store import ArtifactStore
        from edgeq.tasks.calibration import build_calibration_candidate
        from edgeq.tasks.config import load_prepared

        self.work, self.size = work, size
        self.data = _dataset(root, work / "data", size)
        self.seed_store = work / "seed-store"
        cfg = load_prepared(_config(self.data, work / "seed", self.seed_store, 0, _weights(self.data, work / "w", 0),
                                   size))
        self.version = build_calibration_candidate(cfg).version.version
        record_decision(ArtifactStore(cfg.store_url), self.version, approve=True, reviewer="scaling-benchmark",
                        comment="benchmark only")

    def fresh(self, n: int, label: str) -> list[str]:
        """Configs of models 1..N on a fresh store: nothing there converted yet."""
        store = self.work / f"store-{label}"
        shutil.copytree(self.seed_store, store)
        return [str(_config(self.data, self.work / f"cfg-{label}", store, s, _weights(self.data, self.work / "w", s),
                            self.size)) for s in range(1, n + 1)]


# ---------------------------------------------------------------- pinning
def pin_this_process(cpu: int) -> dict[str, Any]:
    """Pin every thread of the calling process to `cpu` and torch to one thread (run inside a Dask worker)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except OSError:  # a thread that just ended
            pass
    import torch

    torch.set_num_threads(1)
    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}


def cpus_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


_LOOP = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
import numpy as np
kind, seconds = sys.argv[2], float(sys.argv[3])
if kind == "compute":  # fits in a core's own cache: arithmetic only
    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    step = lambda: a @ a
else:  # 64 MB: far larger than the caches, every pass goes to memory
    src = np.ones(8 * 2**20)
    dst = np.empty_like(src)
    step = lambda: np.copyto(dst, src)
n, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    step()
    n += 1
print(n)
"""


def machine_check(cpus: list[int], seconds: float = 5.0) -> dict[str, float]:
    """What this machine gives two pinned single-threaded workers, as the speed-up of two loops side by side (one per
    CPU) over one alone: `compute` (a matrix product in cache) and `memory` (copying 64 MB). Two vCPUs that share a
    core, a busy host or a shared memory bus give less than 2x; a conversion is partly each."""
    import subprocess
    import sys

    def loops(kind: str, on: list[int]) -> list[int]:
        env = {**os.environ, **SINGLE_THREAD_ENV}
        procs = [subprocess.Popen([sys.executable, "-c", _LOOP, str(c), kind, str(seconds)], stdout=subprocess.PIPE,
                                  text=True, env=env) for c in on]
        return [int(p.communicate()[0]) for p in procs]

    return {kind: sum(loops(kind, cpus[:2])) / loops(kind, cpus[:1])[0] for kind in ("compute", "memory")}


def machine_description(cpus: list[int]) -> str:
    """The CPU line of the report: model, ISA flags that matter for INT8, and whether the CPUs the workers are pinned
    to are cores of their own or SMT siblings of one core (as the kernel sees them: a virtual machine's vCPUs may
    still share a host core)."""
    from edgeq.core.platform import cpu_isa

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")

    def siblings(c: int) -> str:
        try:
            return Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            return "?"

    isa = cpu_isa()
    virtual = " (virtual machine: hypervisor flag)" if "hypervisor" in Path("/proc/cpuinfo").read_text() else ""
    return (f"CPU: {model}, {isa['machine']}, ISA {' '.join(isa['isa'])}; workers on CPUs {cpus[0]} and {cpus[1]}, "
            f"SMT siblings {siblings(cpus[0])} / {siblings(cpus[1])}{virtual}; {os.cpu_count()} CPUs in all")


def orchestration_cpu(server, pg) -> float:
    """CPU seconds spent so far by what orchestrates rather than converts: the Prefect server, PostgreSQL, and this
    process (the Dask path's flow and scheduler run here; the work pool path only polls from here)."""
    from edgeq.benchmarks.localpool import cpu_seconds

    own = os.times()
    return (cpu_seconds(server.procs["server"].pid) + (cpu_seconds(pg.pid) if pg.pid else 0.0)
            + own.user + own.system)


def plain_conversion(config: str, version: str) -> None:
    """One model's fan-out work as plain function calls in this process, no Prefect: export (parity gate, shape
    probe), compile check on every target, INT8 quantization. Prints each stage's seconds as JSON."""
    import json

    t0 = time.perf_counter()
    from edgeq.tasks.compile_check import check_target
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store
    from edgeq.tasks.quantize import quantize_to_store

    t1 = time.perf_counter()
    cfg = load_prepared(config)
    exported = export_to_store(cfg)
    t2 = time.perf_counter()
    for target in cfg.targets:
        check_target(exported.onnx, target, cfg.store_url)
    t3 = time.perf_counter()
    quantize_to_store(cfg, exported.onnx, version, exported.report.opset, log=lambda *a: None)
    print(json.dumps({"import": t1 - t0, "export": t2 - t1, "check": t3 - t2, "quantize": time.perf_counter() - t3}))


def conversion_ceiling(models: "Models", cpus: list[int], label: str) -> tuple[float, str]:
    """Conversions as plain functions (`plain_conversion`), each in a fresh process on a CPU of its own with one
    thread: one alone, then two side by side. The throughput of two over one, 2 x alone / side by side: what two
    workers could gain at most for this work on this machine, with nothing orchestrating. And a line of the stages'
    seconds, alone and side by side."""
    import json
    import subprocess
    import sys

    env = {**os.environ, **SINGLE_THREAD_ENV}

    def side_by_side(configs: list[str]) -> tuple[float, list[dict[str, float]]]:
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", "import sys; from edgeq.benchmarks.scaling import "
                                   "plain_conversion; plain_conversion(sys.argv[1], sys.argv[2])", c, models.version],
                                  env=env, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}))
                 for cpu, c in zip(cpus, configs)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a plain conversion failed (exit {[p.returncode for p in procs]})")
        return time.perf_counter() - t0, [json.loads(o.strip().splitlines()[-1]) for o in outs]

    alone, stages_alone = side_by_side(models.fresh(1, f"plain-{label}-1"))
    pair, stages_pair = side_by_side(models.fresh(2, f"plain-{label}-2"))

    def fmt(stages: dict[str, float]) -> str:
        return " ".join(f"{k} {v:.1f}" for k, v in stages.items())

    return 2 * alone / pair, (f"alone {alone:.1f} s [{fmt(stages_alone[0])}], side by side {pair:.1f} s "
                              f"[{fmt(stages_pair[0])}] [{fmt(stages_pair[1])}]")


# ---------------------------------------------------------------- the two paths
class WorkPoolPath:
    name = "workpool"

    def __init__(self, work: Path, cpus: list[int]):
        from edgeq.benchmarks.localpool import Postgres, PrefectServer

        self.pg = Postgres().start()
        self.server = PrefectServer(work / "prefect", database_url=self.pg.url, results=work / "results",
                                    worker_env=SINGLE_THREAD_ENV).start()
        s = self.server
        s.cli("work-pool", "create", POOL, "--type", "process")
        for q in ("solo", "pair"):
            s.cli("work-queue", "create", q, "--pool", POOL)
        deploy_dir = work / "deploy"  # no prefect.yaml here: the deployment is this command's alone
        deploy_dir.mkdir()
        s.cli("deploy", "edgeq.flows.fanout:fanout", "--name", "scaling", "--pool", POOL, cwd=deploy_dir)
        s.worker("worker-a", POOL, queues=["solo", "pair"], limit=1, cpu=cpus[0])
        s.worker("worker-b", POOL, queues=["pair"], limit=1, cpu=cpus[1])
        s.wait_for_workers(POOL, ["worker-a", "worker-b"])
        self.pinning = {w: cpus_of(s.procs[w].pid) for w in ("worker-a", "worker-b")}
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with SyncPrefectClient(s.api) as c:
            (dep,) = c.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scaling"])))
        self.deployment = dep.id

    def measure(self, configs: list[str], version: str, workers: int) -> tuple[float, float]:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        from edgeq.flows.fanout import FanoutParams

        queue = "solo" if workers == 1 else "pair"
        cpu0 = orchestration_cpu(self.server, self.pg)
        with SyncPrefectClient(self.server.api) as c:
            t0 = time.time()
            ids = [c.create_flow_run_from_deployment(
                self.deployment, work_queue_name=queue,
                parameters={"params": FanoutParams(configs=[cfg], stage="quantize", calibration=version,
                                                   runner="thread").model_dump()}).id for cfg in configs]
            runs = {}
            while len(runs) < len(ids):  # one light request a second: the server's CPU is shared with the workers
                time.sleep(1)
                runs = {r.id: r for r in c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
                        if r.state and r.state.is_final()}
            bad = [f"{r.name}: {r.state.name} {r.state.message}" for r in runs.values() if not r.state.is_completed()]
            if bad:
                raise SystemExit(f"workpool: runs failed: {bad}\n{self.server.tail('worker-a')}")
            _all_computed(c, ids, TASKS_PER_MODEL * len(ids))
        # Who ran what, when (seconds from submission): the evidence that 2 workers did run side by side.
        spans = sorted((",".join(self.server.ran_by(r.id)), r.start_time.timestamp() - t0, r.end_time.timestamp() - t0)
                       for r in runs.values())
        self.last = "  ".join(f"{w} {a:.0f}-{b:.0f}s" for w, a, b in spans)
        return max(r.end_time.timestamp() for r in runs.values()) - t0, orchestration_cpu(self.server, self.pg) - cpu0

    def close(self) -> None:
        self.server.close()
        self.pg.close()


class DaskPath:
    name = "dask"

    def __init__(self, pool: WorkPoolPath, cpus: list[int]):
        import logging
        import warnings

        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.WARNING)  # its import set its own levels

        self.pool, self.api = pool, pool.server.api
        self.clusters, self.pinning = {}, {}
        for w in (1, 2):
            # Loopback only, no dashboard: a local cluster serves nobody else.
            with warnings.catch_warnings():
                # No dashboard; the scheduler's HTTP server (health, metrics) still listens, on 127.0.0.1:8787 for
                # the first cluster and, with a warning, another port for the second.
                warnings.filterwarnings("ignore", message="Port 8787 is already in use")
                cluster = LocalCluster(n_workers=w, processes=True, threads_per_worker=1, host="127.0.0.1",
                                       dashboard_address=None, env=SINGLE_THREAD_ENV, silence_logs=logging.WARNING)
            with Client(cluster) as client:
                for i, addr in enumerate(sorted(client.scheduler_info()["workers"])):
                    self.pinning[f"{w}-worker cluster, worker {i}"] = client.run(pin_this_process, cpus[i],
                                                                                workers=[addr])[addr]
            self.clusters[w] = cluster

    def measure(self, configs: list[str], version: str, workers: int) -> tuple[float, float]:
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from edgeq.flows.fanout import FanoutParams, run_fanout

        cpu0 = orchestration_cpu(self.pool.server, self.pool.pg)
        with temporary_settings({PREFECT_API_URL: self.api}):
            t0 = time.perf_counter()
            state = run_fanout(FanoutParams(configs=configs, stage="quantize", calibration=version, runner="dask",
                                            address=self.clusters[workers].scheduler_address), return_state=True)
            dt = time.perf_counter() - t0
            if not state.is_completed():
                raise SystemExit(f"dask: fan-out failed: {state.message}")
            with SyncPrefectClient(self.api) as c:
                _all_computed(c, [state.state_details.flow_run_id], TASKS_PER_MODEL * len(configs))
        return dt, orchestration_cpu(self.pool.server, self.pool.pg) - cpu0

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()


def _all_computed(client, flow_run_ids: list, expected: int, settle: float = 60) -> None:
    """Every task of these flow runs computed (no cache hit: the numbers would measure nothing). The server records
    task states from the flow runs' events, after the fact: a last task may read Running for a moment."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + settle
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids))))
        states = [r.state.name for r in runs if r.state]
        if len(states) == expected and set(states) == {"Completed"}:
            return
        if time.monotonic() > deadline or any(r.state and r.state.is_final() and r.state.name != "Completed"
                                              for r in runs):
            raise SystemExit(f"expected {expected} task runs, all computed; got {sorted(states)}")
        time.sleep(1)


# ---------------------------------------------------------------- the run and the report
def run(root: Path, sizes: list[int], rounds: int, paths: list[str], budget_s: float | None = None,
        size: int = SIZE) -> dict[str, Any]:
    """Every measurement: {"times": {(path, N, workers): [(seconds, orchestration CPU seconds), ...]}, "machine":
    the machine check before and after, "cpu": the CPU line, "pinning": where each worker may run}.

    A round measures each size in the order given; a size's block is every path on 1 and on 2 workers. With
    `budget_s`, a block that would not end within that many seconds of the start (judged by the slowest block per
    model so far) is left out: fewer runs of some sizes, every run complete and paired."""
    from edgeq.demo import ensure_demo

    start = time.monotonic()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"needs 2 CPUs to pin 2 workers to, this process may use {cpus}")
    root = ensure_demo(root)
    out: dict[str, Any] = {"times": {}, "machine": [machine_check(cpus)], "pinning": {}, "size": size, "ceiling": [],
                           "cpu": machine_description(cpus)}
    print(out["cpu"], flush=True)
    print(f"machine check (2 loops side by side / 1 alone): {out['machine'][0]}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="edgeq-scaling-"))
    opened = []
    try:
        models = Models(root, work, size)
        pool = WorkPoolPath(work, cpus)  # the server both paths report to
        opened.append(pool)
        out["pinning"]["workpool"] = pool.pinning
        runners: dict[str, Any] = {}
        if "workpool" in paths:
            runners["workpool"] = pool
        if "dask" in paths:
            runners["dask"] = DaskPath(pool, cpus)
            opened.append(runners["dask"])
            out["pinning"]["dask"] = runners["dask"].pinning
        print(f"pinning: {out['pinning']}", flush=True)
        for name, r in runners.items():  # untimed: imports, first compiles, the disk cache
            r.measure(models.fresh(2, f"warmup-{name}"), models.version, 2)
        per_model = 0.0  # the most seconds a block took per model so far: a block of N models takes about N times it
        for rnd in range(rounds):
            gain, stages = conversion_ceiling(models, cpus, f"r{rnd}")
            out["ceiling"].append(gain)
            print(f"  round {rnd + 1}: plain functions, no orchestration: 2 conversions side by side / 1 alone "
                  f"{gain:.2f}x ({stages})", flush=True)
            for n in sizes:
                left = budget_s - (time.monotonic() - start) - RESERVE_S if budget_s is not None else None
                if left is not None and per_model * n > left:
                    print(f"  round {rnd + 1}: N = {n} not run: about {per_model * n:.0f} s, {max(left, 0):.0f} s of "
                          "the budget left", flush=True)
                    continue
                t_block = time.monotonic()
                for name, r in runners.items():
                    for w in ((1, 2) if rnd % 2 == 0 else (2, 1)):  # neither count always goes first
                        dt, cpu = r.measure(models.fresh(n, f"{name}-{n}x{w}-r{rnd}"), models.version, w)
                        out["times"].setdefault((name, n, w), []).append((dt, cpu))
                        print(f"  round {rnd + 1}: {name:8} {n} conversion(s) on {w} worker(s): {dt:6.1f} s   "
                              f"server+db+here CPU {cpu:5.1f} s   load {os.getloadavg()[0]:.1f}   "
                              f"{getattr(r, 'last', '')}", flush=True)
                per_model = max(per_model, (time.monotonic() - t_block) / n)
    finally:
        for o in reversed(opened):
            o.close()
        shutil.rmtree(work, ignore_errors=True)
    out["machine"].append(machine_check(cpus))
    return out


def report(out: dict[str, Any], sizes: list[int], paths: list[str]) -> str:
    def cell(v: list[float]) -> str:
        return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"

    def ratio_cell(v: list[float]) -> str:
        return f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f}), {len(v)} runs"

    times = out["times"]
    checks = "; ".join(f"{k} {' then '.join(f'{m[k]:.2f}x' for m in out['machine'])}" for k in ("compute", "memory"))
    lines = [out["cpu"],
             f"ResNet-18 3x{out['size']}x{out['size']} conversions (export + compile check x3 + INT8 PTQ), each worker "
             "pinned to its own CPU with 1 thread; seconds from submission until every conversion ended, median "
             "(min-max) of the runs",
             f"machine check, 2 pinned loops side by side vs 1 alone, before then after: {checks}",
             ("the same conversions with no orchestration (plain functions, pinned processes): 2 side by side vs 1 "
              f"alone, throughput {ratio_cell(out['ceiling'])}: at most this from 2 workers on this machine"
              if out["ceiling"] else "no-orchestration ceiling: not measured"),
             ("| path | N | runs | 1 worker | 2 workers | speed-up (ratio of medians) | speed-up per run, median (min-max) "
              "| s per conversion, 2 workers | server+db+orchestrator CPU s per conversion |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        for n in sorted(sizes):
            if (p, n, 1) not in times or (p, n, 2) not in times:
                lines.append(f"| {p} | {n} | 0 | not run (time budget) | | | | | |")
                continue
            one, two = [t for t, _ in times[(p, n, 1)]], [t for t, _ in times[(p, n, 2)]]
            ratios = [a / b for a, b in zip(one, two)]  # the same round's 1-worker and 2-worker times
            cpu = statistics.median(c for w in (1, 2) for _, c in times[(p, n, w)]) / n
            lines.append(f"| {p} | {n} | {len(ratios)} | {cell(one)} | {cell(two)} | "
                         f"{statistics.median(one) / statistics.median(two):.2f}x | "
                         f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                         f"{statistics.median(two) / n:.1f} | {cpu:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before Prefect is imported: only the numbers
    quiet_environment()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(".edgeq/demo"), help="demo build folder (built if missing)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=SIZE, help="image side of the ResNet-18 conversions (pixels)")
    ap.add_argument("--paths", nargs="+", default=["workpool", "dask"], choices=["workpool", "dask"])
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="start no round that would end past this many minutes from the start (fewer rounds)")
    args = ap.parse_args(argv)
    import logging

    for name in ("prefect", "distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    budget = args.budget_minutes * 60 if args.budget_minutes else None
    print(report(run(args.root, args.sizes, args.rounds, args.paths, budget, args.size), args.sizes, args.paths))


if __name__ == "__main__":
    main()
