"""Flow: export a model to ONNX and gate it."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, Field

from edgeq.core.store import ArtifactStore
from edgeq.tasks.caching import call_cached, on_store
from edgeq.tasks.config import load_prepared
from edgeq.tasks.export import ExportResult, export_task, publish_export_report


class ExportParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config")


def run_export_stage(cfg) -> ExportResult:
    """The export task (re-run when its cached artifact has gone from the store); publishes its report unless it was
    a cache hit."""
    store = ArtifactStore(cfg.store_url)
    result, cached = call_cached(on_store(export_task, cfg.store_url), cfg, gone=lambda r: not store.exists(r.onnx))
    if not cached:
        publish_export_report(result.report)
    return result


@flow(name="export-model", log_prints=True)
def export_model(params: ExportParams = ExportParams()) -> ExportResult:
    cfg = load_prepared(params.config)
    return run_export_stage(cfg)
