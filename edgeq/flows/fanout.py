"""Flow `fanout`: many models x many targets at once, on Prefect's own task runners.

Every (config) is exported, every (config, target) compile-checked, and optionally every config quantized,
as submitted tasks: with the thread runner they share one process; with the Dask runner
(`prefect_dask.DaskTaskRunner`) they spread over the Dask workers of a local or remote cluster. The tasks are
the pipeline's own cached tasks, so results and cache keys are the same whichever runner ran them, and with
the artifact store and Prefect's result storage on shared storage, any worker reuses any other's results.

    from edgeq.flows.fanout import FanoutParams, run_fanout
    run_fanout(FanoutParams(configs=["a.yaml", "b.yaml"], runner="dask", workers=2))
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from edgeq.tasks.caching import on_store
from edgeq.tasks.compile_check import BenchSettings, CompileMatrix, compile_check_task, gate_required_targets
from edgeq.tasks.config import load_prepared
from edgeq.tasks.export import export_task
from edgeq.tasks.quantize import approved_version_id, quantize_task


class FanoutParams(BaseModel):
    configs: list[str] = Field(min_length=1, description="edgeq YAML configs (paths on the workers), one per model")
    stage: Literal["compile", "quantize"] = Field(
        "compile", description="compile: export + compile check per target; quantize: also INT8 quantization")
    calibration: str = Field("latest", description="approved calibration version (stage 'quantize')")
    runner: Literal["thread", "dask"] = Field("thread", description="Prefect task runner for the fan-out")
    workers: int = Field(2, ge=1, le=64, description="Dask: local worker processes (ignored with `address`)")
    address: str | None = Field(None, description="Dask: scheduler address of an existing cluster (tcp://host:8786)")
    warmup: int = Field(2, ge=0, le=1000, description="untimed batch-1 runs per target")
    iters: int = Field(10, ge=1, le=100_000, description="timed batch-1 runs per target")


def task_runner(params: FanoutParams):
    """The Prefect task runner the parameters ask for."""
    if params.runner == "thread":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if params.address:
        return DaskTaskRunner(address=params.address)
    # One thread per worker process (the runtimes already use every core they are given); loopback only, no
    # dashboard: a local cluster serves nobody else.
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": params.workers, "processes": True, "threads_per_worker": 1,
                                          "host": "127.0.0.1", "dashboard_address": None})


@flow(name="fanout", log_prints=True)
def fanout(params: FanoutParams) -> list[dict[str, Any]]:
    """One row per model: the FP32 and (stage 'quantize') INT8 sha256, and each target's compile status."""
    cfgs = [load_prepared(c) for c in params.configs]
    bench = BenchSettings(warmup=params.warmup, iters=params.iters)
    exports = [on_store(export_task, cfg.store_url).submit(cfg) for cfg in cfgs]
    checks, quants = [], []
    for cfg, exp in zip(cfgs, exports):
        checks.append(on_store(compile_check_task, cfg.store_url).map(
            onnx=unmapped(exp.result().onnx), target=cfg.targets, store_url=unmapped(cfg.store_url),
            bench=unmapped(bench)))
    if params.stage == "quantize":
        for cfg, exp, futs in zip(cfgs, exports, checks):
            version = approved_version_id(cfg, params.calibration)
            e = exp.result()
            # As in convert_model: a required target that cannot compile stops that model before quantization.
            gate_required_targets(CompileMatrix(model=cfg.model.name, onnx_sha256=e.onnx.sha256,
                                                reports=[f.result() for f in futs]))
            quants.append(on_store(quantize_task, cfg.store_url).submit(cfg, e.onnx, version, e.report.opset))
    rows = []
    for i, (cfg, exp, futs) in enumerate(zip(cfgs, exports, checks)):
        e = exp.result()
        row = {"config": params.configs[i], "model": cfg.model.name, "kwargs": cfg.model.kwargs,
               "opset": e.report.opset, "fp32_sha256": e.onnx.sha256,
               "targets": {r.target: r.status for r in (f.result() for f in futs)}}
        if quants:
            q = quants[i].result()
            row.update(int8_sha256=q.int8.sha256, int8_attempt=q.report.chosen_attempt.label)
        rows.append(row)
    return rows


def run_fanout(params: FanoutParams, return_state: bool = False):
    """Run `fanout` on the task runner `params.runner` names (a flow's runner is fixed when it starts)."""
    return fanout.with_options(task_runner=task_runner(params))(params, return_state=return_state)
