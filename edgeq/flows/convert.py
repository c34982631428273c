"""Flow `convert-model` (`convert_model`): export -> compile check -> quantize -> four-way validation -> publish.

Each stage is a cached task keyed on content, so an unchanged re-run is cache hits end to end and a
run that crashed mid-way resumes from its cached stages.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from edgeq.calibration.versions import load_version
from edgeq.core.errors import SpecError
from edgeq.core.specs import EdgeqConfig
from edgeq.core.store import ArtifactStore, sha256_file
from edgeq.flows.compile_check import run_compile_check_stage, run_int8_compile_check_stage
from edgeq.flows.export import run_export_stage
from edgeq.flows.quantize import run_quantize_stage
from edgeq.tasks.caching import call_cached, on_store
from edgeq.tasks.config import load_prepared, prepare
from edgeq.tasks.publish import publish_task
from edgeq.tasks.validate import ValidateResult, publish_form_validation, publish_validation, validate_task
from edgeq.validation import check_device_stage, not_independent


class ConvertParams(BaseModel):
    config: str = Field("digits-demo.yaml", description="path of the edgeq YAML config (on the worker)")
    inline: dict[str, Any] | None = Field(None, description="an inline config (same fields as the YAML); overrides `config`")
    calibration: str = Field("latest", description="approved calibration version id, or 'latest' approved for the model")
    mode: Literal["auto", "ptq", "qat"] | None = Field(None, description="quantization mode (default: the config's)")
    max_drop: float | None = Field(None, ge=0, le=1, description="INT8 SLA: max metric drop vs FP32 (default: the config's)")


def resolve_config(params: ConvertParams) -> EdgeqConfig:
    if params.inline is not None:
        from pathlib import Path

        try:
            cfg = EdgeqConfig.model_validate({**params.inline, "base_dir": Path.cwd()}, context={"base_dir": Path.cwd()})
        except Exception as exc:  # noqa: BLE001
            raise SpecError(f"inline config: {exc}") from None
        prepare(cfg)
    else:
        cfg = load_prepared(params.config)
    q = cfg.quantization.model_copy(update={k: v for k, v in {"mode": params.mode, "calibration": params.calibration}.items() if v})
    th = cfg.thresholds.model_copy(update={"int8_max_drop": params.max_drop} if params.max_drop is not None else {})
    return cfg.model_copy(update={"quantization": q, "thresholds": th})


def lineage(cfg: EdgeqConfig, exported, quantized, calibration) -> dict[str, Any]:
    chosen = quantized.report.chosen_attempt
    d = calibration.decision
    return {
        "model": {"name": cfg.model.name, "factory": cfg.model.factory, "kwargs": cfg.model.kwargs,
                  "weights_sha256": sha256_file(cfg.model.weights),
                  "fp32_onnx_sha256": exported.onnx.sha256, "int8_onnx_sha256": quantized.int8.sha256,
                  "opset": exported.report.opset, "exporter": exported.report.exporter},
        "calibration": {"version": calibration.version, "size": calibration.size,
                        "reviewer": d.reviewer if d else None, "decided_at": d.decided_at if d else None,
                        "comment": d.comment if d else None,
                        "record_sha256": calibration.content_sha256, "decision_sha256": d.sha256 if d else None},
        "quantization": {"chosen": chosen.label, "kind": chosen.kind,
                         "settings": {k: v for k, v in chosen.settings.items() if k != "epochs_log"},
                         "types": quantized.report.types, "policy": quantized.report.policy.reasons},
        "thresholds": cfg.thresholds.model_dump(mode="json"),
    }


def form_validation_config(cfg: EdgeqConfig, target: str) -> EdgeqConfig:
    """The config that validates `target`'s own INT8 model: that target as the device stage, unless it runs the
    reference runtime (ONNX Runtime on this CPU: it would check nothing), where the config's device stage stays."""
    t = next(t for t in cfg.targets if t.name == target)
    if not_independent(t):
        return cfg
    return cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"device_target": target})})


def validate_target_forms(cfg: EdgeqConfig, exported, quantized, version: str,
                          store: ArtifactStore) -> dict[str, dict[str, Any]]:
    """Four-way validation of every target's own INT8 model (quantization.target_forms), each against its own ONNX
    INT8 with that target as the device stage; a form that fails a gate stops the run ("do not ship"), as the shared
    model's validation does. Returns per target its record for the manifest."""
    out: dict[str, dict[str, Any]] = {}
    for name, ref in quantized.forms.items():
        form = quantized.report.target_forms[name]
        cfg_t = form_validation_config(cfg, name)
        task_ = on_store(validate_task, cfg.store_url).with_options(task_run_name=f"validate-four-way[{name}]")
        validated, cached = call_cached(task_, cfg_t, exported.onnx, ref, version, exported.report.opset,
                                        gone=lambda r: not (store.exists(r.chart) and store.exists(r.report_json)))
        if not cached:
            publish_form_validation(name, validated.report)
        attempt = quantized.report.attempts[form.attempt]
        out[name] = {"attempt": attempt.index, "label": attempt.label, "reason": form.reason,
                     "int8_onnx_sha256": ref.sha256, "device_stage": validated.report.device_target,
                     "passed": validated.report.passed,
                     "four_way": validated.report.model_dump(mode="json"),
                     "four_way_report": validated.report_json.uri}
    return out


@flow(name="convert-model", log_prints=True)
def convert_model(params: ConvertParams = ConvertParams()) -> dict[str, Any]:
    """The whole conversion: returns the published bundle's manifest (with `uri`).

    Two conversions of the same inputs agree: every stage writes content-addressed artifacts, and the bundle is
    placed by an atomic rename (the first one wins, the second returns it). The `convert-model` deployment also
    runs one conversion at a time (deployments/prefect.yaml). No global lock is held here: on a temporary
    (ephemeral) Prefect server nothing reclaims the slot of a killed process, so a crash would block the model.
    """
    cfg = resolve_config(params)
    logger = get_run_logger()
    check_device_stage(cfg)  # a device stage that would hold ONNX Runtime against itself is refused before any work
    exported = run_export_stage(cfg)
    run_compile_check_stage(cfg, exported)
    quantized = run_quantize_stage(cfg, exported, cfg.quantization.calibration)
    run_int8_compile_check_stage(cfg, quantized.int8)  # what ships must run on every required target
    version = quantized.report.calibration_version
    store = ArtifactStore(cfg.store_url)
    validated: ValidateResult
    validated, cached = call_cached(on_store(validate_task, cfg.store_url), cfg, exported.onnx, quantized.int8,
                                    version, exported.report.opset,
                                    gone=lambda r: not (store.exists(r.chart) and store.exists(r.report_json)))
    if not cached:
        publish_validation(validated.report, store.read_bytes(validated.chart))
    forms = validate_target_forms(cfg, exported, quantized, version, store)
    calibration = load_version(store, version)
    measurements = {
        "four_way": validated.report.model_dump(mode="json"),
        "four_way_report": validated.report_json.uri,
        "quantization_attempts": quantized.report.attempts_table(),
        "speed": quantized.report.speed_note,
        # why INT8 is not faster on the deployment target (empty when it is): integer kernels per op type
        "int8_kernels": [r.model_dump(mode="json") for r in quantized.report.int8_kernels],
    }
    if quantized.report.forms_note:
        measurements["target_forms_note"] = quantized.report.forms_note
    manifest = publish_task(cfg, quantized.int8, lineage(cfg, exported, quantized, calibration), measurements,
                            validated.report.passed and all(f["passed"] for f in forms.values()),
                            forms=quantized.forms, form_records=forms)
    logger.info("published %s at %s", manifest["bundle_id"], manifest["uri"])
    return manifest
