"""The quantization stage as a Prefect task: approved calibration in, gated INT8 QDQ ONNX out."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from edgeq.calibration.readers import CalibrationReader, open_calibration
from edgeq.calibration.versions import get_approved
from edgeq.core.data import load_split
from edgeq.core.errors import GateError
from edgeq.core.modeling import build_model
from edgeq.core.specs import EdgeqConfig
from edgeq.core.store import ArtifactRef, ArtifactStore, sha256_file
from edgeq.quantization.escalate import QuantizationReport, format_attempts, run_quantization
from edgeq.tasks.caching import code_fingerprint, content_key, retry_transient, split_fingerprint


class QuantizeResult(BaseModel):
    int8: ArtifactRef
    report: QuantizationReport


def resolve_calibration(cfg: EdgeqConfig, version: str | None = None) -> CalibrationReader:
    """The approved calibration version named by `version`, the config, or 'latest' for this model, as a reader that
    feeds the model's input in its declared dtype."""
    first = cfg.model.inputs[0]
    return open_calibration(cfg.store_url, version or cfg.quantization.calibration, model=cfg.model.name,
                            input_name=first.name, dtype=first.dtype)


def approved_version_id(cfg: EdgeqConfig, version: str | None = None) -> str:
    """The id of the approved version named by `version` (or 'latest'), from its record alone: refuses a candidate
    or rejected version before any work, without reading (and hashing) the samples as the reader does."""
    return get_approved(ArtifactStore(cfg.store_url), version or cfg.quantization.calibration,
                        model=cfg.model.name).version


def quantize_cache_key(cfg: EdgeqConfig, fp32: ArtifactRef, calibration_version: str) -> str:
    q = cfg.quantization
    return content_key(
        "quantize", fp32=fp32.sha256, calibration=calibration_version,
        quantization=q.model_dump(mode="json", exclude={"calibration"}), max_drop=cfg.thresholds.int8_max_drop,
        metric=cfg.model.metric, targets=[t.model_dump(mode="json") for t in cfg.targets],
        validation=split_fingerprint(cfg.data.validation),
        train=split_fingerprint(cfg.data.train) if q.mode != "ptq" else None,
        weights=sha256_file(cfg.model.weights), factory=code_fingerprint(cfg.model.factory),
        store=cfg.store_url,
    )


def quantize_to_store(cfg: EdgeqConfig, fp32: ArtifactRef, calibration_version: str, opset: int, log=print) -> QuantizeResult:
    """Plain function: run policy + escalation and put the chosen INT8 model in the store."""
    store = ArtifactStore(cfg.store_url)
    cal = resolve_calibration(cfg, calibration_version)
    val = load_split(cfg.data.validation, cfg.data.preprocess)
    train = None
    if cfg.quantization.mode != "ptq" and cfg.data.train is not None:
        train = load_split(cfg.data.train, cfg.data.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_quantization(cfg, store.local_path(fp32), build_model(cfg.model), cal,
                                  cal.version.version, val, train, Path(tmp), opset, log=log)
        chosen = report.chosen_attempt
        ref = store.put_file(Path(tmp) / f"{cfg.model.name}-int8.onnx",
                             meta={"stage": "quantize", "attempt": chosen.label, "calibration": cal.version.version})
    return QuantizeResult(int8=ref, report=report)


def quantization_markdown(report: QuantizationReport, failed: str = "") -> str:
    chosen = report.chosen_attempt
    lines = [f"# INT8 quantization of `{report.model}`: {'FAILED' if failed else 'passed'}", "",
             f"- FP32 validation {report.metric_name}: **{report.fp32_metric:.4f}** (±{report.fp32_ci95:.4f}, 95 % CI); "
             f"SLA: drop ≤ {report.max_drop:g}",
             f"- calibration version `{report.calibration_version}` ({report.calibration_samples} samples)",
             f"- policy: start with **{report.policy.start}**: {'; '.join(report.policy.reasons)}",
             f"- types: **{report.types}** ({report.types_reason})"]
    if chosen:
        lines += [f"- chosen: attempt {chosen.index} — {chosen.label}: {report.metric_name} {chosen.metric:.4f} "
                  f"(drop {chosen.drop:+.4f})", f"- speed: {report.speed_note}"]
    lines += ["", "```", failed or format_attempts(report), "```"]
    return "\n".join(lines)


def publish_quantization(report: QuantizationReport, failed: str = "") -> None:
    create_markdown_artifact(markdown=quantization_markdown(report, failed), key="quantization-report",
                             description=f"INT8 quantization of {report.model}")
    create_table_artifact(table=report.attempts_table(), key="quantization-attempts",
                          description="every quantization attempt: validation metric, SLA, latency per target")
    if report.sensitivity:
        create_table_artifact(table=[r.model_dump() for r in report.sensitivity], key="quantization-sensitivity",
                              description="per-layer SQNR (dB) between FP32 and INT8 activations; lowest = most sensitive")


@task(
    name="quantize",
    cache_key_fn=lambda ctx, p: quantize_cache_key(p["cfg"], p["fp32"], p["calibration_version"]),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def quantize_task(cfg: EdgeqConfig, fp32: ArtifactRef, calibration_version: str, opset: int) -> QuantizeResult:
    logger = get_run_logger()
    try:
        return quantize_to_store(cfg, fp32, calibration_version, opset, log=logger.info)
    except GateError as exc:
        if exc.report is not None:
            publish_quantization(exc.report, failed=str(exc))
        raise
