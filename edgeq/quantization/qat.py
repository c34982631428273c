"""Quantization-aware training (QAT) with NNCF's PyTorch backend, exported as a QDQ INT8 ONNX model.

The path, checked against the installed nncf 3.4 / torch 2.13:

0. Conv -> BatchNorm pairs are folded into the convs first (:func:`fold_batchnorm`). NNCF
   would otherwise fake-quantize the weights *before* the BatchNorm, and the exported
   ``DQ -> Conv -> BatchNormalization -> Q`` does not match ONNX Runtime's QDQ fusion, so
   every conv ran in float (measured: 0 of 5 QLinearConv on the demo; with folding and
   per-tensor activations 5 of 5). Fine-tuning with folded BN is the usual "frozen BN" QAT.
1. ``nncf.quantize(model, nncf.Dataset(calibration))`` inserts NNCF fake-quantizers
   (per-channel symmetric INT8 weights; per-tensor activations, uint8 after ReLU-like ops --
   NNCF's default would quantize depthwise-conv inputs per channel, which ONNX Runtime's
   QLinearConv cannot take) and initialises their ranges from the calibration samples --
   the *approved calibration version*, one sample per item, ``subset_size`` = all of them.
   The caller's model is not modified.
2. The returned model is an ordinary ``nn.Module`` whose quantizer scales are trainable
   parameters; it is fine-tuned with Adam for ``epochs`` on the training split
   (straight-through estimator inside NNCF's fake-quant op), deterministic with ``seed``
   (for a given torch thread count).
3. Export: every NNCF quantizer is switched to
   ``QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS`` and the model goes through
   the TorchScript ONNX exporter (``dynamo=False``), whose symbolic for NNCF's quantizer
   emits a ``QuantizeLinear -> DequantizeLinear`` pair (uint8 zero points for the
   activations, int8 per-axis for the weights). The torch.export-based exporter does
   not see NNCF's quantizers as Q/DQ, and ``nncf.strip(..., StripFormat.NATIVE)``
   needs ``torchao``, which is not installed. The TorchScript exporter emits opsets
   13..20; a higher requested opset is reached with ``onnx.version_converter``
   (checked: ORT and OpenVINO run the converted model up to opset 23). Opsets below 13
   are refused: per-channel Q/DQ needs opset 13.
4. Export parity (:func:`check_export_parity`): onnxruntime (CPU) vs the QAT model in
   PyTorch on the check samples; see its docstring for the tolerance (from ``Thresholds``).

The ONNX file is written to a temporary name next to ``out_path`` and renamed only once
the parity gate passed, so a failed run leaves no artifact at ``out_path``.

Named inputs and outputs: the training split, the calibration samples and the check samples are
Batches (``{input name: array}``; one array stands for a one-input model), every input is fed (in
``input_names`` order, positionally) and every output is exported and checked. Without class labels
(an embedder, a detector's regression head) the loss is distillation to the FP32 model's outputs on
the training inputs: ``1 - cosine`` (``distill="cosine"``) or MSE (``distill="mse"``), summed over
the outputs; the top-1 clause of the export check then does not apply (``classifier=False``).
"""

from __future__ import annotations

import copy
import functools
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from edgeq.core.compare import compare_output, step_tolerance, top1_text
from edgeq.core.errors import ExportError, GateError, SpecError
from edgeq.core.onnx_graph import load_onnx, output_step
from edgeq.core.ort import ort_session
from edgeq.core.platform import x86_without_vnni
from edgeq.core.quiet import import_nncf
from edgeq.core.specs import Thresholds
from edgeq.export import ONNX_EXPORT_LOCK

ENGINE = "nncf-torch-qat"
# Seconds NNCF may take to compile and load its CPU extension, unless NNCF_EXTENSION_LOAD_TIMEOUT is set.
NNCF_EXTENSION_TIMEOUT_S = 900
# Fewer training steps than this: NNCF's fake-quantize ops run eagerly in PyTorch rather than building its C++
# extension (see choose_fake_quantize_kernels).
COMPILED_KERNELS_MIN_STEPS = 1000
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13
MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


@functools.cache
def _eager_fake_quantize() -> SimpleNamespace:
    """NNCF's PyTorch reference fake-quantize functions, run eagerly (NNCF itself wraps them in torch.compile)."""
    from nncf.torch.quantization.reference import torch_executor

    return SimpleNamespace(Quantize_forward=torch_executor.forward, Quantize_backward=torch_executor.backward)


def choose_fake_quantize_kernels(steps: int) -> str:
    """Choose what runs NNCF's CPU fake-quantize ops for a QAT of `steps` optimizer steps; returns a note saying what.

    NNCF builds a C++ extension for them with the system compiler on first use in each Python environment (35 s
    on a 2-core AVX2 machine, 77 s in a fresh CI environment there; NNCF gives up after 60 s by default). The
    PyTorch reference functions it falls back on need no build: measured side by side (5 alternating rounds, batch
    16 at 32x32, 2 threads), a training step took 8-14 % longer with them (ResNet-18 1.14x, range 1.11-1.19;
    MobileNetV2 1.08x, 1.06-1.10), so the build paid for itself after about 550 (ResNet-18) to 1400 (MobileNetV2)
    steps: below a thousand, no build. NNCF's own
    fallback wraps them in torch.compile, whose compilations for a small QAT took longer than the extension's
    build here: they run eagerly. An extension already loaded in this process is used whatever the size. NNCF's
    loader is a private detail: if it has changed, NNCF's own choice stands.
    """
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU

    if not hasattr(QuantizedFunctionsCPU, "_loaded_namespace"):
        return "fake-quantize ops: NNCF's own choice (its extension loader has changed)"
    loaded = QuantizedFunctionsCPU._loaded_namespace
    if loaded is not None and loaded is not _eager_fake_quantize():
        return "fake-quantize ops: the functions NNCF already loaded in this process"
    if steps < COMPILED_KERNELS_MIN_STEPS:
        QuantizedFunctionsCPU._loaded_namespace = _eager_fake_quantize()
        return (f"fake-quantize ops: NNCF's PyTorch reference functions, eager ({steps} steps < "
                f"{COMPILED_KERNELS_MIN_STEPS}: building its C++ extension would cost more than it saves)")
    QuantizedFunctionsCPU._loaded_namespace = None  # NNCF builds (or loads its cached build of) the extension
    return (f"fake-quantize ops: NNCF's C++ extension ({steps} steps >= {COMPILED_KERNELS_MIN_STEPS}; built on "
            "first use in this environment)")


@dataclass
class QATResult:
    onnx_path: Path  # the QDQ INT8 ONNX model written
    epochs: list[dict]  # per epoch: {"epoch", "loss", "train_top1", "seconds"}
    parity_max_abs: float  # QAT ONNX (onnxruntime) vs QAT PyTorch model outputs on the check samples
    parity_top1_agreement: float | None  # None: not a classifier (no top-1 clause)
    engine: str  # e.g. "nncf-torch-qat"
    notes: list[str] = field(default_factory=list)


@dataclass
class ParityCheck:
    max_abs: float
    top1_agreement: float | None  # on every check sample; None: not a classifier
    tolerance: float  # Thresholds.qat_parity_steps x the output's quantization step, at least int8_atol_floor
    output_step: float | None  # read from the exported graph; None: the graph gives none (the floor applies)
    step_source: str  # what the step was read from
    confident_samples: int  # samples whose PyTorch top-1 margin exceeds the tolerance
    confident_top1_agreement: float | None  # the agreement clause, on those samples
    near_ties: int  # disagreements on the other samples: reported, not counted
    samples: int
    worst_sample: int
    output_spread: float = float("nan")  # max - min of the PyTorch outputs checked: what the tolerance is set against
    agreement_on_all: bool = False  # fewer than half the samples confident: the top-1 clause held every sample


# ---------------------------------------------------------------- inputs
Batch = dict[str, np.ndarray]


def _names(name: str | Sequence[str]) -> list[str]:
    return [name] if isinstance(name, str) else list(name)


def _as_batch(x, names: list[str]) -> Batch | None:
    """A Batch of every input; one array is the first input's (float32, as a one-input image model takes it)."""
    if x is None:
        return None
    if isinstance(x, Mapping):
        missing = [n for n in names if n not in x]
        if missing:
            raise SpecError(f"QAT data has no samples for model input(s) {missing} (it holds {sorted(x)})")
        return {n: np.ascontiguousarray(np.asarray(x[n])) for n in names}
    if len(names) != 1:
        raise SpecError(f"QAT got one array of samples, but the model has inputs {names}: give {{input name: array}}")
    return {names[0]: np.ascontiguousarray(np.asarray(x, dtype=np.float32))}


def _n(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _take(batch: Batch, idx) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


def _fits(shape: tuple[int, ...], want: tuple[int, ...], dynamic: set[int]) -> bool:
    """A sample's shape fits `want` on every axis that is not dynamic."""
    return len(shape) == len(want) and all(a in dynamic or g == w for a, (g, w) in enumerate(zip(shape, want)))


def _check_inputs(calibration: Iterable, train_x, train_y, opset: int, names: list[str] | None = None,
                  dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
                  needs_labels: bool = True) -> tuple[list[Batch], Batch, np.ndarray | None]:
    names = names or ["input"]
    train = _as_batch(train_x, names)
    if train is None or _n(train) == 0 or (needs_labels and train_y is None):
        raise SpecError("QAT needs training data: set data.train in the config (QAT fine-tunes on labelled samples, "
                        "or distils the FP32 model's outputs on the training inputs)")
    if needs_labels:
        train_y = np.asarray(train_y)
        if train_y.ndim != 1 or len(train_y) != _n(train):
            shape = train[names[0]].shape if len(names) == 1 else {k: v.shape for k, v in train.items()}
            raise SpecError(f"QAT training labels must be one int per sample: got x {shape}, y {train_y.shape}")
        if not np.issubdtype(train_y.dtype, np.integer):
            raise SpecError(f"QAT training labels must be integers (class ids), got dtype {train_y.dtype}")
    else:
        train_y = None
    calib = [_as_batch(c, names) for c in calibration]
    if not calib:
        raise SpecError("QAT needs calibration samples to initialise the quantizer ranges: the calibration version is empty")
    dyn = dynamic_axes or {}
    for name in names:
        want = (1, *train[name].shape[1:])
        axes = set(dyn.get(name, {})) - {0}

        bad = [i for i, c in enumerate(calib) if not _fits(c[name].shape, want, axes)]
        if bad:
            what = "" if len(names) == 1 else f" for input {name!r}"
            raise SpecError(
                f"calibration sample {bad[0]}{what} has shape {calib[bad[0]][name].shape}, but the model's training "
                f"inputs are {want} per sample ({len(bad)} of {len(calib)} samples differ): the calibration version "
                "does not match the model's inputs"
            )
    if len(names) == 1:  # the image form: float32, as the FP32 model takes it
        calib = [{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in c.items()} for c in calib]
    if opset < MIN_QDQ_OPSET:
        raise SpecError(
            f"QAT exports per-channel QuantizeLinear/DequantizeLinear, which needs ONNX opset >= {MIN_QDQ_OPSET}; "
            f"the targets allow at most opset {opset}"
        )
    return calib, train, train_y


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def distillation_loss(kind: str) -> Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]:
    """Loss between the student's outputs and the FP32 teacher's, summed over the outputs: ``1 - cosine`` per sample
    (mean) or MSE."""
    def loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for s_, t in zip(student, teacher):
            s2, t2 = s_.reshape(len(s_), -1), t.reshape(len(t), -1)
            if kind == "cosine":
                total = total + (1.0 - torch.nn.functional.cosine_similarity(s2, t2, dim=1)).mean()
            else:
                total = total + torch.nn.functional.mse_loss(s2, t2)
        return total
    return loss


# ---------------------------------------------------------------- BatchNorm folding
_CONV_BN = ((torch.nn.Conv1d, torch.nn.BatchNorm1d), (torch.nn.Conv2d, torch.nn.BatchNorm2d),
            (torch.nn.Conv3d, torch.nn.BatchNorm3d))


def fold_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, int, str | None]:
    """Fold every Conv -> BatchNorm pair into the conv (eval statistics); the BN becomes ``nn.Identity``.

    Works on a deep copy and keeps the model an ordinary ``nn.Module`` (NNCF treats an
    ``fx.GraphModule`` as its torch.fx backend, which needs torchao). torch.fx is used only to
    find the pairs: a conv whose only consumer is a BatchNorm, each module called once.
    Returns (model, pairs folded, reason nothing was folded or None).
    """
    model = copy.deepcopy(model).eval()
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - not traceable: QAT still works, BN stays
        return model, 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not hasattr(node.args[0], "op"):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        conv, bn = modules[src.target], modules[node.target]
        if any(type(conv) is c and type(bn) is b for c, b in _CONV_BN) and bn.track_running_stats:
            model.set_submodule(src.target, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
            model.set_submodule(node.target, torch.nn.Identity())
            folded += 1
    return model, folded, None


# ---------------------------------------------------------------- training
def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), console=console, disable=not console.is_terminal)


def _train(qmodel: torch.nn.Module, x: Batch | np.ndarray, y: np.ndarray | None, epochs: int, lr: float,
           batch_size: int, loss_fn: Callable, seed: int, on_epoch: Callable[[dict], None] | None,
           teacher: torch.nn.Module | None = None) -> list[dict]:
    """Fine-tune on `x` (every input, positionally): against labels `y` with `loss_fn(output, labels)`, or, with a
    `teacher`, `loss_fn(student outputs, teacher outputs)` (distillation; no labels)."""
    xs = [torch.from_numpy(a) for a in (x.values() if isinstance(x, Mapping) else [x])]
    yt = None if y is None else torch.from_numpy(np.asarray(y).astype(np.int64))
    n = len(xs[0])
    opt = torch.optim.Adam(qmodel.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    n_batches = (n + batch_size - 1) // batch_size
    with _progress() as progress:
        for ep in range(1, epochs + 1):
            task = progress.add_task(f"QAT epoch {ep}/{epochs}", total=n_batches, loss=float("nan"))
            qmodel.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                xb = [t[idx] for t in xs]
                opt.zero_grad()
                out = qmodel(*xb)
                if teacher is not None:
                    with torch.no_grad():
                        target = _outputs(teacher(*xb))
                    loss = loss_fn(_outputs(out), target)
                else:
                    yb = yt[idx]
                    loss = loss_fn(out, yb)
                if not torch.isfinite(loss):
                    raise GateError(f"QAT loss became {float(loss)} in epoch {ep}: lower qat lr (now {lr})")
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                if teacher is None:
                    correct += int((out.detach().argmax(1) == yb).sum())
                seen += len(idx)
                progress.update(task, advance=1, loss=loss_sum / seen)
            row = {"epoch": ep, "loss": loss_sum / seen, "seconds": time.perf_counter() - t0}
            if teacher is None:
                row["train_top1"] = correct / seen
            history.append(row)
            if on_epoch is not None:
                on_epoch(dict(row))
    qmodel.eval()
    return history


# ---------------------------------------------------------------- export
def _set_export_mode(qmodel: torch.nn.Module, qdq: bool) -> int:
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    mode = QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS if qdq else QuantizerExportMode.FAKE_QUANTIZE
    n = 0
    for module in qmodel.modules():
        if isinstance(module, BaseQuantizer):
            module.set_export_mode(mode)
            n += 1
    return n


def export_qdq(qmodel: torch.nn.Module, example: Batch | np.ndarray, input_name: str | Sequence[str],
               output_name: str | Sequence[str], opset: int, out: Path,
               dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> list[str]:
    """Write the NNCF QAT model as a QDQ ONNX model: every input (positionally, in `input_name` order) and output,
    a dynamic ``batch`` axis and the inputs' other dynamic axes (`dynamic_axes`, e.g. a sequence). Returns notes."""
    in_names, out_names = _names(input_name), _names(output_name)
    example_b = _as_batch(example, in_names)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", **dict((dynamic_axes or {}).get(n, {}))} for n in in_names}
    axes.update({n: {0: "batch"} for n in out_names})
    import onnx

    notes: list[str] = []
    export_opset = min(opset, TORCHSCRIPT_MAX_OPSET)
    qmodel.eval()
    n = _set_export_mode(qmodel, qdq=True)
    if n == 0:
        raise ExportError("the QAT model holds no NNCF quantizers: nothing to export as INT8")
    try:
        with ONNX_EXPORT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation, NNCF's .item() TracerWarnings
            torch.onnx.export(
                qmodel, tuple(torch.from_numpy(example_b[n]) for n in in_names), str(out), dynamo=False,
                opset_version=export_opset, input_names=in_names, output_names=out_names, do_constant_folding=True,
                dynamic_axes=axes,
            )
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"QAT model export to ONNX (opset {export_opset}) failed: {type(exc).__name__}: {exc}") from None
    finally:
        _set_export_mode(qmodel, qdq=False)
    proto = onnx.load(str(out))
    if export_opset != opset:
        from onnx import version_converter

        proto = version_converter.convert_version(proto, opset)
        onnx.save(proto, str(out))
        notes.append(f"exported at opset {export_opset} (TorchScript exporter maximum), converted to opset {opset} "
                     "with onnx.version_converter")
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in proto.graph.node]
    nq, ndq = ops.count("QuantizeLinear"), ops.count("DequantizeLinear")
    if nq == 0 or ndq == 0:
        raise ExportError(f"the exported QAT model has {nq} QuantizeLinear / {ndq} DequantizeLinear nodes: it is not INT8")
    notes.append(f"ONNX: {nq} QuantizeLinear + {ndq} DequantizeLinear pairs for {n} NNCF quantizers, opset {opset}")
    return notes


# ---------------------------------------------------------------- parity gate
def check_export_parity(onnx_path: Path, torch_model: torch.nn.Module | Callable, samples: Batch | np.ndarray,
                        input_name: str | Sequence[str], batch_size: int = 64, thresholds: Thresholds | None = None,
                        classifier: bool = True) -> ParityCheck:
    """Gate: the QDQ ONNX model (onnxruntime, CPU) must compute what the fake-quant model computes in PyTorch.

    The two cannot agree bit for bit: PyTorch fake-quantizes in float with NNCF's rounding,
    onnxruntime fuses Q/DQ into integer kernels (rounding half to even, int32 accumulation,
    requantization), so an activation may land one quantization step apart, and that step
    propagates to the outputs. The tolerance is therefore expressed in quantization steps of the
    output, read from the exported graph (``edgeq.core.onnx_graph.output_step``), never from the
    outputs it judges (one outlier would widen it for every sample):

        tolerance = max(qat_parity_steps (default 3) x output step, int8_atol_floor)

    A QAT export quantizes the head's inputs, not its output, so the step is the head's input
    scale x its largest sum of |INT8 weights| over one output: how far an output moves when every
    quantized input is one step off. On the demo: step 0.11, tolerance 0.34, measured difference
    0.03-0.05; a wrong export (a missing or misplaced quantizer, a wrong scale, a wrong layer) is
    off by many steps. A graph that gives no step falls back to the floor alone.

    Top-1 agreement on the confident samples (PyTorch top-1 margin above the tolerance) must be
    >= qat_min_agreement (0.99): a difference within the tolerance can still flip such a sample, and
    that is a real disagreement. Flips of the other samples are near ties an allowed rounding
    difference can cause; they are reported (``near_ties``), not counted. Where fewer than half the
    samples are confident (one output step that coarse), top-1 agreement is held on every sample
    instead (``agreement_on_all``): otherwise outputs anywhere within the range would pass.
    Raises ``GateError`` with the numbers otherwise. `thresholds` default: ``Thresholds()``.

    Every input is fed (`samples` a Batch; one array is `input_name`'s) and every output is checked, each with its
    own step; the returned check is the worst output's. `classifier=False` (an embedding, a regression head): the
    top-1 clause does not apply, the max-abs clause alone gates.
    """
    th = thresholds or Thresholds()
    names = _names(input_name)
    batch = _as_batch(samples, names)
    if _n(batch) == 0:
        raise SpecError("the QAT export parity check needs at least one check sample")
    session = ort_session(onnx_path)
    out_names = [o.name for o in session.get_outputs()]
    refs: list[list[np.ndarray]] = []
    gots: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, _n(batch), batch_size):
            part = _take(batch, slice(start, start + batch_size))
            refs.append([np.asarray(o.detach().float().numpy())
                         for o in _outputs(torch_model(*[torch.from_numpy(part[n]) for n in names]))])
            gots.append([np.asarray(o, dtype=np.float32) for o in session.run(out_names, part)])
    graph = load_onnx(onnx_path)
    worst = None
    for j, name in enumerate(out_names):
        ref, got = np.concatenate([r[j] for r in refs]), np.concatenate([g[j] for g in gots])
        step_j = output_step(graph, name)
        tol_j = step_tolerance(th.qat_parity_steps, step_j.step, th.int8_atol_floor,
                               min_top1=th.qat_min_agreement if classifier and j == 0 else None)
        rec_j = compare_output(name, ref, got, tol_j, labels=("PyTorch", "ONNX"),
                               top1=classifier and j == 0)
        if rec_j.max_abs_diff is None:  # shapes differ: no number to hold against the tolerance
            raise GateError(f"QAT export parity: {rec_j.error}")
        if worst is None or (worst[0].passed and not rec_j.passed):
            worst = (rec_j, step_j, float(ref.max() - ref.min()) if ref.size else float("nan"))
    rec, step, spread = worst
    check = ParityCheck(max_abs=rec.max_abs_diff, top1_agreement=rec.top1_agreement, tolerance=rec.tolerance,
                        output_step=step.step, step_source=step.source, confident_samples=rec.confident_samples or 0,
                        confident_top1_agreement=rec.confident_top1_agreement, near_ties=rec.near_ties,
                        samples=rec.samples, worst_sample=rec.worst_sample, output_spread=spread,
                        agreement_on_all=rec.agreement_on_all)
    if not rec.passed:
        of = (f"{th.qat_parity_steps:g} output steps of {step.step:.4g}, {step.source}" if step.step is not None
              else f"thresholds.int8_atol_floor: {step.source}")
        on = ("top-1 n/a: not a classifier" if rec.confident_samples is None else
              f"{top1_text(rec, 'PyTorch')}; required {th.qat_min_agreement}")
        raise GateError(
            f"QAT export parity failed{'' if len(out_names) == 1 else f' on output {rec.output!r}'}: ONNX Runtime vs "
            f"the QAT model in PyTorch on {rec.samples} check samples: "
            f"max abs diff {rec.max_abs_diff:.4g} (sample {rec.worst_sample}) vs tolerance {rec.tolerance:.4g} "
            f"({of}); {on}. "
            "The exported QDQ graph does not compute what the fake-quantized model computes"
            + (f" ({rec.error})" if rec.error else "")
        )
    return check


# ---------------------------------------------------------------- entry point
def qat_finetune(
    model: torch.nn.Module,
    calibration: Iterable[np.ndarray | Mapping[str, np.ndarray]],
    train_x: Batch | np.ndarray,
    train_y: np.ndarray | None,
    input_name: str | Sequence[str],
    output_name: str | Sequence[str],
    opset: int,
    out_path: Path,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 64,
    loss_fn: Callable | None = None,
    check_samples: np.ndarray | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    seed: int = 0,
    reduce_range: bool | None = None,
    thresholds: Thresholds | None = None,
    distill: str | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    classifier: bool = True,
) -> QATResult:
    """Fake-quant fine-tune `model` with NNCF and write a QDQ INT8 ONNX model to `out_path`.

    `model` is the FP32 model (eval mode, weights loaded); it is not modified. `calibration`
    yields preprocessed float32 samples of shape (1, C, H, W) from the approved calibration
    version; they initialise the quantizer ranges. `train_x` / `train_y` are the preprocessed
    training split and its int labels; QAT without them is a ``SpecError``. `loss_fn(outputs,
    labels)` defaults to cross-entropy. `on_epoch` receives each epoch's
    ``{"epoch", "loss", "train_top1", "seconds"}`` (train_top1 is measured on the training
    batches in train mode, as they were seen). The export is gated by
    :func:`check_export_parity` (ONNX Runtime vs the QAT model in PyTorch, tolerance
    ``thresholds.qat_parity_steps`` quantization steps of the output read from the graph, top-1 agreement on
    the confident samples >= ``thresholds.qat_min_agreement``; default ``Thresholds()``: 3 steps, 0.99) on
    `check_samples` (default: the first 32 training samples); a failure raises ``GateError`` and leaves nothing at
    `out_path`.
    `reduce_range` halves every weight quantizer's range (NNCF's overflow fix), which x86 CPUs without VNNI
    need to run U8S8 without saturating; None decides from this machine's CPU.

    Named inputs/outputs: `input_name` / `output_name` may be lists (every input fed, every output exported and
    checked); `calibration` items and `train_x` / `check_samples` may be Batches. `distill` ("cosine" or "mse")
    trains against the FP32 model's outputs instead of labels (`train_y` may be None); `dynamic_axes` names the
    inputs' non-batch dynamic axes for the export; `classifier=False` drops the top-1 clause of the export check.
    """
    # NNCF compiles its CPU fake-quantize extension on first use in each environment (a minute or more on a small
    # or busy machine) and gives up after NNCF_EXTENSION_LOAD_TIMEOUT seconds (default 60) with a bare
    # multiprocessing TimeoutError: a user's first QAT must not fail on that. A value the user set is kept.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", str(NNCF_EXTENSION_TIMEOUT_S))
    nncf = import_nncf()

    th = thresholds or Thresholds()
    in_names, out_names = _names(input_name), _names(output_name)
    if distill not in (None, "cosine", "mse"):
        raise SpecError(f"QAT distillation is 'cosine' or 'mse', got {distill!r}")
    calib, train_x, train_y = _check_inputs(calibration, train_x, train_y, opset, in_names, dynamic_axes,
                                            needs_labels=distill is None)
    if epochs < 1:
        raise SpecError(f"QAT needs at least one epoch (qat epochs = {epochs})")
    if batch_size < 1:
        raise SpecError(f"QAT batch size must be >= 1, got {batch_size}")
    if distill is not None:
        loss_fn = loss_fn or distillation_loss(distill)
        if distill == "cosine":
            classifier = False  # an embedding has no top-1
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    checks = _take(train_x, slice(0, 32)) if check_samples is None else _as_batch(check_samples, in_names)
    notes: list[str] = []

    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

    if reduce_range is None:
        reduce_range = x86_without_vnni()

    teacher = copy.deepcopy(model).eval() if distill is not None else None
    fp32, folded, why = fold_batchnorm(model)
    notes.append(f"folded {folded} Conv+BatchNorm pair(s) before QAT" if why is None else
                 f"BatchNorm not folded (model not traceable by torch.fx: {why}); ONNX Runtime will run the convs "
                 "that feed a BatchNorm in float")
    notes.append(choose_fake_quantize_kernels(epochs * -(-_n(train_x) // batch_size)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        dataset = nncf.Dataset(calib, lambda feed: tuple(torch.from_numpy(feed[n]) for n in in_names))
        qmodel = nncf.quantize(
            fp32, dataset, subset_size=len(calib),
            advanced_parameters=AdvancedQuantizationParameters(
                activations_quantization_params=QuantizationParameters(per_channel=False),
                overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.FIRST_LAYER),
        )
        notes.append(f"quantizer ranges initialised by nncf.quantize on {len(calib)} calibration samples "
                     f"({time.perf_counter() - t0:.1f} s; preset performance: symmetric per-channel int8 weights, "
                     "per-tensor activations (uint8 after ReLU-like ops), fast bias correction)")
        history = _train(qmodel, train_x, train_y, epochs, lr, batch_size, loss_fn, seed, on_epoch, teacher=teacher)
    notes.append(f"fine-tuned {epochs} epoch(s) on {_n(train_x)} samples, Adam lr {lr}, batch {batch_size}, seed {seed}"
                 + (f", distillation ({'1 - cosine' if distill == 'cosine' else 'MSE'}) to the FP32 model's outputs"
                    if distill else ""))

    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp.onnx")
    try:
        notes += export_qdq(qmodel, _take(checks, slice(0, 1)), in_names, out_names, opset, tmp, dynamic_axes)
        parity = check_export_parity(tmp, qmodel, checks, in_names, batch_size=max(batch_size, 1), thresholds=th,
                                     classifier=classifier)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    step = "no output step: the floor" if parity.output_step is None else f"output step {parity.output_step:.4g}"
    top1 = ("top-1 n/a: not a classifier" if parity.top1_agreement is None else
            f"top-1 agreement {parity.top1_agreement:.4f} ({parity.confident_samples} confident samples, "
            f"{parity.near_ties} near-tie flips" + ("; held on every sample: fewer than half confident)"
                                                    if parity.agreement_on_all else ")"))
    notes.append(f"export parity on {parity.samples} samples: max abs {parity.max_abs:.4g} <= tolerance "
                 f"{parity.tolerance:.4g} ({th.qat_parity_steps:g} steps; {step}, {parity.step_source}); {top1}")
    if parity.tolerance >= parity.output_spread:
        notes.append(f"weak export parity check: its tolerance {parity.tolerance:.4g} spans the whole range of the "
                     f"outputs ({parity.output_spread:.4g} on these samples; one quantization step of the last "
                     "quantized tensor is that coarse), so its max-abs clause catches only gross export errors"
                     + ("; no sample is confident, so its top-1 clause held every sample instead"
                        if parity.agreement_on_all else "")
                     + ". The validation score of the exported model is what holds it to the SLA")
    return QATResult(onnx_path=out_path, epochs=history, parity_max_abs=parity.max_abs,
                     parity_top1_agreement=parity.top1_agreement, engine=ENGINE, notes=notes)
