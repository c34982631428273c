"""Four-way validation and publishing as Prefect tasks."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from edgeq.calibration.readers import version_inputs
from edgeq.calibration.versions import load_version
from edgeq.core.data import (
    CONTENT_ID_SCHEME,
    batch_content_ids,
    load_inputs,
    split_batch_content_ids,
    split_content_ids,
)
from edgeq.core.errors import GateError, SpecError
from edgeq.core.modeling import build_model
from edgeq.core.specs import EdgeqConfig, Preprocess
from edgeq.core.store import ArtifactRef, ArtifactStore
from edgeq.tasks.artifacts import MISSING, display_rows, image_markdown
from edgeq.tasks.caching import content_key, retry_transient, split_fingerprint
from edgeq.validation import (
    ValidationReport,
    chart_png,
    check_device_stage,
    check_disjoint,
    format_table,
    png_data_uri,
    shown_precision,
    validate_four_way,
)


class ValidateResult(BaseModel):
    report: ValidationReport
    report_json: ArtifactRef
    chart: ArtifactRef


def validate_to_store(cfg: EdgeqConfig, fp32: ArtifactRef, int8: ArtifactRef, calibration_version: str,
                      opset: int) -> ValidateResult:
    """Plain function: refuse test/calibration overlap, run the four stages, store the JSON report and chart.

    Raises GateError ("do not ship") naming every failed gate; the report rides on the exception.
    """
    check_device_stage(cfg)  # before any work: a device stage that is not independent checks nothing
    store = ArtifactStore(cfg.store_url)
    version = load_version(store, calibration_version)
    inputs, pp = cfg.model.inputs, cfg.data.preprocess
    calib = version_inputs(store, version)  # every input the version holds
    if len(inputs) == 1 and len(calib) == 1:
        calib = {inputs[0].name: next(iter(calib.values()))}
    missing = [i.name for i in inputs if i.name not in calib]
    if missing:
        raise SpecError(f"calibration version {calibration_version} holds inputs {list(calib)} but the model also "
                        f"takes {missing}: rebuild it from captures that hold every model input")
    # The version's samples are model input made with the preprocessing it recorded; identity over every input.
    calib_ids = batch_content_ids(calib, inputs, pp, made_with=Preprocess(**version.preprocess),
                                  what=f"calibration version {calibration_version}")
    if len(inputs) == 1 and inputs[0].is_float:  # the image rule, with its messages naming data.test
        test_ids = split_content_ids(cfg.data.test, pp, inputs[0], "data.test")
    else:
        test_ids = split_batch_content_ids(cfg.data.test, inputs, pp, "data.test")
    check_disjoint(test_ids, set(calib_ids), calibration_version)
    test = load_inputs(cfg.data.test, inputs, pp)
    report = validate_four_way(cfg, build_model(cfg.model), store.local_path(fp32), store.local_path(int8), test,
                               calib, calibration_version, opset)
    chart = store.put_bytes(chart_png(report), "four-way.png")
    ref = store.put_json(report.model_dump(mode="json"), "four-way.json")
    if not report.passed:
        failed = report.failed_gates()
        raise GateError("do not ship: " + "; ".join(f"{g.gate} {'failed' if g.ran else 'did not run'} at {g.pair}: "
                                                    f"{g.measured} (threshold {g.threshold})" for g in failed)
                        + "\n" + format_table(report),
                        report=report, chart=chart)
    return ValidateResult(report=report, report_json=ref, chart=chart)


def validation_markdown(report: ValidationReport, chart_uri: str | None = None) -> str:
    verdict = "all gates passed: ship" if report.passed else "**DO NOT SHIP**: " + ", ".join(
        dict.fromkeys(g.gate for g in report.failed_gates()))
    extras = list(dict.fromkeys(k for s in report.stages for k in s.extra_metrics))
    lines = [f"# Four-way validation of `{report.model}`: {verdict}", "",
             f"{report.samples} held-out test samples (disjoint from calibration version "
             f"`{report.calibration_version}` by content identity); device stage: `{report.device_target}`.", "",
             f"| stage | runtime | {report.metric_name} | ±95 % | n | batch-1 ms | precision |"
             + "".join(f" {k} |" for k in extras), "|---|---|---|---|---|---|---|" + "---|" * len(extras)]
    lines += [f"| {s.stage} | {s.runtime} | {s.metric:.4f} | {s.ci95:.4f} | {s.samples} | "
              f"{MISSING if s.latency_ms is None else f'{s.latency_ms:.3f}'} | {shown_precision(s)} |"
              + "".join(f" {s.extra_metrics[k]:.4f} |" if k in s.extra_metrics else f" {MISSING} |" for k in extras)
              for s in report.stages]
    if len(report.outputs) > 1:
        lines += ["", f"{report.metric_name} scores the first output `{report.metric_output}`; export parity and device "
                      f"agreement compare every output ({', '.join(f'`{o}`' for o in report.outputs)})."]
    many = len(report.outputs) > 1
    lines += ["", "| gate | pair |" + (" output |" if many else "") + " measured | threshold | result |",
              "|---|---|" + ("---|" if many else "") + "---|---|---|"]
    lines += [f"| {g.gate} | {g.pair} |" + (f" {g.output} |" if many else "") + f" {g.measured} | {g.threshold} | "
              f"{('pass' if g.passed else '**FAIL**') if g.ran else g.result.lower()} |" for g in report.gates]
    for g in report.failed_gates():
        lines += ["", f"## Where `{g.gate}` diverges", ""] + [f"- {w}" for w in g.where]
    if chart_uri:
        lines += ["", f"![accuracy and latency per stage]({chart_uri})"]
    return "\n".join(lines)


def publish_validation(report: ValidationReport, chart_png_bytes: bytes | None = None) -> None:
    uri = png_data_uri(chart_png_bytes) if chart_png_bytes else None
    create_markdown_artifact(markdown=validation_markdown(report, uri), key="four-way-validation",
                             description=f"four-way validation of {report.model}")
    create_table_artifact(table=display_rows({**s.model_dump(), "precision": shown_precision(s)} for s in report.stages),
                          key="four-way-table",
                          description="metric and batch-1 latency per stage on the held-out test split")
    create_table_artifact(table=display_rows({k: v for k, v in g.model_dump().items() if k != "where"}
                                             for g in report.gates),
                          key="four-way-gates", description="ship gates between adjacent stages")
    if chart_png_bytes:
        # A markdown artifact with the picture in it: an image artifact shows its URL as text, and a data URI's
        # text runs across the page.
        create_markdown_artifact(
            markdown=f"# Four-way validation of `{report.model}`\n\n"
                     + image_markdown(chart_png_bytes, "metric per stage and batch-1 latency per runtime"),
            key="four-way-chart", description="metric per stage (95 % interval), batch-1 latency per runtime")


def publish_form_validation(target: str, report: ValidationReport) -> None:
    """The four-way table of a target's own INT8 model (quantization.target_forms), under a key of its own."""
    key = "four-way-" + "".join(c if c.isalnum() else "-" for c in target.lower())
    create_markdown_artifact(markdown=validation_markdown(report).replace(
        "# Four-way validation of", f"# Four-way validation of {target}'s own INT8 model of", 1), key=key,
        description=f"four-way validation of the INT8 model {target} gets")


def validate_cache_key(cfg: EdgeqConfig, fp32: ArtifactRef, int8: ArtifactRef, calibration_version: str) -> str:
    return content_key("validate", fp32=fp32.sha256, int8=int8.sha256, calibration=calibration_version,
                       identity=CONTENT_ID_SCHEME,
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
