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
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeq.core.compare import compare_output, step_tolerance
from edgeq.core.errors import ExportError, GateError, SpecError
from edgeq.core.onnx_graph import load_onnx, output_step
from edgeq.core.ort import ort_session
from edgeq.core.platform import x86_without_vnni
from edgeq.core.specs import Thresholds
from edgeq.export import ONNX_EXPORT_LOCK

ENGINE = "nncf-torch-qat"
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13
MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


@dataclass
class QATResult:
    onnx_path: Path  # the QDQ INT8 ONNX model written
    epochs: list[dict]  # per epoch: {"epoch", "loss", "train_top1", "seconds"}
    parity_max_abs: float  # QAT ONNX (onnxruntime) vs QAT PyTorch model outputs on the check samples
    parity_top1_agreement: float
    engine: str  # e.g. "nncf-torch-qat"
    notes: list[str] = field(default_factory=list)


@dataclass
class ParityCheck:
    max_abs: float
    top1_agreement: float  # on every check sample
    tolerance: float  # Thresholds.qat_parity_steps x the output's quantization step, at least int8_atol_floor
    output_step: float | None  # read from the exported graph; None: the graph gives none (the floor applies)
    step_source: str  # what the step was read from
    confident_samples: int  # samples whose PyTorch top-1 margin exceeds the tolerance
    confident_top1_agreement: float | None  # the agreement clause, on those samples
    near_ties: int  # disagreements on the other samples: reported, not counted
    samples: int
    worst_sample: int


# ---------------------------------------------------------------- inputs
def _check_inputs(calibration: Iterable[np.ndarray], train_x, train_y, opset: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    if train_x is None or train_y is None or len(train_x) == 0:
        raise SpecError("QAT needs training data: set data.train in the config (QAT fine-tunes on labelled samples)")
    train_x = np.ascontiguousarray(np.asarray(train_x, dtype=np.float32))
    train_y = np.asarray(train_y)
    if train_y.ndim != 1 or len(train_y) != len(train_x):
        raise SpecError(f"QAT training labels must be one int per sample: got x {train_x.shape}, y {train_y.shape}")
    if not np.issubdtype(train_y.dtype, np.integer):
        raise SpecError(f"QAT training labels must be integers (class ids), got dtype {train_y.dtype}")
    calib = [np.ascontiguousarray(np.asarray(c, dtype=np.float32)) for c in calibration]
    if not calib:
        raise SpecError("QAT needs calibration samples to initialise the quantizer ranges: the calibration version is empty")
    want = (1, *train_x.shape[1:])
    bad = [i for i, c in enumerate(calib) if c.shape != want]
    if bad:
        raise SpecError(
            f"calibration sample {bad[0]} has shape {calib[bad[0]].shape}, but the model's training inputs are "
            f"{want} per sample ({len(bad)} of {len(calib)} samples differ): the calibration version does not match "
            "the model's inputs"
        )
    if opset < MIN_QDQ_OPSET:
        raise SpecError(
            f"QAT exports per-channel QuantizeLinear/DequantizeLinear, which needs ONNX opset >= {MIN_QDQ_OPSET}; "
            f"the targets allow at most opset {opset}"
        )
    return calib, train_x, train_y


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


def _train(qmodel: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch_size: int,
           loss_fn: Callable, seed: int, on_epoch: Callable[[dict], None] | None) -> list[dict]:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(qmodel.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    n_batches = (len(xt) + batch_size - 1) // batch_size
    with _progress() as progress:
        for ep in range(1, epochs + 1):
            task = progress.add_task(f"QAT epoch {ep}/{epochs}", total=n_batches, loss=float("nan"))
            qmodel.train()
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
                xb, yb = xt[idx], yt[idx]
                opt.zero_grad()
                out = qmodel(xb)
                loss = loss_fn(out, yb)
                if not torch.isfinite(loss):
                    raise GateError(f"QAT loss became {float(loss)} in epoch {ep}: lower qat lr (now {lr})")
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((out.detach().argmax(1) == yb).sum())
                seen += len(idx)
                progress.update(task, advance=1, loss=loss_sum / seen)
            row = {"epoch": ep, "loss": loss_sum / seen, "train_top1": correct / seen,
                   "seconds": time.perf_counter() - t0}
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


def export_qdq(qmodel: torch.nn.Module, example: np.ndarray, input_name: str, output_name: str, opset: int,
               out: Path) -> list[str]:
    """Write the NNCF QAT model as a QDQ ONNX model with a dynamic ``batch`` axis. Returns notes."""
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
                qmodel, (torch.from_numpy(example),), str(out), dynamo=False, opset_version=export_opset,
                input_names=[input_name], output_names=[output_name], do_constant_folding=True,
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
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
def check_export_parity(onnx_path: Path, torch_model: torch.nn.Module | Callable, samples: np.ndarray,
                        input_name: str, batch_size: int = 64, thresholds: Thresholds | None = None) -> ParityCheck:
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
    difference can cause; they are reported (``near_ties``), not counted.
    Raises ``GateError`` with the numbers otherwise. `thresholds` default: ``Thresholds()``.
    """
    th = thresholds or Thresholds()
    samples = np.ascontiguousarray(np.asarray(samples, dtype=np.float32))
    if len(samples) == 0:
        raise SpecError("the QAT export parity check needs at least one check sample")
    session = ort_session(onnx_path)
    refs, gots = [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            refs.append(np.asarray(torch_model(torch.from_numpy(batch)).detach().float().numpy()))
            gots.append(np.asarray(session.run(None, {input_name: batch})[0], dtype=np.float32))
    ref, got = np.concatenate(refs), np.concatenate(gots)
    name = session.get_outputs()[0].name
    step = output_step(load_onnx(onnx_path), name)
    tolerance = step_tolerance(th.qat_parity_steps, step.step, th.int8_atol_floor, min_top1=th.qat_min_agreement)
    rec = compare_output(name, ref, got, tolerance, labels=("PyTorch", "ONNX"), top1=True)
    if rec.max_abs_diff is None:  # shapes differ: no number to hold against the tolerance
        raise GateError(f"QAT export parity: {rec.error}")
    check = ParityCheck(max_abs=rec.max_abs_diff, top1_agreement=rec.top1_agreement, tolerance=rec.tolerance,
                        output_step=step.step, step_source=step.source, confident_samples=rec.confident_samples or 0,
                        confident_top1_agreement=rec.confident_top1_agreement, near_ties=rec.near_ties,
                        samples=rec.samples, worst_sample=rec.worst_sample)
    if not rec.passed:
        of = (f"{th.qat_parity_steps:g} output steps of {step.step:.4g}, {step.source}" if step.step is not None
              else f"thresholds.int8_atol_floor: {step.source}")
        agree = "n/a" if rec.confident_top1_agreement is None else f"{rec.confident_top1_agreement:.4f}"
        raise GateError(
            f"QAT export parity failed: ONNX Runtime vs the QAT model in PyTorch on {rec.samples} check samples: "
            f"max abs diff {rec.max_abs_diff:.4g} (sample {rec.worst_sample}) vs tolerance {rec.tolerance:.4g} "
            f"({of}); top-1 agreement {agree} on {rec.confident_samples or 0} confident samples (PyTorch top-1 "
            f"margin > tolerance; required {th.qat_min_agreement}; {rec.near_ties} near-tie flip(s) not counted). "
            "The exported QDQ graph does not compute what the fake-quantized model computes"
            + (f" ({rec.error})" if rec.error else "")
        )
    return check


# ---------------------------------------------------------------- entry point
def qat_finetune(
    model: torch.nn.Module,
    calibration: Iterable[np.ndarray],
    train_x: np.ndarray,
    train_y: np.ndarray,
    input_name: str,
    output_name: str,
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
    """
    import nncf

    th = thresholds or Thresholds()
    calib, train_x, train_y = _check_inputs(calibration, train_x, train_y, opset)
    if epochs < 1:
        raise SpecError(f"QAT needs at least one epoch (qat epochs = {epochs})")
    if batch_size < 1:
        raise SpecError(f"QAT batch size must be >= 1, got {batch_size}")
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    checks = train_x[:32] if check_samples is None else np.asarray(check_samples, dtype=np.float32)
    notes: list[str] = []

    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

    if reduce_range is None:
        reduce_range = x86_without_vnni()

    fp32, folded, why = fold_batchnorm(model)
    notes.append(f"folded {folded} Conv+BatchNorm pair(s) before QAT" if why is None else
                 f"BatchNorm not folded (model not traceable by torch.fx: {why}); ONNX Runtime will run the convs "
                 "that feed a BatchNorm in float")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        dataset = nncf.Dataset(calib, lambda a: torch.from_numpy(a))
        qmodel = nncf.quantize(
            fp32, dataset, subset_size=len(calib),
            advanced_parameters=AdvancedQuantizationParameters(
                activations_quantization_params=QuantizationParameters(per_channel=False),
                overflow_fix=OverflowFix.ENABLE if reduce_range else OverflowFix.FIRST_LAYER),
        )
        notes.append(f"quantizer ranges initialised by nncf.quantize on {len(calib)} calibration samples "
                     f"({time.perf_counter() - t0:.1f} s; preset performance: symmetric per-channel int8 weights, "
                     "per-tensor activations (uint8 after ReLU-like ops), fast bias correction)")
        history = _train(qmodel, train_x, train_y, epochs, lr, batch_size, loss_fn, seed, on_epoch)
    notes.append(f"fine-tuned {epochs} epoch(s) on {len(train_x)} samples, Adam lr {lr}, batch {batch_size}, seed {seed}")

    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp.onnx")
    try:
        notes += export_qdq(qmodel, checks[:1], input_name, output_name, opset, tmp)
        parity = check_export_parity(tmp, qmodel, checks, input_name, batch_size=max(batch_size, 1), thresholds=th)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    step = "no output step: the floor" if parity.output_step is None else f"output step {parity.output_step:.4g}"
    notes.append(f"export parity on {parity.samples} samples: max abs {parity.max_abs:.4g} <= tolerance "
                 f"{parity.tolerance:.4g} ({th.qat_parity_steps:g} steps; {step}, {parity.step_source}); top-1 "
                 f"agreement {parity.top1_agreement:.4f} ({parity.confident_samples} confident samples, "
                 f"{parity.near_ties} near-tie flips)")
    return QATResult(onnx_path=out_path, epochs=history, parity_max_abs=parity.max_abs,
                     parity_top1_agreement=parity.top1_agreement, engine=ENGINE, notes=notes)
