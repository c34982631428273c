"""Export stage: PyTorch -> ONNX at the targets' opset, then prove the file is right.

Plain functions (no Prefect) so tests call them directly; `edgeq/tasks/export.py` wraps them.
"""

from __future__ import annotations

import inspect
import re
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import BaseModel, Field

from edgeq.backends import get_backend
from edgeq.core.compare import OutputComparison, Tolerance, compare_outputs
from edgeq.core.errors import ExportError, GateError, SpecError
from edgeq.core.onnx_graph import CONTROL_FLOW_OPS, TensorMeta, iter_nodes, make_feeds, node_label, rename_outputs
from edgeq.core.ort import LOG_FATAL, ort_session
from edgeq.core.specs import ModelSpec, TargetSpec, Thresholds

STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
DYNAMO_MIN_OPSET = 18


# ---------------------------------------------------------------- records
class Finding(BaseModel):
    node: str
    op_type: str
    domain: str
    kind: str  # "control-flow" | "custom-op"


class TargetSupport(BaseModel):
    target: str
    node: str
    op: str
    supported: bool
    note: str = ""


class ProbeRow(BaseModel):
    input: str
    axis: int
    dim: str
    size: int
    ok: bool
    max_abs_diff: float | None = None  # over the outputs that were compared (finite, same shape)
    error: str = ""
    non_finite: bool = False  # an output held NaN/Inf: the comparator refused it (no baked-in shape to blame)


class ParityRow(BaseModel):
    output: str
    max_abs_diff: float
    max_rel_diff: float
    worst_sample: int
    samples: int
    tolerance: float
    passed: bool
    error: str = ""  # why the values were refused (non-finite outputs)
    output_scale: float | None = None  # the largest |PyTorch output| on the samples (the tolerance's relative part)


class ExportReport(BaseModel):
    model: str
    opset: int
    opset_reason: str
    exporter: str
    findings: list[Finding] = Field(default_factory=list)
    target_support: list[TargetSupport] = Field(default_factory=list)
    probe: list[ProbeRow] = Field(default_factory=list)
    parity: list[ParityRow] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.ok for p in self.probe) and all(p.passed for p in self.parity)


# torch.onnx.export keeps process-global state (GLOBALS.in_onnx_export, the tracer) and warnings.catch_warnings is
# process-global too: two exports in threads of one process (Prefect's thread task runner fanning out over models)
# fail with "GLOBALS.in_onnx_export must be False". Every export in edgeq holds this lock.
ONNX_EXPORT_LOCK = threading.RLock()


# ---------------------------------------------------------------- opset
def choose_opset(targets: list[TargetSpec]) -> tuple[int, str]:
    """The lowest maximum opset among the targets, and which target set it."""
    limits = []
    for t in targets:
        try:
            limit = t.max_opset if t.max_opset is not None else get_backend(t.backend).max_opset(t)
        except SpecError as exc:  # name the target, not only the backend
            raise SpecError(f"target {t.name!r}: {exc}") from None
        limits.append((limit, t.name))
    opset, who = min(limits)
    return opset, f"lowest maximum opset among targets: {who} supports up to {opset}"


# ---------------------------------------------------------------- inputs
Samples = Mapping[str, np.ndarray]  # {model input name: real samples along axis 0}, every input of the model


def as_samples(spec: ModelSpec, samples: Samples | np.ndarray) -> dict[str, np.ndarray]:
    """Real samples for every model input; one array is a one-input model's. A gate never makes up an input's
    values: a missing input is a SpecError."""
    if not isinstance(samples, Mapping):
        if len(spec.inputs) > 1:
            raise SpecError(f"the model has inputs {[i.name for i in spec.inputs]}: give samples for every input "
                            "({input name: array})")
        samples = {spec.inputs[0].name: samples}
    missing = [i.name for i in spec.inputs if i.name not in samples]
    if missing:
        raise SpecError(f"no samples for model input(s) {missing}: the export gates feed real data to every input")
    return {i.name: np.asarray(samples[i.name]) for i in spec.inputs}


def data_dims(spec: ModelSpec, samples: Samples) -> dict[str, int]:
    """The dynamic dimension sizes that `samples` hold (batch = the number of samples)."""
    dims = dict(spec.example_dims)
    for inp in spec.inputs:
        for axis, dim in inp.dynamic_axes.items():
            dims[dim] = samples[inp.name].shape[axis]
    return dims


def make_inputs(spec: ModelSpec, dims: dict[str, int], samples: Samples | np.ndarray | None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every input at the given dynamic sizes, from real samples (repeated to fill the batch, cut to a
    shorter sequence); without samples, random floats and zero integers (smoke runs only)."""
    metas = [TensorMeta(name=i.name, shape=list(i.shape), dtype=i.dtype) for i in spec.inputs]
    return make_feeds(metas, dims, samples, seed=seed, samples_hint="model.inputs shapes vs data")


def run_torch(model: torch.nn.Module, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*[torch.from_numpy(feeds[i.name]) for i in spec.inputs])
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().numpy() for o in outs]


def _session(path: str | Path):
    return ort_session(path, log_severity=LOG_FATAL)  # errors reach the user as exceptions, not as log lines


def run_onnx(path: str | Path, feeds: Mapping[str, np.ndarray] | np.ndarray, input_name: str | None = None,
             output_name: str | None = None, *, outputs: Sequence[str] | None = None,
             chunk: int = 256) -> dict[str, np.ndarray] | np.ndarray:
    """Run an ONNX model on ONNX Runtime CPU over whole arrays (dynamic batch), in chunks of `chunk` samples.

    `feeds` maps input names to arrays batched along axis 0; the result maps each of `outputs` (default: every
    model output) to its concatenated array. The one-input form ``run_onnx(path, x, input_name, output_name)``
    feeds `x` as `input_name` and returns `output_name`'s array.
    """
    if not isinstance(feeds, Mapping):
        if input_name is None or output_name is None:
            raise TypeError("run_onnx(path, x, input_name, output_name): one array needs its input and output names")
        return run_onnx(path, {input_name: feeds}, outputs=[output_name], chunk=chunk)[output_name]
    sess = _session(path)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    n = len(next(iter(feeds.values())))
    parts = [sess.run(names, {k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


# ---------------------------------------------------------------- export
# TracerWarnings that say a tensor's value became a Python value: the trace holds it as a constant.
_BAKED = re.compile(r"Converting a tensor to a Python (boolean|number|index|integer|float|list)")


def _dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    return {i.name: i.dynamic_axes for i in spec.inputs if i.dynamic_axes}


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = text.split("## Exception summary", 1)[-1].strip()
    return " ".join(summary.split())[:600]


def export_onnx(model: torch.nn.Module, spec: ModelSpec, opset: int, feeds: dict[str, np.ndarray], out: Path,
                opset_reason: str = "") -> tuple[str, list[str]]:
    """Export to `out` at exactly `opset`. Returns (exporter used, warnings)."""
    exporter = spec.exporter
    if exporter == "auto":
        exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(
            f"the torch.export-based exporter emits opset >= {DYNAMO_MIN_OPSET}, but a target supports at most "
            f"opset {opset}: set model.exporter to 'auto' or 'torchscript', or drop that target"
        )
    args = tuple(torch.from_numpy(feeds[i.name]) for i in spec.inputs)
    # The exporters name internal values after modules and ops (an `embedding` module gives a value `embedding`),
    # and the torch.export-based one then writes a graph that names two values alike. So export under names that
    # cannot collide, and give the outputs the user's names afterwards (rename_outputs moves internals aside).
    temp_outputs = [f"edgeq_output_{k}__" for k in range(len(spec.outputs))]
    kwargs: dict[str, Any] = dict(
        input_names=[i.name for i in spec.inputs], output_names=temp_outputs, opset_version=opset,
        dynamic_axes=_dynamic_axes(spec) or None,
    )
    notes: list[str] = []
    with ONNX_EXPORT_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if exporter == "dynamo":
                torch.onnx.export(model, args, str(out), dynamo=True, external_data=False, verbose=False, **kwargs)
            else:
                torch.onnx.export(model, args, str(out), dynamo=False, do_constant_folding=True, **kwargs)
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            op = re.search(r"operator '([^']+)'", str(exc))
            added = re.search(r"added in version (\d+)", str(exc))
            if added:  # the op exists in ONNX, just not at an opset this low: the targets' limit is what to change
                raise ExportError(
                    f"op {op.group(1) if op else '?'} needs ONNX opset >= {added.group(1)}, but the export opset is "
                    f"{opset} ({opset_reason or 'the lowest maximum opset among the targets'}): raise that target's "
                    "max_opset, drop the target, or change the model to avoid the op"
                ) from None
            raise ExportError(
                f"op {op.group(1) if op else '?'} has no ONNX symbolic at opset {opset} (TorchScript exporter): "
                "register a custom symbolic (torch.onnx.register_custom_op_symbolic), or change the model to "
                f"use ops ONNX has. Exporter said: {_first_line(exc)}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - classify the exporter's failure for the user
            text = _first_line(exc)
            if "GuardOnDataDependentSymNode" in str(exc) or "data-dependent" in str(exc):
                raise ExportError(
                    "the model has tensor-dependent Python control flow (an `if`/`while` on a tensor's value), "
                    "which export cannot capture: rewrite it with torch.cond (exported as an ONNX If node) or "
                    f"remove the branch. Exporter said: {text}"
                ) from None
            static = re.search(r"inferred a static shape of (\d+) for dimension inputs\['(\w+)'\]\.shape\[(\d+)\]", str(exc))
            if static:
                size, arg, axis = static.group(1), static.group(2), int(static.group(3))
                names = [i.name for i in spec.inputs]
                arg_names = list(inspect.signature(model.forward).parameters)
                inp = names[arg_names.index(arg)] if arg in arg_names and arg_names.index(arg) < len(names) else arg
                dim = next((i.dynamic_axes.get(axis) for i in spec.inputs if i.name == inp), None)
                raise ExportError(
                    f"input {inp!r} axis {axis} ({dim!r}) is declared dynamic but the model code fixes it to {size} "
                    "(e.g. a reshape/view with a literal size): use -1 or x.shape[...] there, or make the axis static "
                    "in model.inputs"
                ) from None
            op = re.search(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", str(exc))
            if op and ("ConversionError" in type(exc).__name__ or "translat" in str(exc).lower()):
                raise ExportError(
                    f"op {op.group(1)} has no ONNX translation at opset {opset}: register one "
                    "(torch.onnx.export custom_translation_table) or change the model to use ops ONNX has. "
                    f"Exporter said: {text}"
                ) from None
            raise ExportError(f"export failed at opset {opset} ({exporter} exporter): {type(exc).__name__}: {text}") from None
    for w in caught:
        name = w.category.__name__
        baked = _BAKED.search(str(w.message)) if name == "TracerWarning" else None
        if baked and baked.group(1) == "boolean":
            raise ExportError(
                "the model has tensor-dependent Python control flow: tracing recorded only the branch the export "
                f"example took ({w.filename}:{w.lineno}), so the ONNX model would silently be wrong for other inputs. "
                "Rewrite it with torch.cond and use the torch.export-based exporter (opset >= 18), or remove the branch."
            )
        if baked:
            raise ExportError(
                f"the model turns a tensor's value into a Python {baked.group(1)} at {w.filename}:{w.lineno} "
                "(`int(t)`, `float(t)`, `t.item()`, a tensor used as an index or a size): tracing records the value the "
                "export example had as a constant, so the ONNX model would silently be wrong for other inputs. Keep "
                "the value a tensor there, or set model.exporter to 'dynamo' (the torch.export-based exporter, "
                "opset >= 18), which captures it or says it cannot."
            )
        if name == "TracerWarning":
            notes.append(f"tracer: {w.message} ({Path(w.filename).name}:{w.lineno})")
    proto = onnx.load(str(out), load_external_data=False)
    got = {o.domain: o.version for o in proto.opset_import}
    if got.get("", got.get("ai.onnx", 0)) > opset:
        raise ExportError(f"exporter wrote opset {got.get('')} but targets support at most {opset}")
    written = [o.name for o in proto.graph.output]
    if written != temp_outputs:
        raise ExportError(f"the model returns {len(written)} output(s) but model.outputs names {len(spec.outputs)} "
                          f"({list(spec.outputs)}): name every output the model's forward returns, in order")
    notes += rename_outputs(proto, dict(zip(temp_outputs, spec.outputs)))
    onnx.save(proto, str(out))
    return exporter, notes


def check_and_infer(path: Path) -> onnx.ModelProto:
    """onnx's full checker and strict shape inference; the inferred model is written back."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported ONNX fails onnx.checker/shape inference: {exc}") from None
    onnx.save(model, str(path))
    return model


# ---------------------------------------------------------------- graph scan
def scan_graph(model: onnx.ModelProto) -> list[Finding]:
    """Non-standard-domain ops and control flow, including inside subgraphs and local functions."""
    findings: list[Finding] = []
    local_functions = {(f.domain, f.name) for f in model.functions}
    for node in iter_nodes(model):
        if node.op_type in CONTROL_FLOW_OPS and node.domain in STANDARD_DOMAINS:
            findings.append(Finding(node=node_label(node), op_type=node.op_type, domain=node.domain or "ai.onnx",
                                    kind="control-flow"))
        elif node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local_functions:
            findings.append(Finding(node=node_label(node), op_type=node.op_type, domain=node.domain, kind="custom-op"))
    return findings


_CONTROL_FLOW_NOTE = {
    True: "runs as a real branch/loop on the target",
    False: "the target cannot run it: remove the data-dependent branch, or unroll the loop, before targeting it",
}


def hold_against_targets(findings: list[Finding], targets: list[TargetSpec]) -> list[TargetSupport]:
    """For each finding and target: can that target run it?"""
    rows = []
    for t in targets:
        backend = get_backend(t.backend)
        for f in findings:
            ok = backend.supports_node(f.domain if f.domain != "ai.onnx" else "", f.op_type, t)
            note = _CONTROL_FLOW_NOTE[ok] if f.kind == "control-flow" else (
                "" if ok else "custom op: the target has no kernel; provide a plugin/custom op library or change the model")
            rows.append(TargetSupport(target=t.name, node=f.node, op=f"{f.domain}::{f.op_type}", supported=ok, note=note))
    return rows


# ---------------------------------------------------------------- gates
def parity_tolerance(reference: np.ndarray, thresholds: Thresholds) -> tuple[float, float]:
    """(tolerance, scale) of one output: `export_atol` + `export_rtol` x the largest finite |PyTorch output| on the
    samples (the scale). Float32 rounding grows with the values a model computes, and its size depends on the CPU's
    kernels: a correct MobileNetV2 export whose logits reach 4.3 differed from PyTorch by 1.1e-5 on an AVX-512
    CPU, which an absolute 1e-5 alone refused. With the relative part it passes, while on the digits model (logits
    up to 7) one first-conv weight of 144 off by 1e-4 still fails (2.2e-4 against 8.2e-5)."""
    ref = np.asarray(reference, dtype=np.float64)
    finite = np.abs(ref[np.isfinite(ref)])
    scale = float(finite.max()) if finite.size else 0.0
    return thresholds.export_atol + thresholds.export_rtol * scale, scale


def _torch_vs_onnx(spec: ModelSpec, ref: list[np.ndarray], got: list[np.ndarray],
                   tolerances: list[float]) -> list[OutputComparison]:
    """Each output against its own tolerance (`tolerances`, in the order of `spec.outputs`)."""
    names = list(spec.outputs)
    tol = {n: Tolerance.absolute(t) for n, t in zip(names, tolerances)}
    return compare_outputs(dict(zip(names, ref)), dict(zip(names, got)), tol, labels=("PyTorch", "ONNX"))


def degenerate_outputs(spec: ModelSpec, ref: list[np.ndarray]) -> list[str]:
    """Why reference outputs on the parity samples cannot show a difference: an output that is all zero, the same
    for every sample, or not finite. A gate that compares such outputs compares nothing."""
    why = []
    for name, out in zip(spec.outputs, ref):
        a = np.asarray(out)
        if a.size == 0:
            why.append(f"output {name!r} is empty")
        elif not np.isfinite(a).all():
            why.append(f"output {name!r} holds NaN/Inf on {int((~np.isfinite(a)).sum())} values")
        elif not a.any():
            why.append(f"output {name!r} is all zero")
        elif a.ndim and len(a) > 1 and np.array_equal(a, np.broadcast_to(a[:1], a.shape)):
            why.append(f"output {name!r} is the same for all {len(a)} samples")
    return why


def check_parity(model: torch.nn.Module, spec: ModelSpec, session, samples: Samples | np.ndarray,
                 thresholds: Thresholds) -> list[ParityRow]:
    """PyTorch vs ONNX Runtime on real samples of every input, per output. Outputs of different shapes, and
    reference outputs that cannot show a difference (`degenerate_outputs`), raise GateError."""
    samples = as_samples(spec, samples)
    feeds = make_inputs(spec, data_dims(spec, samples), samples)
    ref = run_torch(model, spec, feeds)
    degenerate = degenerate_outputs(spec, ref)
    if degenerate:
        raise GateError(
            f"parity gate: the parity samples are degenerate — on the {len(next(iter(feeds.values())))} samples "
            f"PyTorch's {'; '.join(degenerate)}, so comparing ONNX with it would prove nothing. Check the data "
            "(an input of zeros, an all-zero mask, the wrong split) and the weights (model.weights loaded?)")
    got = session.run(list(spec.outputs), feeds)
    rows = []
    tolerances = [parity_tolerance(out, thresholds) for out in ref]
    for r, (_, scale) in zip(_torch_vs_onnx(spec, ref, got, [t for t, _ in tolerances]), tolerances):
        if r.max_abs_diff is None:  # shapes differ (or an output is missing): no number to gate on
            raise GateError(r.error)
        rows.append(ParityRow(output=r.output, max_abs_diff=r.max_abs_diff, max_rel_diff=r.max_rel_diff,
                              worst_sample=r.worst_sample, samples=r.samples, tolerance=r.tolerance, passed=r.passed,
                              error=r.error, output_scale=scale))
    return rows


def probe_sizes(dim: str, base: int, have: int | None) -> list[int]:
    """Sizes to probe a dynamic axis at, other than the export example's `base`. The batch: 1 and 3. Another axis
    (a sequence) with real data `have` long: shorter lengths of that data (the data cannot be made longer); without
    data, one longer and one shorter."""
    if dim == "batch":
        sizes = [1, 3]
    elif have is not None:
        sizes = [have - 1, max(1, have // 2)] if have > 1 else [1]
    else:
        sizes = [base + 1, max(1, base - 1)]
    return [s for s in dict.fromkeys(sizes) if s != base] or ([base + 2] if have is None or dim == "batch" else [1])


def probe_dynamic_shapes(model: torch.nn.Module, spec: ModelSpec, session, samples: Samples | np.ndarray | None,
                         thresholds: Thresholds) -> list[ProbeRow]:
    """Run the ONNX model at sizes other than the export example's, on real samples: other batch sizes, and for a
    sequence axis, the samples cut to shorter lengths (every input that shares the axis alike). A baked-in shape
    fails or diverges."""
    # The probe looks for baked-in shapes (errors, wrong shapes, gross divergence); numeric parity is the
    # parity gate's job, so a tighter export tolerance does not make the probe flag float noise: each output's
    # tolerance is its parity tolerance, at least probe_atol.
    samples = None if samples is None else as_samples(spec, samples)
    have = data_dims(spec, samples) if samples is not None else {}
    rows = []
    seen: set[str] = set()
    for inp in spec.inputs:
        for axis, dim in inp.dynamic_axes.items():
            if dim in seen:  # a shared axis (seq of input_ids and attention_mask) is probed once, on every input
                continue
            seen.add(dim)
            base = spec.example_dims[dim]
            for size in probe_sizes(dim, base, None if dim == "batch" else have.get(dim)):
                dims = {**spec.example_dims, **{d: n for d, n in have.items() if d != "batch"}, dim: size}
                feeds = make_inputs(spec, dims, samples, seed=size)
                try:
                    got = session.run(list(spec.outputs), feeds)
                except Exception as exc:  # noqa: BLE001 - ORT's own message names the node
                    rows.append(ProbeRow(input=inp.name, axis=axis, dim=dim, size=size, ok=False,
                                         error=" ".join(str(exc).split())[:400]))
                    continue
                # Every output through the comparator, each judged on its own: a max over the outputs' numbers
                # would drop a NaN (max([0.1, nan]) is 0.1).
                ref = run_torch(model, spec, feeds)
                tolerances = [max(thresholds.probe_atol, parity_tolerance(r, thresholds)[0]) for r in ref]
                compared = _torch_vs_onnx(spec, ref, got, tolerances)
                bad = [f"{c.output}: {tuple(c.reference_shape)} vs {tuple(c.candidate_shape)}"
                       for c in compared if c.max_abs_diff is None]
                refused = [c.error for c in compared if c.max_abs_diff is not None and c.error]
                mad = max((c.max_abs_diff for c in compared if c.max_abs_diff is not None and not c.error), default=0.0)
                ok = all(c.passed for c in compared)
                rows.append(ProbeRow(input=inp.name, axis=axis, dim=dim, size=size, ok=ok, max_abs_diff=mad,
                                     non_finite=bool(refused) and not bad,
                                     error=("output shape differs from PyTorch: " + "; ".join(bad)) if bad else
                                     "; ".join(refused) if refused else
                                     ("" if ok else "outputs differ from PyTorch by " + "; ".join(
                                         f"{c.output}: {c.max_abs_diff:.3g} > {c.tolerance:.3g}"
                                         for c in compared if not c.passed))))
    return rows


def format_failures(report: ExportReport) -> str:
    msgs = []
    for p in report.probe:
        if not p.ok:
            why = ("— the model computes NaN/Inf on these inputs (a log, sqrt or division of a value that can be "
                   "negative or zero?)" if p.non_finite else
                   "— a shape was baked in at export (e.g. a .view() with a literal size, or a Python int from a "
                   "tensor's shape)")
            msgs.append(f"dynamic-shape probe: input {p.input!r} axis {p.axis} ({p.dim!r}) at size {p.size}: {p.error} "
                        + why)
    for r in report.parity:
        if r.error:
            msgs.append(f"parity gate: {r.error}")
        elif not r.passed:
            scale = "" if r.output_scale is None else (
                f"; the tolerance is export_atol + export_rtol x the largest |PyTorch output|, {r.output_scale:.3g}")
            msgs.append(
                f"parity gate: output {r.output!r} max abs diff {r.max_abs_diff:.3g} > tolerance {r.tolerance:.3g} "
                f"(max rel {r.max_rel_diff:.3g}, worst sample #{r.worst_sample} of {r.samples}{scale})"
            )
    return "\n".join(msgs)


# ---------------------------------------------------------------- the stage
def run_export(model: torch.nn.Module, spec: ModelSpec, targets: list[TargetSpec], samples: Samples | np.ndarray,
               thresholds: Thresholds, out_path: Path) -> ExportReport:
    """Export, check, scan, probe and gate. Raises ExportError/GateError; on success `out_path` holds the model.

    `samples` are real samples of every model input ({name: array}; one array for a one-input model). A refusal
    after the model was measured carries the export report as the GateError's ``report``.
    """
    samples = as_samples(spec, samples)
    opset, reason = choose_opset(targets)
    feeds = make_inputs(spec, spec.example_dims, samples)
    try:
        run_torch(model, spec, feeds)
    except Exception as exc:  # noqa: BLE001
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        raise SpecError(
            f"the model rejects inputs of the spec's shapes {shapes} (model.inputs): {type(exc).__name__}: {exc}"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        exporter, notes = export_onnx(model, spec, opset, feeds, tmp_path, opset_reason=reason)
        proto = check_and_infer(tmp_path)
        findings = scan_graph(proto)
        report = ExportReport(model=spec.name, opset=opset, opset_reason=reason, exporter=exporter,
                              findings=findings, target_support=hold_against_targets(findings, targets), warnings=notes)
        session = _session(tmp_path)
        report.probe = probe_dynamic_shapes(model, spec, session, samples, thresholds)
        if report.passed:  # a failed probe already says why the batch of parity samples would not run
            try:
                report.parity = check_parity(model, spec, session, samples, thresholds)
            except GateError:
                raise
            except Exception as exc:  # noqa: BLE001
                n = len(next(iter(samples.values())))
                raise GateError(f"parity gate: ONNX Runtime could not run {n} samples: {exc}") from None
        if not report.passed:
            raise GateError("export refused:\n" + format_failures(report), report=report)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.replace(out_path)
    return report
