"""The quantization stage as a Prefect task: approved calibration in, gated INT8 QDQ ONNX out."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Callable, get_args

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from edgeq.calibration.readers import CalibrationReader, open_calibration
from edgeq.calibration.versions import get_approved
from edgeq.core.data import load_inputs
from edgeq.core.errors import GateError, SpecError
from edgeq.core.modeling import build_model
from edgeq.core.specs import EdgeqConfig, PTQMethod
from edgeq.core.store import ArtifactRef, ArtifactStore, sha256_file
from edgeq.quantization.escalate import SMOOTH_QUANT_ALPHAS, QuantizationReport, format_attempts, run_quantization
from edgeq.quantization.explain import ARTIFACT_KEY, kernel_table
from edgeq.tasks.artifacts import UIProgress, display_rows
from edgeq.tasks.caching import code_fingerprint, content_key, retry_transient, split_fingerprint


class QuantizeResult(BaseModel):
    int8: ArtifactRef  # the deployment target's model, shared by every target without a form of its own
    report: QuantizationReport
    forms: dict[str, ArtifactRef] = {}  # target -> its own INT8 model (report.target_forms says which and why)


def resolve_calibration(cfg: EdgeqConfig, version: str | None = None) -> CalibrationReader:
    """The approved calibration version named by `version`, the config, or 'latest' for this model, as a reader that
    feeds EVERY model input in its declared dtype. A version lacking one of the model's inputs is refused."""
    inputs = cfg.model.inputs
    which = version or cfg.quantization.calibration
    if len(inputs) == 1:
        return open_calibration(cfg.store_url, which, model=cfg.model.name, input_name=inputs[0].name,
                                dtype=inputs[0].dtype)
    reader = open_calibration(cfg.store_url, which, model=cfg.model.name)
    missing = [i.name for i in inputs if i.name not in reader.inputs]
    if missing:
        raise SpecError(f"calibration version {reader.version.version if reader.version else which} holds inputs "
                        f"{reader.names} but the model also takes {missing}: rebuild it from captures that hold every "
                        f"model input ({[i.name for i in inputs]})")
    reader.dtypes.update({i.name: np.dtype(i.dtype) for i in inputs})
    return reader


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
        min_speedup=cfg.thresholds.int8_min_speedup,
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
    # Every named input of the model (a Batch), with labels where the split has them (QAT distils without them).
    val = load_inputs(cfg.data.validation, cfg.model.inputs, cfg.data.preprocess)
    train = None
    if cfg.quantization.mode != "ptq" and cfg.data.train is not None:
        train = load_inputs(cfg.data.train, cfg.model.inputs, cfg.data.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_quantization(cfg, store.local_path(fp32), build_model(cfg.model), cal,
                                  cal.version.version, val, train, Path(tmp), opset, log=log)
        chosen = report.chosen_attempt
        ref = store.put_file(Path(tmp) / f"{cfg.model.name}-int8.onnx",
                             meta={"stage": "quantize", "attempt": chosen.label, "calibration": cal.version.version})
        forms = {name: store.put_file(Path(tmp) / form.file,
                                      meta={"stage": "quantize", "target": name,
                                            "attempt": report.attempts[form.attempt].label,
                                            "calibration": cal.version.version})
                 for name, form in report.target_forms.items()}
    return QuantizeResult(int8=ref, report=report, forms=forms)


def quantization_markdown(report: QuantizationReport, failed: str = "") -> str:
    chosen = report.chosen_attempt
    lines = [f"# INT8 quantization of `{report.model}`: {'FAILED' if failed else 'passed'}", "",
             f"- FP32 validation {report.metric_name}: **{report.fp32_metric:.4f}** (±{report.fp32_ci95:.4f}, 95 % CI); "
             f"SLA: drop ≤ {report.max_drop:g}"
             + (f"; scored on output `{report.metric_output}`" if report.metric_output else ""),
             f"- calibration version `{report.calibration_version}` ({report.calibration_samples} samples)",
             f"- policy: start with **{report.policy.start}**: {'; '.join(report.policy.reasons)}",
             f"- types: **{report.types}** ({report.types_reason})"]
    if report.attention:
        lines.append(f"- attention graph ({len(report.attention)} node(s): {', '.join(report.attention[:4])}): the "
                     "transformer-aware PTQ rung is on the ladder")
    if chosen:
        extra = "".join(f"; {k} {v:.4f}" for k, v in chosen.extra_metrics.items())
        verdict, *why = report.speed_note.split("\n")
        lines += [f"- chosen: attempt {chosen.index} — {chosen.label}: {report.metric_name} {chosen.metric:.4f} "
                  f"(drop {chosen.drop:+.4f}){extra}", f"- speed: {verdict}"]
        lines += [f"  - {w}" for w in why]
        if report.forms_note:
            lines.append("- INT8 model per target (quantization.target_forms):")
            lines += [f"  - {w}" for w in report.forms_note.split("\n")]
        lines += [f"- note: {n}" for n in chosen.notes]
    lines += ["", "```", failed or format_attempts(report), "```"]
    return "\n".join(lines)


def publish_quantization(report: QuantizationReport, failed: str = "") -> None:
    create_markdown_artifact(markdown=quantization_markdown(report, failed), key="quantization-report",
                             description=f"INT8 quantization of {report.model}")
    create_table_artifact(table=display_rows(report.attempts_table()), key="quantization-attempts",
                          description="every quantization attempt: validation metric, SLA, latency per target")
    if report.int8_kernels:
        create_table_artifact(table=display_rows(kernel_table(report.int8_kernels)), key=ARTIFACT_KEY,
                              description=f"why INT8 is not faster than FP32 on {report.deploy_target}: per op type, "
                                          "quantized nodes in integer kernels against those still run in float")
    if report.sensitivity:
        create_table_artifact(table=display_rows(r.model_dump() for r in report.sensitivity),
                              key="quantization-sensitivity",
                              description="per-layer SQNR (dB) between FP32 and INT8 activations; lowest = most sensitive")


@task(
    name="quantize",
    cache_key_fn=lambda ctx, p: quantize_cache_key(p["cfg"], p["fp32"], p["calibration_version"]),
    persist_result=True,
    retries=1,
    retry_condition_fn=retry_transient,
)
def quantize_task(cfg: EdgeqConfig, fp32: ArtifactRef, calibration_version: str, opset: int) -> QuantizeResult:
    progress = QuantizeProgress(cfg, get_run_logger().info)
    try:
        result = quantize_to_store(cfg, fp32, calibration_version, opset, log=progress)
    except GateError as exc:
        progress.finish(str(exc).split(":", 1)[0])
        if exc.report is not None:
            publish_quantization(exc.report, failed=str(exc))
        raise
    chosen = result.report.chosen_attempt
    progress.finish(f"chose attempt {chosen.index} ({chosen.label})")
    return result


def most_attempts(cfg: EdgeqConfig) -> int:
    """At most how many attempts the escalation ladder makes (it stops after the first rung that meets the SLA)."""
    q = cfg.quantization
    # the base settings, the other calibration methods, the other engine, up to max_sensitive_fp32 layers in FP32
    ptq = 1 + (len(get_args(PTQMethod)) - 1) + 1 + q.max_sensitive_fp32 + 1  # ... and the speed remedy
    if any(not i.is_float for i in cfg.model.inputs) or cfg.model.metric == "cosine":
        # likely an attention model: the transformer PTQ rung (ONNX Runtime, NNCF), then NNCF's SmoothQuant alphas
        ptq += 2 + len(SMOOTH_QUANT_ALPHAS)
    if q.mode == "qat" or q.sla == "fixed":
        return 1
    # an INT8 model per target: at most one more attempt per other target (its runtime's own quantizer)
    ptq += len(cfg.targets) - 1 if q.target_forms == "fastest" else len(q.target_engines)
    return ptq if q.mode == "ptq" else ptq + 1


class QuantizeProgress:
    """Progress bars in the UI, fed by the escalation's log lines: one for the ladder's attempts, one for QAT's epochs.

    It is the stage's `log` callable, so every line still reaches the run's log.
    """

    _ATTEMPT = re.compile(r"attempt (\d+) ")
    _EPOCH = re.compile(r"QAT epoch .*'epoch': (\d+)")

    def __init__(self, cfg: EdgeqConfig, log: Callable[[str], None]):
        self.log = log
        self.most = most_attempts(cfg)
        self.epochs = cfg.quantization.qat_epochs
        self.done = 0
        self.ladder = UIProgress("quantization-progress", f"INT8 attempts (at most {self.most}, until one meets the SLA)")
        self.qat: UIProgress | None = None

    def __call__(self, line: str) -> None:
        self.log(line)
        if m := self._ATTEMPT.match(line):
            self.done = int(m.group(1)) + 1
            # Short of 100 % until the stage ends: the ladder may stop after this attempt or climb on.
            self.ladder.update(min(99.0, 100.0 * self.done / self.most),
                               f"{self.done} of at most {self.most} attempts; last: {line}", force=True)
        elif m := self._EPOCH.match(line):
            epoch = int(m.group(1))
            if self.qat is None:
                self.qat = UIProgress("qat-progress", f"QAT fine-tuning: {self.epochs} epochs")
            self.qat.update(100.0 * epoch / self.epochs, f"QAT epoch {epoch} of {self.epochs}",
                            force=epoch >= self.epochs)

    def finish(self, outcome: str) -> None:
        self.ladder.update(100.0, f"{self.done} attempt(s): {outcome}", force=True)
