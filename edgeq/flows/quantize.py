"""Flow: export (cached) -> compile check (gate) -> INT8 quantization from an approved calibration version."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from edgeq.core.store import ArtifactStore
from edgeq.flows.compile_check import run_compile_check_stage
from edgeq.flows.export import run_export_stage
from edgeq.tasks.caching import call_cached, on_store
from edgeq.tasks.config import load_prepared
from edgeq.tasks.quantize import QuantizeResult, approved_version_id, publish_quantization, quantize_task


class QuantizeParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config")
    calibration: str | None = Field(None, description="approved calibration version id; default: the config's "
                                                      "quantization.calibration ('latest' approved)")


def run_quantize_stage(cfg, export_result, calibration: str | None = None) -> QuantizeResult:
    # Resolve "latest" to an id before keying the cache, and refuse a non-approved version before any work.
    version = approved_version_id(cfg, calibration)
    store = ArtifactStore(cfg.store_url)
    result, cached = call_cached(on_store(quantize_task, cfg.store_url), cfg, export_result.onnx, version,
                                 export_result.report.opset,
                                 gone=lambda r: not all(store.exists(x) for x in (r.int8, *r.forms.values())))
    if not cached:
        publish_quantization(result.report)
    return result


@flow(name="quantize-model", log_prints=True)
def quantize_model(params: QuantizeParams = QuantizeParams()) -> QuantizeResult:
    cfg = load_prepared(params.config)
    exported = run_export_stage(cfg)
    run_compile_check_stage(cfg, exported)
    return run_quantize_stage(cfg, exported, params.calibration)
