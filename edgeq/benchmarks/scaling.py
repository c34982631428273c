"""Scaling benchmark: N conversions (N = 1, 2, 4 small models) on 1 vs 2 Dask workers, measured in one run.

    python -m edgeq.benchmarks.scaling [--sizes 1 2 4] [--workers 1 2] [--root .edgeq/demo]

A conversion here is export -> compile check (ONNX Runtime, OpenVINO, a declared profile) -> INT8 PTQ of one
model, run by the `fanout` flow on `prefect_dask.DaskTaskRunner` against a pre-started `distributed.LocalCluster`
(started once per worker count and warmed up, so the times are the work, not process start-up). The models are
the demo CNN at widths 8, 12, 16, 24 (the trained demo weights at 16, seeded random weights elsewhere, with the
INT8 SLA relaxed: this measures throughput, not accuracy). Every measurement uses a fresh copy of the store, so
nothing is a cache hit. Runs against PREFECT_API_URL when set, else a temporary local Prefect server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from edgeq.core.quiet import quiet_environment

WIDTHS = (8, 12, 16, 24)


def _config(root: Path, folder: Path, store: Path, width: int, weights: Path) -> Path:
    import yaml

    data = {
        "name": f"scaling-w{width}", "store": str(store),
        "model": {"name": "digits-cnn", "factory": "edgeq.demo:digits_net", "kwargs": {"width": width, "num_classes": 10},
                  "weights": str(weights), "inputs": [{"name": "image", "shape": ["batch", 1, 8, 8]}],
                  "outputs": ["logits"], "example_dims": {"batch": 2}, "metric": "top1"},
        "targets": [{"name": "ort-cpu", "backend": "onnxruntime"}, {"name": "openvino-cpu", "backend": "openvino"},
                    {"name": "hailo8-declared", "backend": "declared", "profile": "hailo8-example",
                     "precision": "int8", "required": False}],
        "data": {"preprocess": {"scale": 1 / 255},
                 "train": {"kind": "arrays", "path": str(root / "train.npz")},
                 "validation": {"kind": "arrays", "path": str(root / "validation.npz")},
                 "test": {"kind": "arrays", "path": str(root / "test.npz")},
                 "train_manifest": str(root / "train_manifest.parquet"),
                 "test_manifest": str(root / "test_manifest.parquet"),
                 "captures": {"path": str(root / "captures"), "metadata": str(root / "captures" / "metadata.csv"),
                              "strata": ["lighting", "camera", "time_of_day"]}},
        "thresholds": {"int8_max_drop": 1.0},
        "quantization": {"mode": "ptq", "latency_iters": 10},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"w{width}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _weights(root: Path, folder: Path, width: int) -> Path:
    if width == 16:
        return root / "digits_cnn.safetensors"
    import safetensors.torch
    import torch

    from edgeq.demo import digits_net

    torch.manual_seed(width)
    path = folder / f"digits-w{width}.safetensors"
    safetensors.torch.save_file(digits_net(width=width).state_dict(), path)
    return path


def _seed_store(root: Path, work: Path) -> tuple[Path, str]:
    """A store holding an approved calibration version for the demo model (copied per measurement)."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.store import ArtifactStore
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.config import load_prepared

    store = work / "seed-store"
    cfg = load_prepared(_config(root, work / "seed", store, 16, root / "digits_cnn.safetensors"))
    version = build_calibration_candidate(cfg).version.version
    record_decision(ArtifactStore(cfg.store_url), version, approve=True, reviewer="scaling-benchmark",
                    comment="benchmark only")
    return store, version


def _measure(root: Path, work: Path, seed: Path, version: str, n: int, address: str, label: str) -> float:
    from edgeq.flows.fanout import FanoutParams, run_fanout

    store = work / f"store-{label}"
    shutil.copytree(seed, store)
    configs = [str(_config(root, work / f"cfg-{label}", store, w, _weights(root, work, w))) for w in WIDTHS[:n]]
    t0 = time.perf_counter()
    state = run_fanout(FanoutParams(configs=configs, stage="quantize", calibration=version, runner="dask",
                                    address=address), return_state=True)
    dt = time.perf_counter() - t0
    if not state.is_completed():
        raise SystemExit(f"fan-out {label} failed: {state.message}")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    cached = [r.name for r in runs if r.state and r.state.name != "Completed"]
    if cached or len(runs) != n * 5:  # export + 3 compile checks + quantize per model, all computed
        raise SystemExit(f"fan-out {label}: expected {n * 5} computed task runs, got {len(runs)} ({cached})")
    return dt


def run(root: Path, sizes: list[int], workers: list[int]) -> dict[tuple[int, int], float]:
    from distributed import LocalCluster

    from edgeq.demo import ensure_demo

    root = ensure_demo(root)
    work = Path(tempfile.mkdtemp(prefix="edgeq-scaling-"))
    times: dict[tuple[int, int], float] = {}
    try:
        seed, version = _seed_store(root, work)
        for w in workers:
            with LocalCluster(n_workers=w, processes=True, threads_per_worker=1, host="127.0.0.1",
                              dashboard_address=None) as cluster:  # loopback only
                _measure(root, work, seed, version, 1, cluster.scheduler_address, f"warmup-{w}")  # imports, JIT
                for n in sizes:
                    times[(n, w)] = _measure(root, work, seed, version, n, cluster.scheduler_address, f"{n}x{w}")
                    print(f"  {n} conversion(s) on {w} worker(s): {times[(n, w)]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return times


def report(times: dict[tuple[int, int], float], sizes: list[int], workers: list[int]) -> str:
    base_w = workers[0]
    lines = [f"conversions (export + compile check x3 targets + INT8 PTQ), {os.cpu_count()} CPU(s)",
             "| N | " + " | ".join(f"{w} worker(s) s" for w in workers) + " | "
             + " | ".join(f"speed-up {w} vs {base_w}" for w in workers[1:]) + " | s per conversion (best) |",
             "|---|" + "---|" * (2 * len(workers))]
    for n in sizes:
        row = [f"{times[(n, w)]:.1f}" for w in workers]
        ratios = [f"{times[(n, base_w)] / times[(n, w)]:.2f}x" for w in workers[1:]]
        best = min(times[(n, w)] for w in workers) / n
        lines.append(f"| {n} | " + " | ".join(row + ratios) + f" | {best:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    quiet_environment()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(".edgeq/demo"), help="demo build folder (built if missing)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 3, 4])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)
    if os.environ.get("PREFECT_API_URL"):
        times = run(args.root, args.sizes, args.workers)
    else:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            times = run(args.root, args.sizes, args.workers)
    print(report(times, args.sizes, args.workers))


if __name__ == "__main__":
    main()
