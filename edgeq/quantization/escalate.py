"""Quantize until the accuracy SLA holds: PTQ -> PTQ variants -> sensitive layers in FP32 -> QAT.

Every stage feeds all of the model's named inputs (a Batch, `{input name: array}`) and reads all of its outputs; the
metric scores the first output (`model.outputs[0]`, recorded as `metric_output`). Attention models (the ONNX graph
has a MatMul of two computed tensors, or a Softmax feeding a MatMul) get the transformer PTQ rung first: ONNX
Runtime on MatMul/Gemm only and NNCF with model_type TRANSFORMER, LayerNorm/Softmax/GELU/embeddings in FP32.

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
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args

import numpy as np
import torch
from pydantic import BaseModel, Field

from edgeq.backends import benchmark, get_backend, interleaved_benchmark, known_backends, paired_benchmark
from edgeq.backends.base import KernelRow
from edgeq.calibration.readers import CalibrationReader
from edgeq.core.data import batch_size
from edgeq.core.errors import GateError, SpecError
from edgeq.core.metrics import extra_metrics, score
from edgeq.core.onnx_graph import load_onnx
from edgeq.core.specs import EdgeqConfig, PTQMethod, QuantizationSpec, TargetSpec, load_object
from edgeq.export import run_onnx
from edgeq.quantization.explain import explain_speed, explanation_lines
from edgeq.quantization.policy import PolicyDecision, decide
from edgeq.quantization.ptq import PTQSettings, as_batch, attention_nodes, depthwise_convs, preprocess_model, quantize
from edgeq.quantization.qat import qat_finetune
from edgeq.quantization.sensitivity import SensitivityRow, sensitivity_table


class Latency(BaseModel):
    """Batch-1 latency of one attempt on one target (`int8_ms`), next to the FP32 model's on the same target."""

    target: str
    fp32_ms: float | None = None
    int8_ms: float | None = None
    precision: str = ""
    error: str = ""
    # Set by the speed verdict (`side_by_side`): FP32 and INT8 timed in alternating rounds, FP32/INT8 per round.
    round_ratios: list[float] = Field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        if self.round_ratios:
            return float(np.median(self.round_ratios))
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
    extra_metrics: dict[str, float] = Field(default_factory=dict)  # e.g. retrieval overlap@10 for an embedder
    notes: list[str] = Field(default_factory=list)  # what the attempt had to work around (a fallback, a rewrite)
    error: str = ""
    onnx_path: str | None = Field(None, exclude=True)

    @property
    def eligible(self) -> bool:
        """Meets the SLA and every required target takes it (a failure on one is in `error`)."""
        return self.meets_sla and not self.error

    def latency_on(self, target: str) -> Latency | None:
        """This attempt's latency row for `target` (None: not timed there)."""
        return next((lat for lat in self.latency if lat.target == target), None)

    def set_latency(self, row: Latency) -> None:
        """Replace this attempt's latency row for `row.target` (a side-by-side measurement replaces the ladder's)."""
        self.latency = [row if lat.target == row.target else lat for lat in self.latency]


class TargetForm(BaseModel):
    """A target that gets another INT8 model than the deployment target's (`quantization.target_forms` /
    `target_engines`): which attempt, why, and the file the stage wrote it to."""

    target: str
    attempt: int
    reason: str
    file: str = ""  # the form's file name in the stage's output folder


class QuantizationReport(BaseModel):
    model: str
    metric_name: str
    fp32_metric: float
    fp32_ci95: float
    metric_output: str = ""  # the output the metric scores (the model's first); every output is run
    fp32_extra_metrics: dict[str, float] = Field(default_factory=dict)
    attention: list[str] = Field(default_factory=list)  # the ONNX graph's attention nodes (empty: not an attention model)
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
    speed_note: str = ""  # the verdict; when INT8 is not faster, followed by `speed_explanation`
    speed_explanation: str = ""  # why not faster: integer kernels against float ops (explain.explanation_lines)
    int8_kernels: list[KernelRow] = Field(default_factory=list)  # per op type on the deployment target (explain.py)
    # Targets that get another attempt than `chosen` (quantization.target_forms / target_engines), and one line per
    # target considered saying what it gets and why (also for those that keep the shared model).
    target_forms: dict[str, TargetForm] = Field(default_factory=dict)
    forms_note: str = ""

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
            for k, v in a.extra_metrics.items():
                row[f"val {k}"] = round(v, 4)
            for lat in a.latency:
                row[f"{lat.target} int8 ms"] = None if lat.int8_ms is None else round(lat.int8_ms, 3)
                row[f"{lat.target} speedup"] = None if lat.speedup is None else round(lat.speedup, 2)
            rows.append(row)
        return rows


def batch1_feeds(sample: Mapping[str, np.ndarray] | np.ndarray, input_name: str | None = None) -> dict[str, np.ndarray]:
    """Batch-1 feeds: the first sample of every input of a Batch, or one sample (no batch axis) of a one-input model
    as `input_name` (float32)."""
    if isinstance(sample, Mapping):
        return {k: np.ascontiguousarray(np.asarray(v)[:1]) for k, v in sample.items()}
    if input_name is None:
        raise TypeError("measure_latency: one sample array needs its input name")
    return {input_name: np.ascontiguousarray(sample[None].astype(np.float32))}


def _brief(exc: Exception, limit: int = 300) -> str:
    """An exception on one line, at most `limit` characters: its start and its end (where a runtime names the op it
    could not convert, after pages of its own source locations)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else f"{text[:limit // 3]} … {text[-(2 * limit // 3):]}"


def measure_latency(path: Path, targets: list[TargetSpec], sample: Mapping[str, np.ndarray] | np.ndarray,
                    input_name: str | None = None, iters: int = 100) -> list[Latency]:
    """Batch-1 latency of the model at `path` (in `int8_ms`) on every target whose runtime is here; a target
    that cannot run it says why. `sample`: a Batch whose first sample of every input is fed (real data), or one
    sample array of a one-input model named `input_name`."""
    feeds = batch1_feeds(sample, input_name)
    out = []
    for t in targets:
        backend = get_backend(t.backend)
        ok, why = backend.availability(t.device)
        if not ok or not backend.measures_latency:
            continue
        try:
            with backend.runner(path, t) as runner:
                rep = benchmark(runner, feeds, warmup=max(5, iters // 10), iters=iters)
            out.append(Latency(target=t.name, int8_ms=rep.median_ms, precision=rep.precision))
        except Exception as exc:  # noqa: BLE001 - a target that cannot run this model is a row, not a crash
            out.append(Latency(target=t.name, error=_brief(exc)))
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
    calib: CalibrationReader  # the approved calibration version, every input
    val: dict[str, np.ndarray]  # validation data, every input (a Batch): chooses among attempts
    val_y: np.ndarray | None
    train: tuple[dict[str, np.ndarray], np.ndarray | None] | None  # QAT's training split (labels may be None)
    opset: int
    deploy: TargetSpec  # the target whose latency decides between equally accurate attempts
    base: PTQSettings  # the first PTQ attempt: the config's settings, INT8 types/reduce-range for `deploy`
    fp32_metric: float
    reference: np.ndarray | None  # FP32 outputs (the metric's output), where the metric scores against them
    fp32_latency: dict[str, Latency]  # per target name
    work: Path  # every attempt's model is written here
    log: Callable[[str], None] = print
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: list[SensitivityRow] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # attention nodes of the FP32 graph

    @property
    def q(self) -> QuantizationSpec:
        return self.cfg.quantization

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.cfg.model.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.cfg.model.outputs)

    @property
    def metric_output(self) -> str:
        """The output the metric scores: the model's first."""
        return self.cfg.model.outputs[0]

    @property
    def met_sla(self) -> bool:
        """An attempt can ship: it meets the SLA and every required target takes it."""
        return any(a.eligible for a in self.attempts)


def evaluate(ctx: Escalation, kind: str, label: str, settings: dict[str, Any],
             build: Callable[[Path], dict[str, Any] | None], notes: list[str] | None = None) -> Attempt:
    """Build one attempt, score it on the validation data, time it on every target, check it on every required
    target, and record it.

    `build(path)` writes the INT8 model to `path` and may return settings learned while building. A failure is the
    attempt's error, not the run's (a required target that cannot compile or run the model included: the attempt
    is then not eligible); a `SpecError` (the config itself is wrong) stops the run.
    """
    a = Attempt(index=len(ctx.attempts), kind=kind, label=label, settings=settings)
    if notes is not None:
        a.notes = notes  # the builder appends to it
    path = ctx.work / f"attempt{a.index}.onnx"
    metric = ctx.cfg.model.metric
    t0 = time.perf_counter()
    try:
        a.settings.update(build(path) or {})
        outs = run_onnx(path, ctx.val, outputs=ctx.output_names)  # every input fed, every output run
        out = outs[ctx.metric_output]
        a.metric, a.ci95 = score(metric, out, ctx.val_y, ctx.reference)
        a.extra_metrics = extra_metrics(metric, out, ctx.reference)
        a.drop = ctx.fp32_metric - a.metric
        a.meets_sla = a.drop <= ctx.cfg.thresholds.int8_max_drop
        a.onnx_path = str(path)
        a.latency = measure_latency(path, ctx.cfg.targets, ctx.val, iters=ctx.q.latency_iters)
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
        a.error = _brief(exc, 400)
    a.seconds = time.perf_counter() - t0
    ctx.attempts.append(a)
    ctx.log(f"attempt {a.index} {label}: {metric}={a.metric if a.metric is None else round(a.metric, 4)} "
            f"drop={a.drop if a.drop is None else round(a.drop, 4)} meets SLA={a.meets_sla} {a.error}")
    return a


def try_ptq(ctx: Escalation, settings: PTQSettings) -> Attempt:
    notes: list[str] = []

    def build(path: Path) -> None:
        quantize(ctx.fp32_onnx, path, ctx.calib, settings, notes)

    return evaluate(ctx, "ptq", settings.label(), settings.record(), build, notes)


# ---------------------------------------------------------------- the rungs
def ptq_base(ctx: Escalation) -> list[Attempt]:
    """The config's PTQ settings, with the INT8 types and weight range chosen for the deployment target."""
    return [try_ptq(ctx, ctx.base)]


def ptq_transformer(ctx: Escalation) -> list[Attempt]:
    """Transformer-aware PTQ for an attention graph (seconds, where QAT takes hours on a CPU): ONNX Runtime static on
    MatMul/Gemm only, then NNCF with model_type TRANSFORMER (SmoothQuant); both keep LayerNormalization, Softmax,
    GELU/Erf and the embedding Gathers in FP32. Activations follow the deployment target's scheme (unsigned on x86
    CPUs)."""
    base = ctx.base.model_copy(update={"profile": "transformer"})
    return [try_ptq(ctx, base.model_copy(update={"engine": "onnxruntime"})),
            try_ptq(ctx, base.model_copy(update={"engine": "nncf"}))]


# Tried in this order when the transformer rung misses the SLA. NNCF's default (0.95) moves nearly all of an
# activation's outlier range into the weights; the SmoothQuant paper's models were best between 0.5 and 0.85.
SMOOTH_QUANT_ALPHAS = (0.75, 0.5, 0.25)


def smooth_quant_sweep(ctx: Escalation) -> list[Attempt]:
    """NNCF's transformer PTQ again with SmoothQuant's alpha at each of SMOOTH_QUANT_ALPHAS, until one meets the SLA
    (an attention graph only; seconds each, before the hours QAT takes on a CPU)."""
    base = ctx.base.model_copy(update={"profile": "transformer", "engine": "nncf"})
    out = []
    for alpha in SMOOTH_QUANT_ALPHAS:
        out.append(try_ptq(ctx, base.model_copy(update={"smooth_quant_alpha": alpha})))
        if out[-1].meets_sla:
            break
    return out


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
            and a.settings.get("engine") == "onnxruntime" and a.metric is not None]
    if not done or ctx.q.max_sensitive_fp32 == 0:
        return []
    best = max(done, key=lambda a: a.metric)
    pre = preprocess_model(ctx.fp32_onnx, ctx.work / "fp32-pre.onnx")
    ctx.sensitivity = sensitivity_table(pre, Path(best.onnx_path), ctx.calib, ctx.q.op_types)
    out = []
    for k in range(1, min(ctx.q.max_sensitive_fp32, len(ctx.sensitivity)) + 1):
        keep = list(dict.fromkeys(ctx.base.keep_fp32_nodes + [r.node for r in ctx.sensitivity[:k]]))
        out.append(try_ptq(ctx, ctx.base.model_copy(update={
            "engine": "onnxruntime", "keep_fp32_nodes": keep, "method": best.settings.get("method", ctx.base.method),
            "profile": best.settings.get("profile", "default")})))
        if out[-1].meets_sla:
            break
    return out


def qat_loss_for(metric: str, has_labels: bool, custom: str | None) -> tuple[str | None, str]:
    """(distillation kind or None, the loss as the record names it): the config's loss; else distillation to the
    FP32 model's outputs for an embedder (1 - cosine) or a model without labels (MSE); else cross-entropy."""
    if custom:
        return None, custom
    if metric == "cosine":
        return "cosine", "distillation: 1 - cosine to the FP32 model's outputs"
    if not has_labels:
        return "mse", "distillation: MSE to the FP32 model's outputs"
    return None, "cross-entropy"


def qat(ctx: Escalation) -> list[Attempt]:
    """Fake-quant fine-tuning on the training split (NNCF), quantizer ranges initialised from the calibration set,
    every input fed. Without class labels (or for an embedder) the loss is distillation to the FP32 model."""
    q = ctx.q
    loss = load_object(q.qat_loss) if q.qat_loss else None
    train_x, train_y = ctx.train
    distill, loss_name = qat_loss_for(ctx.cfg.model.metric, train_y is not None, q.qat_loss)
    spec = ctx.cfg.model
    notes: list[str] = []

    def build(path: Path) -> dict[str, Any]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # measured: NNCF's range init ran 10x slower with 2 threads on a busy 2-core CPU
        try:
            res = qat_finetune(ctx.model, list(ctx.calib), train_x, None if distill else train_y,
                               ctx.input_names, ctx.output_names, ctx.opset, path, epochs=q.qat_epochs, lr=q.qat_lr,
                               loss_fn=loss, on_epoch=lambda e: ctx.log(f"QAT epoch {e}"),
                               reduce_range=ctx.base.reduce_range, thresholds=ctx.cfg.thresholds, distill=distill,
                               dynamic_axes={i.name: i.dynamic_axes for i in spec.inputs if i.dynamic_axes},
                               classifier=spec.metric == "top1")
        finally:
            torch.set_num_threads(threads)
        notes.extend(res.notes)  # folding, fake-quant kernels, range init, fine-tuning, the export parity check
        return {"engine": res.engine, "export_parity_max_abs": res.parity_max_abs,
                "export_top1_agreement": res.parity_top1_agreement, "epochs_log": res.epochs}

    settings = {"epochs": q.qat_epochs, "lr": q.qat_lr, "loss": loss_name}
    return [evaluate(ctx, "qat", f"QAT {q.qat_epochs} epochs lr {q.qat_lr}", settings, build, notes)]


# A new rung is a function above plus its entry here.
PTQ_RUNGS: tuple[Rung, ...] = (ptq_base, ptq_variants, keep_sensitive_fp32)
QAT_RUNGS: tuple[Rung, ...] = (qat,)
# An attention graph's rungs, ahead of PTQ_RUNGS (and of QAT where the policy starts with QAT).
TRANSFORMER_RUNGS: tuple[Rung, ...] = (ptq_transformer, smooth_quant_sweep)
FIRST_RUNGS: dict[str, tuple[Rung, ...]] = {"transformer": TRANSFORMER_RUNGS, "base": (ptq_base,)}


def build_ladder(policy: PolicyDecision, can_train: bool) -> list[Rung]:
    """The rungs the policy allows, in its order: PTQ then QAT, or QAT first where the policy starts with it.

    An attention graph puts the transformer PTQ rungs (TRANSFORMER_RUNGS: transformer-aware PTQ, then NNCF's
    SmoothQuant alphas) ahead of the other PTQ rungs; where the policy recommends QAT but allows PTQ (`auto`, a
    flexible SLA), its fast PTQ rungs (`ptq_first`) go before QAT, which then runs only when they miss the SLA.
    """
    ptq = list(PTQ_RUNGS) if policy.allow_ptq else []
    if ptq and policy.attention_graph:
        ptq[:0] = TRANSFORMER_RUNGS
    qat_ = list(QAT_RUNGS) if policy.allow_qat and can_train else []
    if policy.start != "qat":
        return ptq + qat_
    first = list(FIRST_RUNGS.get(policy.ptq_first, ())) if ptq else []
    if not first:
        return qat_ + ptq
    return first + qat_ + [r for r in ptq if r not in first]


def climb(ctx: Escalation, ladder: list[Rung]) -> None:
    """Run the rungs in order, stopping after the first rung that produced an attempt meeting the SLA."""
    for rung in ladder:
        rung(ctx)
        if ctx.met_sla:
            return


# ---------------------------------------------------------------- the choice
# Metric differences under this share of `thresholds.int8_max_drop` are ties (noise next to what the SLA allows);
# the faster attempt on the deployment target wins a tie.
TIE_SHARE_OF_SLA = 0.1


def tied_attempts(attempts: list[Attempt], max_drop: float = 0.0) -> list[Attempt]:
    """The eligible attempts within `TIE_SHARE_OF_SLA` x `max_drop` of the most accurate eligible one."""
    passing = [a for a in attempts if a.eligible]
    if not passing:
        return []
    best = max(round(a.metric, 6) for a in passing)
    return [a for a in passing if round(a.metric, 6) >= best - TIE_SHARE_OF_SLA * max_drop - 1e-12]


def time_on(attempts: list[Attempt], target: TargetSpec, feeds: dict[str, np.ndarray], rounds: int,
            iters: int, fp32_onnx: Path | None = None) -> tuple[dict[int, float], dict[int, str], float | None]:
    """Side-by-side medians of `attempts` on `target` (every one loaded, rounds in rotating order), why each one the
    runtime could not load or run failed there (such an attempt is out for that target, the others go on), and the
    FP32 model's median in the same rounds when `fp32_onnx` is given (None when it could not run). Records nothing:
    the caller decides which rows these timings replace."""
    backend = get_backend(target.backend)
    failed: dict[int, str] = {}
    fp32_ms = None
    with ExitStack() as stack:
        runners, loaded = [], []
        if fp32_onnx is not None:
            try:
                runners.append(stack.enter_context(backend.runner(fp32_onnx, target)))
            except Exception:  # noqa: BLE001 - then the note gives no FP32 comparison
                fp32_onnx = None
        for a in attempts:
            try:
                runner = stack.enter_context(backend.runner(Path(a.onnx_path), target))
                runner.infer(feeds)
            except Exception as exc:  # noqa: BLE001 - a runtime that refuses one attempt is that attempt's row
                failed[a.index] = _brief(exc)
                continue
            runners.append(runner)
            loaded.append(a)
        times = interleaved_benchmark(runners, feeds, rounds, iters) if loaded else []
    if fp32_onnx is not None and times:
        fp32_ms, times = float(np.median(times[0])), times[1:]
    return {a.index: float(np.median(t)) for a, t in zip(loaded, times)}, failed, fp32_ms


def retime_ties(attempts: list[Attempt], target: TargetSpec, feeds: dict[str, np.ndarray], rounds: int,
                iters: int) -> None:
    """Time the tied attempts against each other on `target`, side by side (`time_on`: every one loaded, `rounds`
    rounds in rotating order, median of round medians), and put those timings in their latency rows: the ladder timed
    each attempt minutes after the one before, and on a busy machine that ordering is noise (measured: a model 1.8x
    slower on ONNX Runtime was ranked first and shipped). When one cannot run there, every attempt keeps the ladder's
    row (side-by-side and ladder timings are not compared with each other)."""
    backend = get_backend(target.backend)
    if len(attempts) < 2 or not backend.availability(target.device)[0] or not backend.measures_latency:
        return
    ms, failed, _ = time_on(attempts, target, feeds, rounds, iters)
    if failed:
        return
    for a in attempts:
        lat = a.latency_on(target.name)
        if lat and lat.int8_ms:
            lat.int8_ms = ms[a.index]


def choose_attempt(attempts: list[Attempt], deploy_target: str, max_drop: float = 0.0) -> Attempt | None:
    """The eligible attempt (meets the SLA, every required target takes it) fastest on `deploy_target` among those
    within `TIE_SHARE_OF_SLA` x `max_drop` of the most accurate one (the most accurate when only one is); None when
    no attempt is eligible. Metrics are compared to 6 places, so equal metrics tie even with `max_drop` 0."""
    near = tied_attempts(attempts, max_drop)
    if not near:
        return None

    def deploy_ms(a: Attempt) -> float:
        lat = a.latency_on(deploy_target)
        return lat.int8_ms if lat and lat.int8_ms else float("inf")

    return min(near, key=lambda a: (deploy_ms(a), -round(a.metric, 6), a.index))


def speed_verdict(chosen: Attempt, deploy_target: str) -> tuple[bool | None, str]:
    """Whether the chosen attempt is faster than FP32 on the deployment target, and the sentence that says so."""
    lat = chosen.latency_on(deploy_target)
    if lat is None or lat.speedup is None:
        return None, f"latency on deployment target {deploy_target} could not be measured here"
    ratio, word = (lat.speedup, "faster") if lat.speedup > 1 else (1 / lat.speedup, "SLOWER")
    note = (f"INT8 is {ratio:.2f}x {word} than FP32 on {deploy_target} "
            f"({lat.int8_ms:.3f} ms vs {lat.fp32_ms:.3f} ms at batch 1")
    if lat.round_ratios:
        lo, hi = min(lat.round_ratios), max(lat.round_ratios)
        note += (f"; side by side, median of {len(lat.round_ratios)} alternating rounds, FP32/INT8 "
                 f"{lo:.2f}-{hi:.2f}x")
    note += ")"
    if lat.speedup <= 1.0:
        note += ": the INT8 model is NOT faster than FP32 on the deployment target"
    return lat.speedup > 1.0, note


SPEED_GATE_ADVICE = (
    "What to do: quantize for the runtime where INT8 pays (a target with integer kernels: VNNI or AMX on x86, a "
    "CPU/NPU with INT8 dot products), keep the layers named above in FP32, or ship FP32; "
    "`thresholds.int8_min_speedup: 0` turns this gate off.")


def speed_gate(chosen: Attempt, deploy_target: str, minimum: float) -> str | None:
    """Why the chosen INT8 model may not ship for speed: its side-by-side speed-up over FP32 on the deployment
    target is below `minimum` (`thresholds.int8_min_speedup`). None when it passes, when the gate is off (0) and
    when the deployment target could not be timed here (the verdict says so)."""
    lat = chosen.latency_on(deploy_target)
    if minimum <= 0 or lat is None or lat.speedup is None or lat.speedup >= minimum:
        return None
    spread = (f"; FP32/INT8 {min(lat.round_ratios):.2f}-{max(lat.round_ratios):.2f}x over "
              f"{len(lat.round_ratios)} alternating rounds" if lat.round_ratios else "")
    return (f"speed gate: the INT8 model runs at {lat.speedup:.2f}x FP32's speed on the deployment target "
            f"{deploy_target} ({lat.int8_ms:.3f} ms vs {lat.fp32_ms:.3f} ms at batch 1{spread}), below "
            f"thresholds.int8_min_speedup {minimum:g}: an INT8 model that does not pay on its target does not ship")


def side_by_side(fp32_onnx: Path, int8_onnx: Path, target: TargetSpec, feeds: dict[str, np.ndarray], rounds: int,
                 iters: int) -> Latency:
    """The chosen model's latency for the speed verdict: FP32 and INT8 on `target`, both loaded, timed in
    `rounds` alternating rounds (nothing else of this run executes meanwhile), medians and per-round ratios. The
    ladder's per-attempt timings are taken minutes apart and only rank attempts; this is the number that is
    reported. A target that cannot run both is a Latency with `error`."""
    backend = get_backend(target.backend)
    try:
        with backend.runner(fp32_onnx, target) as rf, backend.runner(int8_onnx, target) as ri:
            paired = paired_benchmark(rf, ri, feeds, rounds=rounds, iters=iters)
            precision = ri.precision
    except Exception as exc:  # noqa: BLE001 - the verdict then says it could not measure
        return Latency(target=target.name, error=_brief(exc))
    return Latency(target=target.name, fp32_ms=paired.a_median, int8_ms=paired.b_median, precision=precision,
                   round_ratios=[round(r, 4) for r in paired.ratios])


def ptq_settings_of(ctx: Escalation, a: Attempt) -> PTQSettings | None:
    """The settings a PTQ attempt ran with, from its record (None: not a PTQ attempt)."""
    if a.kind != "ptq":
        return None
    rec = a.settings
    return ctx.base.model_copy(update={
        "engine": rec["engine"], "method": rec["method"], "types": rec["types"], "reduce_range": rec["reduce_range"],
        "keep_fp32_nodes": list(rec.get("keep_fp32_nodes", [])), "profile": rec.get("profile", "default"),
        "smooth_quant_alpha": rec.get("smooth_quant_alpha")})


# A remedy ships only when it is this much faster than the attempt it remedies (side-by-side ratios move by a few
# per cent from run to run: measured 0.62x against 0.625x on MobileNetV2, the remedy "winning" on noise).
REMEDY_MIN_GAIN = 1.05


def try_speed_remedy(ctx: Escalation, report: QuantizationReport, chosen: Attempt,
                     feeds: dict[str, np.ndarray]) -> Attempt:
    """The chosen INT8 model is not faster than FP32 on the deployment target (or slower than the speed gate asks):
    try the remedy its graph allows and ship it when it is faster there (by `REMEDY_MIN_GAIN`), timed side by side
    against FP32 as the verdict is.

    The remedy: the chosen PTQ settings with every depthwise convolution in FP32 (`fp32-depthwise`). A mobile net's
    depthwise layers do little arithmetic per weight, and ONNX Runtime's x86 INT8 depthwise kernels can cost more
    than its float ones. Tried only for a PTQ attempt of the default profile on a graph with depthwise convolutions;
    the remedy must itself meet the SLA on every required target. The report keeps both rows and says which shipped.
    """
    settings = ptq_settings_of(ctx, chosen)
    if settings is None or settings.profile != "default" or not depthwise_convs(load_onnx(ctx.fp32_onnx)):
        return chosen
    ctx.log(f"attempt {chosen.index} does not pay on {ctx.deploy.name}: trying it with its depthwise convolutions "
            "in FP32")
    remedy = try_ptq(ctx, settings.model_copy(update={"profile": "fp32-depthwise"}))
    remedy.notes.append(f"speed remedy for attempt {chosen.index}, which did not pay on {ctx.deploy.name}")
    report.attempts = list(ctx.attempts)
    if not remedy.eligible:
        report.speed_note += f"\nspeed remedy tried: attempt {remedy.index} ({remedy.label}) cannot ship: " + (
            remedy.error or f"drop {remedy.drop:+.4f} misses the SLA")
        return chosen
    q = ctx.q
    verdict = side_by_side(ctx.fp32_onnx, Path(remedy.onnx_path), ctx.deploy, feeds, q.speed_rounds, q.latency_iters)
    remedy.set_latency(verdict)
    before = chosen.latency_on(ctx.deploy.name).speedup  # measured: the verdict found that INT8 does not pay
    after = verdict.speedup
    if after is None or after <= before * REMEDY_MIN_GAIN:
        ran = f"{after:.2f}x FP32's speed" if after else "an unmeasured speed"
        report.speed_note += (f"\nspeed remedy tried: attempt {remedy.index} ({remedy.label}) ran at {ran}, not "
                              f"{REMEDY_MIN_GAIN - 1:.0%} faster than attempt {chosen.index} ({before:.2f}x): "
                              f"attempt {chosen.index} stays")
        return chosen
    report.chosen = remedy.index
    report.faster_than_fp32, report.speed_note = speed_verdict(remedy, ctx.deploy.name)
    report.speed_note += (f"\nspeed remedy: attempt {remedy.index} ({remedy.label}) ships instead of attempt "
                          f"{chosen.index}, which ran at {before:.2f}x FP32's speed")
    return remedy


# ---------------------------------------------------------------- an INT8 form per target
def same_settings_by(ctx: Escalation, report: QuantizationReport, chosen: Attempt, engine: str,
                     why: str) -> Attempt | None:
    """The attempt with the chosen PTQ attempt's settings made by `engine`: the chosen one itself, one the ladder
    already made, or a new one made now (noted with `why`). None when the chosen attempt is not PTQ (a QAT model has
    no settings another engine could redo)."""
    settings = ptq_settings_of(ctx, chosen)
    if settings is None:
        return None
    want = settings.model_copy(update={"engine": engine, **({} if engine == "nncf" else {"smooth_quant_alpha": None})})
    if want == settings:
        return chosen
    for a in ctx.attempts:
        if ptq_settings_of(ctx, a) == want:
            return a
    ctx.log(f"trying attempt {chosen.index}'s settings with {engine} {why}")
    made = try_ptq(ctx, want)
    made.notes.append(f"made {why}")
    report.attempts = list(ctx.attempts)
    return made


def fastest_form(candidates: list[Attempt], ms: dict[int, float], shared: Attempt,
                 min_gain: float = REMEDY_MIN_GAIN) -> Attempt:
    """The attempt a target gets, from side-by-side medians `ms` (attempt index -> ms on that target): the fastest,
    where attempts within `min_gain` of it are ties (run-to-run noise on a shared machine). A tie keeps the `shared`
    model when it is one of them (one model fewer to ship and validate), else goes to the most accurate."""
    timed = [a for a in candidates if a.index in ms]
    if not timed:
        return shared
    best = min(ms[a.index] for a in timed)
    near = [a for a in timed if ms[a.index] <= best * min_gain]
    if shared in near:
        return shared
    return max(near, key=lambda a: (round(a.metric or 0.0, 6), -ms[a.index]))


def choose_target_forms(ctx: Escalation, report: QuantizationReport, chosen: Attempt,
                        feeds: dict[str, np.ndarray]) -> None:
    """Per target other than the deployment target, which INT8 model it gets (`quantization.target_forms`,
    `quantization.target_engines`), into `report.target_forms` (only targets that get another model than `chosen`)
    and one line each in `report.forms_note`.

    A target pinned to an engine gets the chosen attempt's settings made by that engine; that attempt must meet the
    SLA on every required target, or the run stops (GateError): the config asked for it. With `fastest`, a target
    timed here gets the fastest eligible attempt there, side by side (`time_on`, `fastest_form`); its runtime's own
    engine (`native_ptq_engine`) is tried first when the ladder did not make that attempt. A runtime that cannot run
    an attempt leaves it out for that target, with the error in the note.
    """
    q = ctx.q
    if q.target_forms == "shared" and not q.target_engines:
        return
    lines = []
    for t in ctx.cfg.targets:
        if t.name == ctx.deploy.name:
            continue
        backend = get_backend(t.backend) if t.backend in known_backends() else None
        pinned = q.target_engines.get(t.name)
        if pinned:
            a = same_settings_by(ctx, report, chosen, pinned, f"for {t.name} (quantization.target_engines)")
            if a is None:
                raise GateError(f"quantization.target_engines pins {t.name!r} to {pinned}'s PTQ, but the chosen "
                                f"attempt {chosen.index} ({chosen.label}) is not PTQ: no settings to make it with. "
                                "Remove the pin or set quantization.mode: ptq", report=report)
            if not a.eligible:
                raise GateError(f"quantization.target_engines pins {t.name!r} to {pinned}'s PTQ, and that attempt "
                                f"({a.index}, {a.label}) cannot ship: "
                                + (a.error or f"drop {a.drop:+.4f} misses the SLA {ctx.cfg.thresholds.int8_max_drop:g}")
                                + ":\n" + format_attempts(report), report=report)
            if a is not chosen:
                report.target_forms[t.name] = TargetForm(target=t.name, attempt=a.index,
                                                         reason=f"pinned to {pinned} (quantization.target_engines)")
            lines.append(f"{t.name}: attempt {a.index} ({a.label}), pinned to {pinned}")
            continue
        if q.target_forms != "fastest" or backend is None:
            continue
        if not backend.measures_latency or not backend.availability(t.device)[0]:
            lines.append(f"{t.name}: the shared model (attempt {chosen.index}): not timed here")
            continue
        candidates = [a for a in ctx.attempts if a.eligible]
        if backend.native_ptq_engine:
            native = same_settings_by(ctx, report, chosen, backend.native_ptq_engine,
                                      f"for {t.name} ({t.backend}'s own quantizer)")
            if native is not None and native.eligible and native not in candidates:
                candidates.append(native)
            elif native is not None and not native.eligible:
                lines.append(f"{t.name}: {backend.native_ptq_engine}'s attempt {native.index} cannot ship: "
                             + (native.error or f"drop {native.drop:+.4f} misses the SLA"))
        if len(candidates) < 2:
            lines.append(f"{t.name}: the shared model (attempt {chosen.index}): no other attempt meets the SLA")
            continue
        ms, failed, fp32_ms = time_on(candidates, t, feeds, q.speed_rounds, q.latency_iters, ctx.fp32_onnx)
        for a in candidates:  # the side-by-side timings replace the ladder's in the attempts table
            if a.index in ms and (old := a.latency_on(t.name)) is not None:
                a.set_latency(old.model_copy(update={"int8_ms": ms[a.index], "round_ratios": [],
                                                     "fp32_ms": old.fp32_ms if fp32_ms is None else fp32_ms}))
        for i, why in failed.items():
            lines.append(f"{t.name}: attempt {i} could not run there: {why}")
        pick = fastest_form(candidates, ms, chosen)
        timing = ", ".join([f"FP32 {fp32_ms:.3f} ms"] * (fp32_ms is not None)
                           + [f"attempt {i} {v:.3f} ms" for i, v in sorted(ms.items())])
        timing += f"; side by side, {q.speed_rounds} rounds"
        if pick.index in ms and fp32_ms is not None:  # INT8 exists to be faster: say so where it is not
            ratio = fp32_ms / ms[pick.index]
            timing += (f"; {ratio:.2f}x FP32's speed there" + ("" if ratio > 1 else ": NOT faster than FP32"))
        if pick is chosen:
            lines.append(f"{t.name}: the shared model (attempt {chosen.index}): no attempt is "
                         f"{REMEDY_MIN_GAIN - 1:.0%} faster there ({timing})")
            continue
        gain = ms[chosen.index] / ms[pick.index] if chosen.index in ms else None
        why = (f"{gain:.2f}x faster than the shared model there" if gain else "the shared model cannot run there")
        report.target_forms[t.name] = TargetForm(target=t.name, attempt=pick.index, reason=f"fastest: {why}")
        lines.append(f"{t.name}: attempt {pick.index} ({pick.label}), {why} ({timing})")
    report.forms_note = "\n".join(lines)


def explain_int8_speed(report: QuantizationReport, int8_onnx: Path, deploy: TargetSpec, fp32_onnx: Path | None = None,
                       feeds: dict[str, np.ndarray] | None = None) -> None:
    """INT8 is not faster on `deploy`: ask its runtime why (per op type: integer kernels against quantized ops left
    in float, named) and put the rows and the two summary lines under the verdict in the report."""
    report.int8_kernels = explain_speed(int8_onnx, deploy, fp32_onnx, feeds)
    report.speed_explanation = explanation_lines(report.int8_kernels)
    if report.speed_explanation:
        report.speed_note = f"{report.speed_note}\n{report.speed_explanation}"


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
    val: tuple[Mapping[str, np.ndarray] | np.ndarray, np.ndarray | None],
    train: tuple[Mapping[str, np.ndarray] | np.ndarray, np.ndarray | None] | None,
    out_dir: Path,
    opset: int,
    log: Callable[[str], None] = print,
) -> QuantizationReport:
    """Run the policy and climb the ladder; the chosen model is copied to `out_dir/<model>-int8.onnx`.

    `val` and `train` are (Batch of every model input, labels or None); one array stands for the only input of a
    one-input model. `calib` must feed every model input.
    """
    q, spec = cfg.quantization, cfg.model
    deploy = deploy_target(cfg)
    base, types_reason = first_ptq_settings(q, deploy)
    missing = [i.name for i in spec.inputs if i.name not in calib.inputs]
    if missing:
        raise SpecError(f"the calibration version feeds {calib.names} but the model also takes {missing}: build the "
                        "calibration version from captures that hold every model input")
    attention = attention_nodes(fp32_onnx)
    policy = decide(model, spec.metric, q.mode, q.sla, attention)
    if train is not None:
        train = (as_batch(train[0], spec.inputs), train[1])
    can_train = train is not None and batch_size(train[0]) > 0
    if policy.allow_qat and not policy.allow_ptq and not can_train:
        raise SpecError("QAT was requested but the config has no training data: set data.train")

    val_x, val_y = as_batch(val[0], spec.inputs), val[1]
    fp32_out = run_onnx(fp32_onnx, val_x, outputs=list(spec.outputs))[spec.outputs[0]]
    reference = fp32_out if spec.metric in ("cosine", "retrieval") else None
    fp32_metric, fp32_ci = score(spec.metric, fp32_out, val_y, reference)
    fp32_latency = {lat.target: lat
                    for lat in measure_latency(fp32_onnx, cfg.targets, val_x, iters=q.latency_iters)}
    ctx = Escalation(cfg=cfg, fp32_onnx=fp32_onnx, model=model, calib=calib, val=val_x, val_y=val_y, train=train,
                     opset=opset, deploy=deploy, base=base, fp32_metric=fp32_metric, reference=reference,
                     fp32_latency=fp32_latency, work=Path(tempfile.mkdtemp(prefix="edgeq-quant-")), log=log,
                     attention=attention)
    try:
        climb(ctx, build_ladder(policy, can_train))
        report = QuantizationReport(
            model=spec.name, metric_name=spec.metric, fp32_metric=fp32_metric, fp32_ci95=fp32_ci,
            metric_output=spec.outputs[0], fp32_extra_metrics=extra_metrics(spec.metric, fp32_out, reference),
            attention=attention, max_drop=cfg.thresholds.int8_max_drop, calibration_version=calibration_version,
            calibration_samples=len(calib), policy=policy, types=base.types, types_reason=types_reason,
            deploy_target=deploy.name, attempts=ctx.attempts, sensitivity=ctx.sensitivity)
        retime_ties(tied_attempts(ctx.attempts, ctx.cfg.thresholds.int8_max_drop), deploy, batch1_feeds(val_x),
                    q.speed_rounds, q.latency_iters)
        chosen = choose_attempt(ctx.attempts, deploy.name, ctx.cfg.thresholds.int8_max_drop)
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
        measured = get_backend(deploy.backend)
        if measured.availability(deploy.device)[0] and measured.measures_latency:
            verdict = side_by_side(fp32_onnx, Path(chosen.onnx_path), deploy, batch1_feeds(val_x), q.speed_rounds,
                                   q.latency_iters)
            chosen.set_latency(verdict)
        report.faster_than_fp32, report.speed_note = speed_verdict(chosen, deploy.name)
        if report.faster_than_fp32 is False or speed_gate(chosen, deploy.name, cfg.thresholds.int8_min_speedup):
            chosen = try_speed_remedy(ctx, report, chosen, batch1_feeds(val_x))
        refusal = speed_gate(chosen, deploy.name, cfg.thresholds.int8_min_speedup)
        if report.faster_than_fp32 is False or refusal:
            explain_int8_speed(report, Path(chosen.onnx_path), deploy, fp32_onnx, batch1_feeds(val_x))
        if report.faster_than_fp32 is None and cfg.thresholds.int8_min_speedup > 0:
            report.speed_note += "; the speed gate (thresholds.int8_min_speedup) was not checked"
        if refusal:
            raise GateError(refusal + (f"\n{report.speed_explanation}" if report.speed_explanation else "")
                            + "\n" + SPEED_GATE_ADVICE, report=report)
        choose_target_forms(ctx, report, chosen, batch1_feeds(val_x))
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(chosen.onnx_path, out_dir / f"{spec.name}-int8.onnx")
        for name, form in report.target_forms.items():
            form.file = f"{spec.name}-int8.{name}.onnx"
            shutil.copy(report.attempts[form.attempt].onnx_path, out_dir / form.file)
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
        extra = "".join(f"  ({k} {v:.4f})" for k, v in a.extra_metrics.items())
        lines.append(f"{a.index:>2} {a.kind:4} {m:>10} {d:>8} {'yes' if a.meets_sla else 'no':>4}  {a.label}{extra}"
                     + (f"  [{a.error}]" if a.error else ""))
    return "\n".join(lines)


