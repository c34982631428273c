"""Publishing as a Prefect task: the bundle, a markdown artifact, and the `edgeq.model.published` event (the last two
only when this run placed the bundle)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from edgeq.core.specs import EdgeqConfig
from edgeq.core.store import ArtifactRef, ArtifactStore
from edgeq.publish import bundle_path, emit_published, place_bundle


@task(name="publish", retries=2, retry_delay_seconds=2)
def publish_task(cfg: EdgeqConfig, int8: ArtifactRef, lineage: dict, measurements: dict, gates_passed: bool,
                 forms: dict[str, ArtifactRef] | None = None, form_records: dict[str, dict] | None = None) -> dict:
    store = ArtifactStore(cfg.store_url)
    manifest, placed = place_bundle(cfg, store.local_path(int8), lineage, measurements, gates_passed,
                                    target_models={t: store.local_path(ref) for t, ref in (forms or {}).items()},
                                    form_records=form_records)
    uri = bundle_path(cfg, manifest["bundle_id"])
    if not placed:  # the same bundle was already published: no second artifact, no second event for automations
        get_run_logger().info("bundle %s was already published (%s): nothing new to announce", manifest["bundle_id"],
                              manifest.get("published_at"))
        return {**manifest, "uri": uri}
    create_markdown_artifact(
        markdown=f"# Published `{manifest['bundle_id']}`\n\n- model `{manifest['model']['name']}`\n- bundle: `{uri}`\n"
                 f"- files: {', '.join(f'`{f}`' for f in manifest['files'])}\n"
                 f"- calibration `{manifest['calibration']['version']}` approved by "
                 f"{manifest['calibration']['reviewer']}",
        key="published-bundle", description="deploy bundle")
    emit_published(manifest, uri)
    return {**manifest, "uri": uri}
