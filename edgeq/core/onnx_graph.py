"""ONNX graph helpers every layer shares (onnx and numpy only, no runtime): load, walk, describe, feed, and read a
QDQ graph's output quantization step."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydantic import BaseModel

from edgeq.core.errors import ModelFileError, SpecError

# Control-flow ops whose support differs between runtimes and compilers.
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
STANDARD_DOMAINS = ("", "ai.onnx")

# The one tensor type table: ONNX TensorProto element type -> (numpy type, ONNX Runtime's type string).
_TENSOR_TYPES = {
    1: (np.float32, "tensor(float)"), 2: (np.uint8, "tensor(uint8)"), 3: (np.int8, "tensor(int8)"),
    5: (np.int16, "tensor(int16)"), 6: (np.int32, "tensor(int32)"), 7: (np.int64, "tensor(int64)"),
    9: (np.bool_, "tensor(bool)"), 10: (np.float16, "tensor(float16)"), 11: (np.float64, "tensor(double)"),
    12: (np.uint32, "tensor(uint32)"), 13: (np.uint64, "tensor(uint64)"),
}
ONNX_DTYPES = {elem: np_type for elem, (np_type, _) in _TENSOR_TYPES.items()}
# ONNX Runtime's NodeArg.type ("tensor(float)") -> numpy dtype name ("float32").
ORT_DTYPES = {ort_type: np.dtype(np_type).name for np_type, ort_type in _TENSOR_TYPES.values()}
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                        "MatMulInteger", "DynamicQuantizeLinear"})


class TensorMeta(BaseModel):
    name: str
    shape: list[int | str]  # a string is a dynamic dimension
    dtype: str  # numpy dtype name


def load_onnx(path: str | Path):
    """The ModelProto at `path`; a missing, truncated or non-ONNX file is a ModelFileError naming it."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise ModelFileError(f"model file {path} is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path} is not a readable ONNX model (truncated or corrupt file?): {type(exc).__name__}: {exc}") from None
    if not model.graph.node:
        raise ModelFileError(f"{path} holds no ONNX graph nodes (truncated or corrupt file?)")
    check_external_data(model, path)
    return model


def check_external_data(model, path: Path) -> None:
    """Refuse external-data locations that leave the model's folder (../, absolute paths, links out).

    A runtime would read whatever file such a location names; the model and its data must move together.
    """
    from onnx.external_data_helper import uses_external_data

    folder = path.resolve().parent
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or not (folder / location).resolve().is_relative_to(folder):
            raise ModelFileError(
                f"{path}: initializer {tensor.name!r} keeps its data at {location!r}, outside the model's folder "
                f"{folder}; refusing it (external data must sit next to the model file)")


def model_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in STANDARD_DOMAINS:
            return int(o.version)
    return 1


def iter_nodes(model) -> Iterator[Any]:
    """Every node, including those inside If/Loop/Scan bodies and model-local functions."""
    import onnx

    def walk(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node)
                for g in attr.graphs:
                    yield from walk(g.node)

    yield from walk(model.graph.node)
    for f in model.functions:
        yield from walk(f.node)


def _graphs(model) -> list[Any]:
    """The main graph and every If/Loop/Scan body inside it (one value namespace; functions have their own)."""
    import onnx

    out, todo = [], [model.graph]
    while todo:
        g = todo.pop()
        out.append(g)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    todo.append(attr.g)
                todo.extend(attr.graphs)
    return out


def rename_outputs(model, names: Mapping[str, str]) -> list[str]:
    """Rename graph outputs (old -> new) in place, everywhere the values are used. A value that already carries a
    new name (an exporter names internal values after ops and modules: `embedding`) is renamed away first, so the
    user's output names are kept exactly and never collide. Returns notes on what was renamed away."""
    graphs = _graphs(model)

    def every_name() -> set[str]:
        taken = set()
        for g in graphs:
            for n in g.node:
                taken.update(n.input)
                taken.update(n.output)
            taken.update(v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer))
        return taken

    def rename(old: str, new: str) -> None:
        for g in graphs:
            for n in g.node:
                for seq in (n.input, n.output):
                    for i, v in enumerate(seq):
                        if v == old:
                            seq[i] = new
            for v in (*g.input, *g.output, *g.value_info, *g.initializer):
                if v.name == old:
                    v.name = new

    notes = []
    for old, new in names.items():
        if old == new:
            continue
        taken = every_name()
        if new in taken:
            k, fresh = 0, f"{new}_internal"
            while fresh in taken:
                k += 1
                fresh = f"{new}_internal_{k}"
            rename(new, fresh)
            notes.append(f"an internal value named {new!r} was renamed {fresh!r} so the output keeps its name")
        rename(old, new)
    return notes


def node_label(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def graph_inputs(model) -> list[TensorMeta]:
    inits = {i.name for i in model.graph.initializer}
    metas = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        metas.append(TensorMeta(name=vi.name, shape=shape, dtype=np.dtype(ONNX_DTYPES.get(tt.elem_type, np.float32)).name))
    return metas


def onnx_precision(model) -> str:
    """'int8' for a quantized (QDQ/QOperator) model, else the float type of its weights."""
    if any(n.op_type in QUANT_OPS for n in iter_nodes(model)):
        return "int8"
    kinds = {i.data_type for i in model.graph.initializer}
    return "f16" if 10 in kinds and 1 not in kinds else "f32"


def make_feeds(inputs: list[TensorMeta], dims: dict[str, int] | None = None,
               samples: Mapping[str, np.ndarray] | np.ndarray | None = None, seed: int = 0,
               samples_hint: str = "") -> dict[str, np.ndarray]:
    """Feeds for every input: real `samples` where given ({input name: array}; one array is the first input's),
    random normal floats and zero integers for inputs without samples (smoke runs and benchmarks only: a gate
    feeds real samples to every input).

    A dynamic dimension takes its size from `dims` (1 when it is not there). Real samples are repeated along the
    batch axis to fill it, and cut to the asked size along other dynamic axes (a shorter sequence: every input
    that shares the axis is cut alike); their static dimensions must match the input's (a SpecError naming both
    shapes, with `samples_hint` saying which setting to compare, otherwise).
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    if samples is not None and not isinstance(samples, Mapping):
        samples = {inputs[0].name: samples}
    samples = samples or {}
    feeds = {}
    for m in inputs:
        shape = tuple(d if isinstance(d, int) else dims.get(d, 1) for d in m.shape)
        dt = np.dtype(m.dtype)
        a = samples.get(m.name)
        if a is not None:
            a = np.asarray(a)
            ok = a.ndim == len(shape) and all(isinstance(d, str) and a.shape[ax] >= shape[ax] or a.shape[ax] == shape[ax]
                                              for ax, d in enumerate(m.shape) if ax)
            if not ok:
                raise SpecError(
                    f"input {m.name!r} expects samples of shape {list(m.shape[1:])} (sizes {list(shape[1:])} here) "
                    f"but the data has {list(a.shape[1:])}" + (f" ({samples_hint})" if samples_hint else ""))
            a = a[(slice(None), *(slice(0, n) for n in shape[1:]))]
            reps = int(np.ceil(shape[0] / len(a)))
            feeds[m.name] = np.concatenate([a] * reps)[: shape[0]].astype(dt)
        elif np.issubdtype(dt, np.floating):
            feeds[m.name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[m.name] = np.zeros(shape, dtype=dt)
    return feeds


def sample_feeds(inputs: list[TensorMeta], seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of the given static shapes (dynamic dims as 1): for smoke runs and benchmarks."""
    return make_feeds(inputs, seed=seed)


# ---------------------------------------------------------------- output quantization step
# Ops that never widen a difference between two runs, in max-abs terms: moving or picking data, averaging,
# elementwise functions with slope <= 1. A step read upstream of them still bounds what a rounding step can do.
_NON_EXPANDING = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Dropout", "Slice",
    "Relu", "Clip", "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceMax",
    "ReduceMin", "Softmax", "Sigmoid", "Tanh",
})
_LINEAR_OPS = frozenset({"Gemm", "MatMul", "Conv"})


class OutputStep(BaseModel):
    """One quantization step of a graph output, read from the graph (never from the outputs it will judge).

    `step` None: the graph gives none (the output is computed in float from unquantized weights, or by an op
    that can widen a difference); `source` says what was read, or why nothing could be.
    """

    output: str
    step: float | None
    source: str


class _QDQGraph:
    """Producers and constant values of one graph, for reading quantization scales and weights."""

    def __init__(self, model):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.inits = {i.name: i for i in graph.initializer}
        self.opsets = {(o.domain or ""): int(o.version) for o in model.opset_import}
        # Tensors computed from constants alone (ONNX keeps nodes in topological order).
        self.constants = set(self.inits)
        for node in graph.node:
            if node.domain in STANDARD_DOMAINS and all(not i or i in self.constants for i in node.input):
                self.constants.update(node.output)
        self._values: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (an initializer, a Constant node, an op on constants), else None."""
        if name not in self.constants:
            return None
        if name not in self._values:
            from onnx import numpy_helper
            from onnx.reference import ReferenceEvaluator

            if name in self.inits:
                self._values[name] = numpy_helper.to_array(self.inits[name])
            else:
                node = self.producer[name]
                feeds = {i: self.value(i) for i in node.input if i}
                try:
                    outs = ReferenceEvaluator(node, opsets=self.opsets).run(None, feeds)
                    self._values[name] = np.asarray(outs[list(node.output).index(name)])
                except Exception:  # noqa: BLE001 - an op the reference cannot evaluate is simply not known
                    self._values[name] = None
        return self._values[name]

    def upstream(self, name: str) -> tuple[Any, list[str]]:
        """From `name` up through ops that cannot widen a difference: the first other node, and the ops passed."""
        passed: list[str] = []
        node = self.producer.get(name)
        while node is not None and node.domain in STANDARD_DOMAINS:
            if node.op_type in _NON_EXPANDING:
                data = node.input[0]
            elif node.op_type in ("Add", "Sub") and len(node.input) == 2 and \
                    sum(i in self.constants for i in node.input) == 1:
                data = next(i for i in node.input if i not in self.constants)  # a constant bias shifts both runs alike
            else:
                break
            passed.append(node.op_type)
            node = self.producer.get(data)
        return node, passed

    def dq_scale(self, node) -> float | None:
        """The (largest) scale of a DequantizeLinear node whose scale is constant."""
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            return None
        scale = self.value(node.input[1])
        return None if scale is None or scale.size == 0 else float(np.abs(scale).max())

    def int8_weights(self, name: str) -> np.ndarray | None:
        """The dequantized weights behind `name` when a DequantizeLinear of constants produces them."""
        node, _ = self.upstream(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return self.value(node.output[0])

    def weights(self, name: str) -> tuple[np.ndarray | None, str]:
        """The constant weights behind `name`: dequantized INT8 ones, else float constants (a weight the quantizer
        left in float, e.g. one computed in forward() from parameters, which the exporter folds); and which."""
        w = self.int8_weights(name)
        if w is not None:
            return w, "INT8"
        w = self.value(name)
        return (w, "float") if w is not None and np.issubdtype(w.dtype, np.floating) else (None, "")

    def linear_step(self, node) -> tuple[float | None, str]:
        """A float Gemm/MatMul/Conv on a quantized activation and constant weights (INT8 or float): the output's move
        when every quantized input is one step off, the activation's scale x the largest sum of |weight| over one
        output."""
        if len(node.input) < 2:
            return None, ""
        attrs = {a.name: _attribute(a) for a in node.attribute}
        a, b = node.input[0], node.input[1]
        (wa, kind_a), (wb, kind_b) = self.weights(a), self.weights(b)
        kind = kind_b or kind_a
        if wb is not None and wa is None:
            act, w = a, wb
            if node.op_type == "Conv":
                axes = tuple(range(1, w.ndim))  # (out channels, in channels / groups, kernel...)
            elif node.op_type == "Gemm":
                axes = (1,) if attrs.get("transB", 0) else (0,)
            else:
                axes = (w.ndim - 2,) if w.ndim >= 2 else (0,)
        elif wa is not None and wb is None and node.op_type in ("Gemm", "MatMul"):
            act, w = b, wa
            axes = ((0,) if attrs.get("transA", 0) else (1,)) if node.op_type == "Gemm" else (w.ndim - 1,)
        else:
            return None, ""
        src, passed = self.upstream(act)
        scale = self.dq_scale(src)
        if scale is None:
            return None, ""
        alpha = abs(float(attrs.get("alpha", 1.0))) if node.op_type == "Gemm" else 1.0
        l1 = float(np.abs(w.astype(np.float64)).sum(axis=axes).max()) * alpha
        via = f" through {', '.join(reversed(passed))}" if passed else ""
        return scale * l1, (f"{node.op_type} {node_label(node)!r} computes the output in float from {kind} weights: "
                            f"input step {scale:.4g} (scale of DequantizeLinear {node_label(src)!r}{via}) x the "
                            f"largest sum of |weights| over one output ({l1:.4g}), i.e. every quantized input one "
                            "step off")


def _attribute(attr):
    import onnx

    return onnx.helper.get_attribute_value(attr)


def output_step(model, output: str) -> OutputStep:
    """One quantization step of graph output `output` in a QDQ model, from the graph alone.

    - The output comes from a DequantizeLinear, directly or through ops that cannot widen a difference (Reshape,
      Relu, Softmax, a constant bias, ...): that DequantizeLinear's scale (the largest one, when per channel).
    - It comes from a Gemm/MatMul/Conv run in float on a quantized activation and constant weights, INT8 or float
      (a QAT export quantizes the head's inputs, not its output; a weight computed in forward() stays float): the
      activation's scale x the largest sum of |weights| over one output, how far an output moves when every
      quantized input is one step off. The accumulator's own step (activation scale x weight scale) is no
      tolerance unit: one rounding step of a single input already moves the output by up to 127 of those (the
      largest INT8 weight).
    - Otherwise no step (`step` None), and the reason.
    """
    g = _QDQGraph(model)
    if output not in g.producer:
        return OutputStep(output=output, step=None, source=f"output {output!r} is not produced by any node")
    node, passed = g.upstream(output)
    via = f" (through {', '.join(reversed(passed))})" if passed else ""
    scale = g.dq_scale(node)
    if scale is not None:
        return OutputStep(output=output, step=scale,
                          source=f"scale of the output's DequantizeLinear {node_label(node)!r}{via}")
    if node is not None and node.op_type in _LINEAR_OPS and node.domain in STANDARD_DOMAINS:
        step, why = g.linear_step(node)
        if step is not None:
            return OutputStep(output=output, step=step, source=why + via)
    what = f"{node.op_type} {node_label(node)!r}" if node is not None else "no node (a graph input or constant)"
    return OutputStep(output=output, step=None,
                      source=f"no quantization step in the graph for output {output!r}: it is computed in float by "
                             f"{what}{via} after the last quantized tensor")
