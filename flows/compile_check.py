"""Flow: export (cached), then compile-check every target in parallel and gate on the required ones."""

from __future__ import annotations

from prefect import flow, unmapped
from pydantic import BaseModel, Field

from edgeq.flows.export import run_export_stage
from edgeq.tasks.compile_check import (
    BenchSettings,
    CompileMatrix,
    compile_check_task,
    gate_required_targets,
    publish_matrix,
)
from edgeq.tasks.config import load_prepared


class CompileCheckParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config")
    warmup: int = Field(10, ge=0, le=1000, description="untimed batch-1 runs before the latency benchmark")
    iters: int = Field(100, ge=1, le=100_000, description="timed batch-1 runs (median and p90)")


def run_compile_check_stage(cfg, export_result=None, bench: BenchSettings = BenchSettings(),
                            gate: bool = True) -> CompileMatrix:
    """The pipeline's compile-check stage (inside a flow): one mapped task per target, matrix artifact, gate.

    Raises CompileCheckFailed (an EdgeqError carrying the matrix as `.report`) when a required target fails, so the
    conversion pipeline stops before quantization.
    """
    result = export_result if export_result is not None else run_export_stage(cfg)
    futures = compile_check_task.map(onnx=unmapped(result.onnx), target=cfg.targets,
                                     store_url=unmapped(cfg.store_url), bench=unmapped(bench))
    matrix = CompileMatrix(model=cfg.model.name, onnx_sha256=result.onnx.sha256,
                           reports=[f.result() for f in futures])
    publish_matrix(matrix)
    if gate:
        gate_required_targets(matrix)
    return matrix


@flow(name="compile_check", log_prints=True)
def compile_check(params: CompileCheckParams = CompileCheckParams()) -> CompileMatrix:
    cfg = load_prepared(params.config)
    return run_compile_check_stage(cfg, bench=BenchSettings(warmup=params.warmup, iters=params.iters))
