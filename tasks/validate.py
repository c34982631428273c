"""Four-way validation and publishing as Prefect tasks."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from edgeq.calibration.ingest import open_npy
from edgeq.calibration.versions import load_version
from edgeq.core.data import load_raw, load_split, read_table
from edgeq.core.errors import GateError
from edgeq.core.modeling import build_model
from edgeq.core.specs import EdgeqConfig
from edgeq.core.store import ArtifactRef, ArtifactStore
from edgeq.tasks.caching import content_key, retry_transient, split_fingerprint
from edgeq.validation import ValidationReport, chart_png, check_disjoint, format_table, png_data_uri, validate_four_way


class ValidateResult(BaseModel):
    report: ValidationReport
    report_json: ArtifactRef
    chart: ArtifactRef


def validate_to_store(cfg: EdgeqConfig, fp32: ArtifactRef, int8: ArtifactRef, calibration_version: str,
                      opset: int) -> ValidateResult:
    """Plain function: refuse test/calibration overlap, run the four stages, store the JSON report and chart.

    Raises GateError ("do not ship") naming every failed gate; the report rides on the exception.
    """
    store = ArtifactStore(cfg.store_url)
    version = load_version(store, calibration_version)
    manifest = read_table(store.local_path(version.artifacts["manifest"]))
    raw, _ = load_raw(cfg.data.test)
    check_disjoint(raw, set(manifest["sha256"]), calibration_version)
    test = load_split(cfg.data.test, cfg.data.preprocess)
    calib = open_npy(store.local_path(version.artifacts["samples"]))
    report = validate_four_way(cfg, build_model(cfg.model), store.local_path(fp32), store.local_path(int8), test,
                               calib, calibration_version, opset)
    chart = store.put_bytes(chart_png(report), "four-way.png")
    ref = store.put_json(report.model_dump(mode="json"), "four-way.json")
    if not report.passed:
        failed = report.failed_gates()
        raise GateError("do not ship: " + "; ".join(f"{g.gate} failed at {g.pair}: {g.measured} (threshold "
                                                    f"{g.threshold})" for g in failed) + "\n" + format_table(report),
                        report=report, chart=chart)
    return ValidateResult(report=report, report_json=ref, chart=chart)


def validation_markdown(report: ValidationReport, chart_uri: str | None = None) -> str:
    verdict = "all gates passed: ship" if report.passed else "**DO NOT SHIP**: " + ", ".join(
        g.gate for g in report.failed_gates())
    lines = [f"# Four-way validation of `{report.model}`: {verdict}", "",
             f"{report.samples} held-out test samples (disjoint from calibration version "
             f"`{report.calibration_version}` by content hash); device stage: `{report.device_target}`.", "",
             f"| stage | runtime | {report.metric_name} | ±95 % | n | batch-1 ms | precision |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s.stage} | {s.runtime} | {s.metric:.4f} | {s.ci95:.4f} | {s.samples} | "
              f"{'-' if s.latency_ms is None else f'{s.latency_ms:.3f}'} | {s.precision} |" for s in report.stages]
    lines += ["", "| gate | pair | measured | threshold | result |", "|---|---|---|---|---|"]
    lines += [f"| {g.gate} | {g.pair} | {g.measured} | {g.threshold} | {'pass' if g.passed else '**FAIL**'} |"
              for g in report.gates]
    for g in report.failed_gates():
        lines += ["", f"## Where `{g.gate}` diverges", ""] + [f"- {w}" for w in g.where]
    if chart_uri:
        lines += ["", f"![accuracy and latency per stage]({chart_uri})"]
    return "\n".join(lines)


def publish_validation(report: ValidationReport, chart_png_bytes: bytes | None = None) -> None:
    uri = png_data_uri(chart_png_bytes) if chart_png_bytes else None
    create_markdown_artifact(markdown=validation_markdown(report, uri), key="four-way-validation",
                             description=f"four-way validation of {report.model}")
    create_table_artifact(table=[s.model_dump() for s in report.stages], key="four-way-table",
                          description="metric and batch-1 latency per stage on the held-out test split")
    create_table_artifact(table=[{k: v for k, v in g.model_dump().items() if k != "where"} for g in report.gates],
                          key="four-way-gates", description="ship gates between adjacent stages")
    if uri:
        create_image_artifact(image_url=uri, key="four-way-chart", description="accuracy per stage, latency per runtime")


def validate_cache_key(cfg: EdgeqConfig, fp32: ArtifactRef, int8: ArtifactRef, calibration_version: str) -> str:
    return content_key("validate", fp32=fp32.sha256, int8=int8.sha256, calibration=calibration_version,
                       test=split_fingerprint(cfg.data.test), preprocess=cfg.data.preprocess.model_dump(mode="json"),
                       thresholds=cfg.thresholds.model_dump(mode="json"), metric=cfg.model.metric,
                       validation=cfg.validation.model_dump(mode="json"),
                       targets=[t.model_dump(mode="json") for t in cfg.targets], store=cfg.store_url)


@task(name="validate-four-way",
      cache_key_fn=lambda ctx, p: validate_cache_key(p["cfg"], p["fp32"], p["int8"], p["calibration_version"]),
      persist_result=True, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def validate_task(cfg: EdgeqConfig, fp32: ArtifactRef, int8: ArtifactRef, calibration_version: str,
                  opset: int) -> ValidateResult:
    try:
        return validate_to_store(cfg, fp32, int8, calibration_version, opset)
    except GateError as exc:
        if exc.report is not None:
            publish_validation(exc.report, ArtifactStore(cfg.store_url).read_bytes(exc.chart))
        raise
