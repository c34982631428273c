"""ONNX graph helpers every layer shares (onnx and numpy only, no runtime): load, walk, describe, feed."""

from __future__ import annotations

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


def make_feeds(inputs: list[TensorMeta], dims: dict[str, int] | None = None, samples: np.ndarray | None = None,
               seed: int = 0, samples_hint: str = "") -> dict[str, np.ndarray]:
    """Feeds for every input: real `samples` for the first input, random normal floats, zero integers.

    A dynamic dimension takes its size from `dims` (1 when it is not there). `samples` are repeated along the
    batch axis to fill it; their other dimensions must match the input's (a SpecError naming both shapes,
    with `samples_hint` saying which setting to compare, otherwise).
    """
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds = {}
    for i, m in enumerate(inputs):
        shape = tuple(d if isinstance(d, int) else dims.get(d, 1) for d in m.shape)
        dt = np.dtype(m.dtype)
        if i == 0 and samples is not None:
            if samples.shape[1:] != shape[1:]:
                raise SpecError(
                    f"input {m.name!r} expects samples of shape {list(m.shape[1:])} "
                    f"but the data has {list(samples.shape[1:])}" + (f" ({samples_hint})" if samples_hint else ""))
            reps = int(np.ceil(shape[0] / len(samples)))
            feeds[m.name] = np.concatenate([samples] * reps)[: shape[0]].astype(dt)
        elif np.issubdtype(dt, np.floating):
            feeds[m.name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[m.name] = np.zeros(shape, dtype=dt)
    return feeds


def sample_feeds(inputs: list[TensorMeta], seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of the given static shapes (dynamic dims as 1): for smoke runs and benchmarks."""
    return make_feeds(inputs, seed=seed)
