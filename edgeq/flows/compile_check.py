"""Flow: export (cached), then compile-check every target in parallel and gate on the required ones."""

from __future__ import annotations

from prefect import flow, unmapped
from pydantic import BaseModel, Field

from edgeq.core.store import ArtifactRef
from edgeq.flows.export import run_export_stage
from edgeq.tasks.compile_check import (
    BenchSettings,
    CompileMatrix,
    compile_check_task,
    gate_required_targets,
    publish_matrix,
)
from edgeq.tasks.caching import all_cached, on_store
from edgeq.tasks.config import load_prepared


class CompileCheckParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config")
    warmup: int = Field(10, ge=0, le=1000, description="untimed batch-1 runs before the latency benchmark")
    iters: int = Field(100, ge=1, le=100_000, description="timed batch-1 runs (median and p90)")


def run_compile_check_stage(cfg, export_result=None, bench: BenchSettings = BenchSettings(),
                            gate: bool = True) -> CompileMatrix:
    """The pipeline's compile-check stage (inside a flow): one mapped task per target, matrix artifact (unless every
    target's check was a cache hit), gate.

    Raises CompileCheckFailed (an EdgeqError carrying the matrix as `.report`) when a required target fails, so the
    conversion pipeline stops before quantization.
    """
    result = export_result if export_result is not None else run_export_stage(cfg)
    futures = on_store(compile_check_task, cfg.store_url).map(onnx=unmapped(result.onnx), target=cfg.targets,
                                     store_url=unmapped(cfg.store_url), bench=unmapped(bench))
    matrix = CompileMatrix(model=cfg.model.name, onnx_sha256=result.onnx.sha256,
                           reports=[f.result() for f in futures])
    if not all_cached(futures):
        publish_matrix(matrix)
    if gate:
        gate_required_targets(matrix)
    return matrix


def run_int8_compile_check_stage(cfg, int8: ArtifactRef, bench: BenchSettings = BenchSettings()) -> CompileMatrix:
    """The INT8 graph that will ship, through the same compile check on every target (inside a flow).

    The quantization ladder already passed over attempts a required target refused; this checks the chosen model
    itself before validation and publish (also when the quantization result came from the cache), and shows its
    matrix in the UI. Raises CompileCheckFailed when a required target cannot take it.
    """
    check = on_store(compile_check_task, cfg.store_url).with_options(task_run_name="int8-compile-check-{target.name}")
    futures = check.map(onnx=unmapped(int8), target=cfg.targets, store_url=unmapped(cfg.store_url),
                        bench=unmapped(bench))
    matrix = CompileMatrix(model=cfg.model.name, onnx_sha256=int8.sha256, graph="INT8",
                           reports=[f.result() for f in futures])
    if not all_cached(futures):
        publish_matrix(matrix)
    gate_required_targets(matrix)
    return matrix


@flow(name="compile-check", log_prints=True)
def compile_check(params: CompileCheckParams = CompileCheckParams()) -> CompileMatrix:
    cfg = load_prepared(params.config)
    return run_compile_check_stage(cfg, bench=BenchSettings(warmup=params.warmup, iters=params.iters))
