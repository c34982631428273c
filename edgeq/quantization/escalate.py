"""Quantize until the accuracy SLA holds: PTQ -> PTQ variants -> sensitive layers in FP32 -> QAT.

The ladder is data: each rung is a function of the `Escalation` context that adds attempts, `build_ladder` orders
the rungs the policy allows (QAT first where the policy starts with it), and the climb stops at the first rung that
produced an eligible attempt: one that meets the SLA and that every required target can compile and run (the INT8
graph is what ships, not its FP32 parent). Every attempt is recorded with its validation metric, latency per target,
settings and the required targets that refused it; `choose_attempt` picks the best eligible one. The held-out test
split is never used here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args

import numpy as np
import torch
from pydantic import BaseModel, Field

from edgeq.backends import benchmark, get_backend
from edgeq.calibration.readers import CalibrationReader
from edgeq.core.errors import GateError, SpecError
from edgeq.core.metrics import score
from edgeq.core.specs import EdgeqConfig, PTQMethod, QuantizationSpec, TargetSpec, load_object
from edgeq.export import run_onnx
from edgeq.quantization.policy import PolicyDecision, decide
from edgeq.quantization.ptq import PTQSettings, preprocess_model, quantize
from edgeq.quantization.qat import qat_finetune
from edgeq.quantization.sensitivity import SensitivityRow, sensitivity_table


class Latency(BaseModel):
    """Batch-1 latency of one attempt on one target (`int8_ms`), next to the FP32 model's on the same target."""

    target: str
    fp32_ms: float | None = None
    int8_ms: float | None = None
    precision: str = ""
    error: str = ""

    @property
    def speedup(self) -> float | None:
        return self.fp32_ms / self.int8_ms if self.fp32_ms and self.int8_ms else None


class Attempt(BaseModel):
    index: int
    kind: str  # ptq | qat
    label: str
    settings: dict[str, Any]
    metric: float | None = None
    ci95: float | None = None
    drop: float | None = None
    meets_sla: bool = False
    seconds: float = 0.0
    latency: list[Latency] = Field(default_factory=list)
    failed_targets: dict[str, str] = Field(default_factory=dict)  # required target -> why it cannot take this model
    error: str = ""
    onnx_path: str | None = Field(None, exclude=True)

    @property
    def eligible(self) -> bool:
        """Meets the SLA and every required target takes it (a failure on one is in `error`)."""
        return self.meets_sla and not self.error


class QuantizationReport(BaseModel):
    model: str
    metric_name: str
    fp32_metric: float
    fp32_ci95: float
    max_drop: float
    calibration_version: str
    calibration_samples: int
    policy: PolicyDecision
    types: str
    types_reason: str
    deploy_target: str
    attempts: list[Attempt]
    sensitivity: list[SensitivityRow] = Field(default_factory=list)
    chosen: int | None = None
    faster_than_fp32: bool | None = None
    speed_note: str = ""

    @property
    def chosen_attempt(self) -> Attempt | None:
        return None if self.chosen is None else self.attempts[self.chosen]

    def attempts_table(self) -> list[dict[str, Any]]:
        rows = []
        for a in self.attempts:
            row = {"#": a.index, "kind": a.kind, "attempt": a.label,
                   f"val {self.metric_name}": None if a.metric is None else round(a.metric, 4),
                   "drop": None if a.drop is None else round(a.drop, 4), "meets SLA": a.meets_sla,
                   "seconds": round(a.seconds, 1), "chosen": a.index == self.chosen, "error": a.error}
            for lat in a.latency:
                row[f"{lat.target} int8 ms"] = None if lat.int8_ms is None else round(lat.int8_ms, 3)
                row[f"{lat.target} speedup"] = None if lat.speedup is None else round(lat.speedup, 2)
            rows.append(row)
        return rows


def measure_latency(path: Path, targets: list[TargetSpec], sample: np.ndarray, input_name: str, iters: int) -> list[Latency]:
    """Batch-1 latency of the model at `path` (in `int8_ms`) on every target whose runtime is here; a target
    that cannot run it says why."""
    out = []
    for t in targets:
        backend = get_backend(t.backend)
        ok, why = backend.availability(t.device)
        if not ok or not backend.measures_latency:
            continue
        try:
            with backend.runner(path, t) as runner:
                rep = benchmark(runner, {input_name: sample[None].astype(np.float32)}, warmup=max(5, iters // 10), iters=iters)
            out.append(Latency(target=t.name, int8_ms=rep.median_ms, precision=rep.precision))
        except Exception as exc:  # noqa: BLE001 - a target that cannot run this model is a row, not a crash
            out.append(Latency(target=t.name, error=f"{type(exc).__name__}: {exc}"[:300]))
    return out


def required_target_failures(path: Path, targets: list[TargetSpec], latency: list[Latency]) -> dict[str, str]:
    """Why each required target cannot take the INT8 model at `path` (empty: every required target can).

    A target timed in `latency` has already compiled and run this model, so a failure there is the reason; the
    others (a declared profile, a runtime that is not timed) get the compile check (a static check for a
    declared target).
    """
    timed = {lat.target: lat for lat in latency}
    failures: dict[str, str] = {}
    for t in targets:
        if not t.required:
            continue
        lat = timed.get(t.name)
        if lat is not None:
            if lat.error:
                failures[t.name] = f"failed to run it: {lat.error}"
            continue
        report = get_backend(t.backend).check_compiles(path, t, run_benchmark=False)
        if not report.ok:
            failures[t.name] = f"{report.status}: {report.reason}"
    return failures


Rung = Callable[["Escalation"], list[Attempt]]


@dataclass
class Escalation:
    """One climb of the ladder: what every rung reads, and the attempts so far (in `attempts`, in order)."""

    cfg: EdgeqConfig
    fp32_onnx: Path
    model: torch.nn.Module  # the FP32 model, for QAT
    calib: CalibrationReader  # the approved calibration version
    val_x: np.ndarray  # validation data: chooses among attempts
    val_y: np.ndarray | None
    train: tuple[np.ndarray, np.ndarray] | None  # QAT's training split
    opset: int
    deploy: TargetSpec  # the target whose latency decides between equally accurate attempts
    base: PTQSettings  # the first PTQ attempt: the config's settings, INT8 types/reduce-range for `deploy`
    fp32_metric: float
    reference: np.ndarray | None  # FP32 outputs, where the metric scores against them (cosine)
    fp32_latency: dict[str, Latency]  # per target name
    work: Path  # every attempt's model is written here
    log: Callable[[str], None] = print
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[SensitivityRow] = field(default_factory=list)

    @property
    def q(self) -> QuantizationSpec:
        return self.cfg.quantization

    @property
    def input_name(self) -> str:
        return self.cfg.model.inputs[0].name

    @property
    def output_name(self) -> str:
        return self.cfg.model.outputs[0]

    @property
    def met_sla(self) -> bool:
        """An attempt can ship: it meets the SLA and every required target takes it."""
        return any(a.eligible for a in self.attempts)


def evaluate(ctx: Escalation, kind: str, label: str, settings: dict[str, Any],
             build: Callable[[Path], dict[str, Any] | None]) -> Attempt:
    """Build one attempt, score it on the validation data, time it on every target, check it on every required
    target, and record it.

    `build(path)` writes the INT8 model to `path` and may return settings learned while building. A failure is the
    attempt's error, not the run's (a required target that cannot compile or run the model included: the attempt
    is then not eligible); a `SpecError` (the config itself is wrong) stops the run.
    """
    a = Attempt(index=len(ctx.attempts), kind=kind, label=label, settings=settings)
    path = ctx.work / f"attempt{a.index}.onnx"
    metric = ctx.cfg.model.metric
    t0 = time.perf_counter()
    try:
        a.settings.update(build(path) or {})
        out = run_onnx(path, ctx.val_x, ctx.input_name, ctx.output_name)
        a.metric, a.ci95 = score(metric, out, ctx.val_y, ctx.reference)
        a.drop = ctx.fp32_metric - a.metric
        a.meets_sla = a.drop <= ctx.cfg.thresholds.int8_max_drop
        a.onnx_path = str(path)
        a.latency = measure_latency(path, ctx.cfg.targets, ctx.val_x[0], ctx.input_name, ctx.q.latency_iters)
        for lat in a.latency:
            base = ctx.fp32_latency.get(lat.target)
            lat.fp32_ms = base.int8_ms if base else None  # the baseline run measured the FP32 model
        a.failed_targets = required_target_failures(path, ctx.cfg.targets, a.latency)
        if a.failed_targets:
            a.error = "; ".join(f"required target {t!r} cannot take this INT8 model: {why}"
                                for t, why in a.failed_targets.items())[:800]
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed attempt is a row in the table
        a.error = f"{type(exc).__name__}: {exc}"[:400]
    a.seconds = time.perf_counter() - t0
    ctx.attempts.append(a)
    ctx.log(f"attempt {a.index} {label}: {metric}={a.metric if a.metric is None else round(a.metric, 4)} "
            f"drop={a.drop if a.drop is None else round(a.drop, 4)} meets SLA={a.meets_sla} {a.error}")
    return a


def try_ptq(ctx: Escalation, settings: PTQSettings) -> Attempt:
    def build(path: Path) -> None:
        quantize(ctx.fp32_onnx, path, ctx.calib, settings)

    return evaluate(ctx, "ptq", settings.label(), settings.record(), build)


# ---------------------------------------------------------------- the rungs
def ptq_base(ctx: Escalation) -> list[Attempt]:
    """The config's PTQ settings, with the INT8 types and weight range chosen for the deployment target."""
    return [try_ptq(ctx, ctx.base)]


def ptq_variants(ctx: Escalation) -> list[Attempt]:
    """The other calibration methods on ONNX Runtime, then the other engine."""
    base = ctx.base
    other_engine = "nncf" if base.engine == "onnxruntime" else "onnxruntime"
    variants = [base.model_copy(update={"method": m, "engine": "onnxruntime"})
                for m in get_args(PTQMethod) if m != base.method]
    variants.append(base.model_copy(update={"engine": other_engine}))
    return [try_ptq(ctx, s) for s in variants]


def keep_sensitive_fp32(ctx: Escalation) -> list[Attempt]:
    """The best ONNX Runtime PTQ so far with its most sensitive layers kept in FP32, one more layer per attempt (at
    most `quantization.max_sensitive_fp32`) until one meets the SLA."""
    # ONNX Runtime's QDQ keeps the FP32 tensor names that the sensitivity tool matches on (NNCF's does not).
    done = [a for a in ctx.attempts if a.kind == "ptq" and a.onnx_path and not a.error
            and a.settings.get("engine") == "onnxruntime"]
    if not done or ctx.q.max_sensitive_fp32 == 0:
        return []
    best = max(done, key=lambda a: a.metric)
    pre = preprocess_model(ctx.fp32_onnx, ctx.work / "fp32-pre.onnx")
    ctx.sensitivity = sensitivity_table(pre, Path(best.onnx_path), ctx.calib, ctx.q.op_types)
    out = []
    for k in range(1, min(ctx.q.max_sensitive_fp32, len(ctx.sensitivity)) + 1):
        keep = list(dict.fromkeys(ctx.base.keep_fp32_nodes + [r.node for r in ctx.sensitivity[:k]]))
        out.append(try_ptq(ctx, ctx.base.model_copy(update={
            "engine": "onnxruntime", "keep_fp32_nodes": keep, "method": best.settings.get("method", ctx.base.method)})))
        if out[-1].meets_sla:
            break
    return out


def qat(ctx: Escalation) -> list[Attempt]:
    """Fake-quant fine-tuning on the training split (NNCF), quantizer ranges initialised from the calibration set."""
    q = ctx.q
    loss = load_object(q.qat_loss) if q.qat_loss else None
    train_x, train_y = ctx.train

    def build(path: Path) -> dict[str, Any]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # measured: NNCF's range init ran 10x slower with 2 threads on a busy 2-core CPU
        try:
            res = qat_finetune(ctx.model, [feed[ctx.input_name] for feed in ctx.calib], train_x, train_y,
                               ctx.input_name, ctx.output_name, ctx.opset, path, epochs=q.qat_epochs, lr=q.qat_lr,
                               loss_fn=loss, on_epoch=lambda e: ctx.log(f"QAT epoch {e}"),
                               reduce_range=ctx.base.reduce_range, thresholds=ctx.cfg.thresholds)
        finally:
            torch.set_num_threads(threads)
        return {"engine": res.engine, "export_parity_max_abs": res.parity_max_abs,
                "export_top1_agreement": res.parity_top1_agreement, "epochs_log": res.epochs}

    settings = {"epochs": q.qat_epochs, "lr": q.qat_lr, "loss": q.qat_loss or "cross-entropy"}
    return [evaluate(ctx, "qat", f"QAT {q.qat_epochs} epochs lr {q.qat_lr}", settings, build)]


# A new rung is a function above plus its entry here.
PTQ_RUNGS: tuple[Rung, ...] = (ptq_base, ptq_variants, keep_sensitive_fp32)
QAT_RUNGS: tuple[Rung, ...] = (qat,)


def build_ladder(policy: PolicyDecision, can_train: bool) -> list[Rung]:
    """The rungs the policy allows, in its order: PTQ then QAT, or QAT first where the policy starts with it."""
    ptq = list(PTQ_RUNGS) if policy.allow_ptq else []
    qat_ = list(QAT_RUNGS) if policy.allow_qat and can_train else []
    return qat_ + ptq if policy.start == "qat" else ptq + qat_


def climb(ctx: Escalation, ladder: list[Rung]) -> None:
    """Run the rungs in order, stopping after the first rung that produced an attempt meeting the SLA."""
    for rung in ladder:
        rung(ctx)
        if ctx.met_sla:
            return


# ---------------------------------------------------------------- the choice
def choose_attempt(attempts: list[Attempt], deploy_target: str) -> Attempt | None:
    """The most accurate eligible attempt (meets the SLA, every required target takes it; metric to 6 places), the
    fastest on `deploy_target` among equals; None when no attempt is eligible."""
    passing = [a for a in attempts if a.eligible]
    if not passing:
        return None

    def deploy_ms(a: Attempt) -> float:
        lat = next((lat for lat in a.latency if lat.target == deploy_target and lat.int8_ms), None)
        return lat.int8_ms if lat else float("inf")

    return max(passing, key=lambda a: (round(a.metric, 6), -deploy_ms(a)))


def speed_verdict(chosen: Attempt, deploy_target: str) -> tuple[bool | None, str]:
    """Whether the chosen attempt is faster than FP32 on the deployment target, and the sentence that says so."""
    lat = next((lat for lat in chosen.latency if lat.target == deploy_target), None)
    if lat is None or lat.speedup is None:
        return None, f"latency on deployment target {deploy_target} could not be measured here"
    ratio, word = (lat.speedup, "faster") if lat.speedup > 1 else (1 / lat.speedup, "SLOWER")
    note = (f"INT8 is {ratio:.2f}x {word} than FP32 on {deploy_target} "
            f"({lat.int8_ms:.3f} ms vs {lat.fp32_ms:.3f} ms at batch 1)")
    if lat.speedup <= 1.0:
        note += ": the INT8 model is NOT faster than FP32 on the deployment target"
    return lat.speedup > 1.0, note


# ---------------------------------------------------------------- the stage
def deploy_target(cfg: EdgeqConfig) -> TargetSpec:
    q = cfg.quantization
    deploy = next((t for t in cfg.targets if t.name == q.deploy_target), None) if q.deploy_target else cfg.targets[0]
    if deploy is None:
        raise SpecError(f"quantization.deploy_target {q.deploy_target!r} is not one of the targets "
                        f"({', '.join(t.name for t in cfg.targets)})")
    return deploy


def first_ptq_settings(q: QuantizationSpec, deploy: TargetSpec) -> tuple[PTQSettings, str]:
    """The first PTQ attempt's settings, and why its INT8 types: the config's, else the deployment target's scheme
    (which also decides `reduce_range` unless the config sets it)."""
    scheme = get_backend(deploy.backend).int8_scheme(deploy)
    types, reason = (q.types, "set in the config") if q.types != "auto" else (scheme.types, scheme.reason)
    reduce_range = scheme.reduce_range if q.reduce_range is None else q.reduce_range
    if q.reduce_range is not None:
        reason += f"; reduce_range {q.reduce_range} set in the config"
    return PTQSettings.from_spec(q, types=types, reduce_range=reduce_range), reason


def run_quantization(
    cfg: EdgeqConfig,
    fp32_onnx: Path,
    model: torch.nn.Module,
    calib: CalibrationReader,
    calibration_version: str,
    val: tuple[np.ndarray, np.ndarray | None],
    train: tuple[np.ndarray, np.ndarray] | None,
    out_dir: Path,
    opset: int,
    log: Callable[[str], None] = print,
) -> QuantizationReport:
    """Run the policy and climb the ladder; the chosen model is copied to `out_dir/<model>-int8.onnx`."""
    q, spec = cfg.quantization, cfg.model
    deploy = deploy_target(cfg)
    base, types_reason = first_ptq_settings(q, deploy)
    policy = decide(model, spec.metric, q.mode, q.sla)
    can_train = train is not None and len(train[0]) > 0
    if policy.allow_qat and not policy.allow_ptq and not can_train:
        raise SpecError("QAT was requested but the config has no training data: set data.train")

    val_x, val_y = val
    fp32_out = run_onnx(fp32_onnx, val_x, spec.inputs[0].name, spec.outputs[0])
    reference = fp32_out if spec.metric == "cosine" else None
    fp32_metric, fp32_ci = score(spec.metric, fp32_out, val_y, reference)
    fp32_latency = {lat.target: lat
                    for lat in measure_latency(fp32_onnx, cfg.targets, val_x[0], spec.inputs[0].name, q.latency_iters)}
    ctx = Escalation(cfg=cfg, fp32_onnx=fp32_onnx, model=model, calib=calib, val_x=val_x, val_y=val_y, train=train,
                     opset=opset, deploy=deploy, base=base, fp32_metric=fp32_metric, reference=reference,
                     fp32_latency=fp32_latency, work=Path(tempfile.mkdtemp(prefix="edgeq-quant-")), log=log)
    try:
        climb(ctx, build_ladder(policy, can_train))
        report = QuantizationReport(
            model=spec.name, metric_name=spec.metric, fp32_metric=fp32_metric, fp32_ci95=fp32_ci,
            max_drop=cfg.thresholds.int8_max_drop, calibration_version=calibration_version,
            calibration_samples=len(calib), policy=policy, types=base.types, types_reason=types_reason,
            deploy_target=deploy.name, attempts=ctx.attempts, sensitivity=ctx.sensitivity)
        chosen = choose_attempt(ctx.attempts, deploy.name)
        if chosen is None:
            refused: dict[str, str] = {}
            for a in ctx.attempts:
                for target, why in a.failed_targets.items():
                    refused.setdefault(target, why)
            sla = f"drop <= {report.max_drop:g} of FP32 {spec.metric} {fp32_metric:.4f} on validation data"
            if refused:
                met = sum(a.meets_sla for a in ctx.attempts)
                head = ("no INT8 attempt can ship: " + "; ".join(
                    f"required target {t!r} cannot take the INT8 models ({_clip(why)})" for t, why in refused.items())
                    + f"; {met} of {len(ctx.attempts)} attempt(s) met the SLA ({sla}). Change the target (its profile, "
                      "runtime or `required`) or the model")
            else:
                head = f"no INT8 attempt met the SLA ({sla})"
            raise GateError(head + ":\n" + format_attempts(report), report=report)
        report.chosen = chosen.index
        report.faster_than_fp32, report.speed_note = speed_verdict(chosen, deploy.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(chosen.onnx_path, out_dir / f"{spec.name}-int8.onnx")
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return report


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def format_attempts(report: QuantizationReport) -> str:
    lines = [f"{'#':>2} {'kind':4} {'val ' + report.metric_name:>10} {'drop':>8} {'SLA':>4}  attempt"]
    for a in report.attempts:
        m = "-" if a.metric is None else f"{a.metric:.4f}"
        d = "-" if a.drop is None else f"{a.drop:+.4f}"
        lines.append(f"{a.index:>2} {a.kind:4} {m:>10} {d:>8} {'yes' if a.meets_sla else 'no':>4}  {a.label}"
                     + (f"  [{a.error}]" if a.error else ""))
    return "\n".join(lines)


