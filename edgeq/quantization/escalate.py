"""Quantize until the accuracy SLA holds: PTQ -> PTQ variants -> sensitive layers in FP32 -> QAT.

Every attempt is recorded with its validation metric, latency per target and settings; the
best attempt meeting the SLA wins. The held-out test split is never used here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, Field

from edgeq.backends import get_backend
from edgeq.core.errors import GateError, SpecError
from edgeq.export import run_onnx
from edgeq.core.metrics import score
from edgeq.quantization.policy import PolicyDecision, decide
from edgeq.quantization.ptq import PTQSettings, preprocess_model, quantize
from edgeq.quantization.sensitivity import SensitivityRow, sensitivity_table
from edgeq.core.specs import EdgeqConfig, TargetSpec


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
    error: str = ""
    onnx_path: str | None = Field(None, exclude=True)


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
    from edgeq.backends import get_backend
    from edgeq.backends.base import benchmark

    out = []
    for t in targets:
        backend = get_backend(t.backend)
        ok, why = backend.availability(t.device)
        if not ok or t.backend == "declared":
            continue
        try:
            with backend.runner(path, t) as runner:
                rep = benchmark(runner, {input_name: sample[None].astype(np.float32)}, warmup=max(5, iters // 10), iters=iters)
            out.append(Latency(target=t.name, int8_ms=rep.median_ms, precision=rep.precision))
        except Exception as exc:  # noqa: BLE001 - a target that cannot run this model is a row, not a crash
            out.append(Latency(target=t.name, error=f"{type(exc).__name__}: {exc}"[:300]))
    return out


QATFn = Callable[..., Any]


def run_quantization(
    cfg: EdgeqConfig,
    fp32_onnx: Path,
    model,
    calib: np.ndarray,
    calibration_version: str,
    val: tuple[np.ndarray, np.ndarray | None],
    train: tuple[np.ndarray, np.ndarray] | None,
    out_dir: Path,
    opset: int,
    log: Callable[[str], None] = print,
) -> QuantizationReport:
    """Run the policy and escalation; the chosen model is copied to `out_dir/<model>-int8.onnx`."""
    q = cfg.quantization
    spec = cfg.model
    input_name, output_name = spec.inputs[0].name, spec.outputs[0]
    val_x, val_y = val
    max_drop = cfg.thresholds.int8_max_drop
    deploy = next((t for t in cfg.targets if t.name == q.deploy_target), None) if q.deploy_target else cfg.targets[0]
    if deploy is None:
        raise SpecError(f"quantization.deploy_target {q.deploy_target!r} is not one of the targets "
                        f"({', '.join(t.name for t in cfg.targets)})")
    scheme = get_backend(deploy.backend).int8_scheme(deploy)
    types, types_reason = (q.types, "set in the config") if q.types != "auto" else (scheme.types, scheme.reason)
    reduce_range = scheme.reduce_range if q.reduce_range is None else q.reduce_range
    if q.reduce_range is not None:
        types_reason += f"; reduce_range {q.reduce_range} set in the config"
    policy = decide(model, spec.metric, q.mode, q.sla)
    if policy.allow_qat and not policy.allow_ptq and (train is None or len(train[0]) == 0):
        raise SpecError("QAT was requested but the config has no training data: set data.train")

    fp32_out = run_onnx(fp32_onnx, val_x, input_name, output_name)
    reference = fp32_out if spec.metric == "cosine" else None
    fp32_metric, fp32_ci = score(spec.metric, fp32_out, val_y, reference)
    sample = val_x[0]
    fp32_lat = {lat.target: lat for lat in measure_latency(fp32_onnx, cfg.targets, sample, input_name, q.latency_iters)}
    work = Path(tempfile.mkdtemp(prefix="edgeq-quant-"))
    attempts: list[Attempt] = []
    sensitivity: list[SensitivityRow] = []

    def evaluate(kind: str, label: str, settings: dict, build: Callable[[Path], Path]) -> Attempt:
        a = Attempt(index=len(attempts), kind=kind, label=label, settings=settings)
        path = work / f"attempt{a.index}.onnx"
        t0 = time.perf_counter()
        try:
            build(path)
            out = run_onnx(path, val_x, input_name, output_name)
            a.metric, a.ci95 = score(spec.metric, out, val_y, reference)
            a.drop = fp32_metric - a.metric
            a.meets_sla = a.drop <= max_drop
            a.onnx_path = str(path)
            a.latency = measure_latency(path, cfg.targets, sample, input_name, q.latency_iters)
            for lat in a.latency:
                base = fp32_lat.get(lat.target)
                lat.fp32_ms = base.int8_ms if base else None  # the baseline run measured the FP32 model
        except SpecError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed attempt is a row in the table
            a.error = f"{type(exc).__name__}: {exc}"[:400]
        a.seconds = time.perf_counter() - t0
        attempts.append(a)
        log(f"attempt {a.index} {label}: {spec.metric}={a.metric if a.metric is None else round(a.metric, 4)} "
            f"drop={a.drop if a.drop is None else round(a.drop, 4)} meets SLA={a.meets_sla} {a.error}")
        return a

    def ptq(settings: PTQSettings) -> Attempt:
        return evaluate("ptq", settings.label(), settings.model_dump(),
                        lambda p: quantize(fp32_onnx, p, calib, input_name, settings))

    def qat() -> Attempt:
        from edgeq.quantization.qat import qat_finetune
        from edgeq.core.specs import load_object

        loss = load_object(q.qat_loss) if q.qat_loss else None
        settings = {"epochs": q.qat_epochs, "lr": q.qat_lr, "loss": q.qat_loss or "cross-entropy"}

        def build(p: Path) -> Path:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # measured: NNCF's range init ran 10x slower with 2 threads on a busy 2-core CPU
            try:
                return _finetune(p)
            finally:
                torch.set_num_threads(threads)

        def _finetune(p: Path) -> Path:
            res = qat_finetune(model, list(calib[:, None]), train[0], train[1], input_name, output_name, opset, p,
                               epochs=q.qat_epochs, lr=q.qat_lr, loss_fn=loss,
                               on_epoch=lambda e: log(f"QAT epoch {e}"), reduce_range=reduce_range)
            settings.update({"engine": res.engine, "export_parity_max_abs": res.parity_max_abs,
                             "export_top1_agreement": res.parity_top1_agreement, "epochs_log": res.epochs})
            return res.onnx_path

        return evaluate("qat", f"QAT {q.qat_epochs} epochs lr {q.qat_lr}", settings, build)

    base = PTQSettings(engine=q.engine, method=q.method, types=types, reduce_range=reduce_range,
                       per_channel=q.per_channel, op_types=q.op_types,
                       keep_fp32_nodes=q.keep_fp32_nodes, keep_fp32_op_types=q.keep_fp32_op_types)
    rungs: list[Callable[[], list[Attempt]]] = []
    if policy.allow_ptq:
        rungs.append(lambda: [ptq(base)])
        others = [m for m in ("minmax", "entropy", "percentile") if m != base.method]
        other_engine = "nncf" if base.engine == "onnxruntime" else "onnxruntime"
        rungs.append(lambda: [ptq(base.model_copy(update={"method": m, "engine": "onnxruntime"})) for m in others]
                     + [ptq(base.model_copy(update={"engine": other_engine}))])

        def keep_sensitive() -> list[Attempt]:
            # ONNX Runtime's QDQ keeps the FP32 tensor names that the sensitivity tool matches on (NNCF's does not).
            done = [a for a in attempts if a.kind == "ptq" and a.onnx_path and not a.error
                    and a.settings.get("engine") == "onnxruntime"]
            if not done or q.max_sensitive_fp32 == 0:
                return []
            best = max(done, key=lambda a: a.metric)
            pre = preprocess_model(fp32_onnx, work / "fp32-pre.onnx")
            sensitivity[:] = sensitivity_table(pre, Path(best.onnx_path), calib, input_name, base.op_types)
            out = []
            for k in range(1, min(q.max_sensitive_fp32, len(sensitivity)) + 1):
                keep = list(dict.fromkeys(base.keep_fp32_nodes + [r.node for r in sensitivity[:k]]))
                out.append(ptq(base.model_copy(update={"engine": "onnxruntime", "keep_fp32_nodes": keep,
                                                       "method": best.settings.get("method", base.method)})))
                if out[-1].meets_sla:
                    break
            return out

        rungs.append(keep_sensitive)
    if policy.allow_qat and train is not None and len(train[0]):
        if policy.start == "qat":
            rungs.insert(0, lambda: [qat()])
        else:
            rungs.append(lambda: [qat()])

    for rung in rungs:
        rung()
        if any(a.meets_sla for a in attempts):
            break

    report = QuantizationReport(
        model=spec.name, metric_name=spec.metric, fp32_metric=fp32_metric, fp32_ci95=fp32_ci, max_drop=max_drop,
        calibration_version=calibration_version, calibration_samples=len(calib), policy=policy, types=types,
        types_reason=types_reason, deploy_target=deploy.name, attempts=attempts, sensitivity=sensitivity)
    passing = [a for a in attempts if a.meets_sla]
    if not passing:
        err = GateError(f"no INT8 attempt met the SLA (drop <= {max_drop:g} of FP32 {spec.metric} "
                        f"{fp32_metric:.4f} on validation data):\n" + format_attempts(report))
        err.report = report
        shutil.rmtree(work, ignore_errors=True)
        raise err

    def deploy_ms(a: Attempt) -> float:
        lat = next((lat for lat in a.latency if lat.target == deploy.name and lat.int8_ms), None)
        return lat.int8_ms if lat else float("inf")

    chosen = max(passing, key=lambda a: (round(a.metric, 6), -deploy_ms(a)))
    report.chosen = chosen.index
    lat = next((lat for lat in chosen.latency if lat.target == deploy.name), None)
    if lat is None or lat.speedup is None:
        report.speed_note = f"latency on deployment target {deploy.name} could not be measured here"
    else:
        report.faster_than_fp32 = lat.speedup > 1.0
        ratio, word = (lat.speedup, "faster") if lat.speedup > 1 else (1 / lat.speedup, "SLOWER")
        report.speed_note = (f"INT8 is {ratio:.2f}x {word} than FP32 on {deploy.name} "
                             f"({lat.int8_ms:.3f} ms vs {lat.fp32_ms:.3f} ms at batch 1)")
        if lat.speedup <= 1.0:
            report.speed_note += ": the INT8 model is NOT faster than FP32 on the deployment target"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(chosen.onnx_path, out_dir / f"{spec.name}-int8.onnx")
    shutil.rmtree(work, ignore_errors=True)
    return report


def format_attempts(report: QuantizationReport) -> str:
    lines = [f"{'#':>2} {'kind':4} {'val ' + report.metric_name:>10} {'drop':>8} {'SLA':>4}  attempt"]
    for a in report.attempts:
        m = "-" if a.metric is None else f"{a.metric:.4f}"
        d = "-" if a.drop is None else f"{a.drop:+.4f}"
        lines.append(f"{a.index:>2} {a.kind:4} {m:>10} {d:>8} {'yes' if a.meets_sla else 'no':>4}  {a.label}"
                     + (f"  [{a.error}]" if a.error else ""))
    return "\n".join(lines)


