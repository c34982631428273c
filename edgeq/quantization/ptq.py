"""Post-training static quantization to QDQ ONNX with ONNX Runtime's or NNCF's quantizer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import BaseModel

from edgeq.calibration.readers import CalibrationReader
from edgeq.core.errors import SpecError
from edgeq.core.quiet import import_nncf, muted_output
from edgeq.core.specs import InputSpec, Int8Types, PTQEngine, PTQMethod, QuantizationSpec

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

# The transformer profile: ONNX Runtime quantizes only the matrix products, these stay FP32 in both engines (plus the
# embedding Gathers, found per graph). Quantizing LayerNorm/Softmax/GELU/embedding lookups is what wrecks a
# transformer's accuracy under PTQ.
TRANSFORMER_OP_TYPES = ["MatMul", "Gemm"]
TRANSFORMER_FP32_OP_TYPES = ["LayerNormalization", "Softmax", "Gelu", "FastGelu", "BiasGelu", "Erf"]
# Activations ONNX Runtime's QDQ quantizer folds into the quantized op before them (its QDQRemovableActivation): with
# asymmetric (u8) activations it removes the Relu/Clip and quantizes that op's output with the activation's range,
# so one integer kernel feeds the next and the activation costs nothing (one rounding fewer, too). Left out, each one
# keeps DequantizeLinear -> float activation -> QuantizeLinear between two kernels: MobileNetV2 at 224x224 (ReLU6 is
# a Clip) ran at 1.0x FP32's speed on ONNX Runtime, and at 1.9x with them folded (AVX-512 VNNI CPU, batch 1).
# The quantizer folds only an activation whose input it quantizes.
FOLDED_ACTIVATIONS = ["Relu", "Clip"]
# fp32-depthwise: every depthwise convolution stays FP32 (a speed remedy: ONNX Runtime's x86 INT8 depthwise kernels can
# lose to its float ones, and a mobile net's depthwise layers then cost more in INT8 than they save)
Profile = Literal["default", "transformer", "fp32-depthwise"]


def as_batch(x: Mapping[str, np.ndarray] | np.ndarray, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """A Batch ({input name: array}) of model input: a mapping as it is (every input must be there), or one array as
    the only input (cast to its declared dtype) of a one-input model."""
    names = [i.name for i in inputs]
    if isinstance(x, Mapping):
        missing = [n for n in names if n not in x]
        if missing:
            raise SpecError(f"data has no samples for model input(s) {missing} (it holds {sorted(x)})")
        return {n: np.asarray(x[n]) for n in names}
    if len(inputs) != 1:
        raise SpecError(f"one array of samples given, but the model has inputs {names}: give {{input name: array}}")
    return {names[0]: np.asarray(x).astype(inputs[0].dtype, copy=False)}


class PTQSettings(BaseModel):
    """One PTQ attempt.

    The config's `quantization` section (`spec`) fixes what every attempt shares: per-channel weights, the op types
    to quantize and the op types kept in FP32. The run resolves `types` and `reduce_range` for the deployment target.
    The escalation varies the rest from attempt to attempt.
    """

    spec: QuantizationSpec
    types: Int8Types
    reduce_range: bool  # 7-bit weights (x86 CPUs without VNNI)
    engine: PTQEngine
    method: PTQMethod
    keep_fp32_nodes: list[str]
    # transformer: ORT quantizes MatMul/Gemm only and NNCF runs with model_type TRANSFORMER (SmoothQuant); both keep
    # LayerNormalization, Softmax, GELU/Erf and the embedding Gathers in FP32
    profile: Profile = "default"
    # NNCF's SmoothQuant alpha for MatMul in the transformer profile (None: NNCF's default, 0.95): how much of the
    # activations' outlier range moves into the weights before both are quantized
    smooth_quant_alpha: float | None = None

    @classmethod
    def from_spec(cls, spec: QuantizationSpec | None = None, types: Int8Types = "u8s8",
                  reduce_range: bool = False) -> PTQSettings:
        """The first attempt: the config's choices (default: `QuantizationSpec()`'s) with the run's resolved
        `types` and `reduce_range`."""
        spec = spec or QuantizationSpec()
        return cls(spec=spec, types=types, reduce_range=reduce_range, engine=spec.engine, method=spec.method,
                   keep_fp32_nodes=list(spec.keep_fp32_nodes))

    def record(self) -> dict[str, Any]:
        """The attempt's settings as its report row keeps them."""
        rec = {"engine": self.engine, "method": self.method, "types": self.types, "reduce_range": self.reduce_range,
               "per_channel": self.spec.per_channel, "op_types": list(self.op_types),
               "keep_fp32_nodes": list(self.keep_fp32_nodes), "keep_fp32_op_types": list(self.fp32_op_types)}
        if self.folded_activations:
            rec["folded_activations"] = self.folded_activations
        if self.profile != "default":
            rec["profile"] = self.profile
            if self.engine == "nncf":
                rec["model_type"] = "transformer"
                if self.smooth_quant_alpha is not None:
                    rec["smooth_quant_alpha"] = self.smooth_quant_alpha
        return rec

    @property
    def op_types(self) -> list[str]:
        """The op types ONNX Runtime quantizes (the transformer profile: the matrix products only)."""
        if self.profile == "transformer":
            return [t for t in TRANSFORMER_OP_TYPES if t in self.spec.op_types] or list(TRANSFORMER_OP_TYPES)
        return list(self.spec.op_types)

    @property
    def folded_activations(self) -> list[str]:
        """The activations ONNX Runtime's quantizer folds into the op before them (`FOLDED_ACTIVATIONS`): with u8
        activations, outside the transformer profile (which quantizes matrix products only), unless kept FP32."""
        if self.engine != "onnxruntime" or self.types != "u8s8" or self.profile == "transformer":
            return []
        return [t for t in FOLDED_ACTIVATIONS if t not in self.op_types and t not in self.fp32_op_types]

    @property
    def fp32_op_types(self) -> list[str]:
        extra = TRANSFORMER_FP32_OP_TYPES if self.profile == "transformer" else []
        return list(dict.fromkeys([*self.spec.keep_fp32_op_types, *extra]))

    def label(self) -> str:
        extra = f", fp32: {', '.join(self.keep_fp32_nodes)}" if self.keep_fp32_nodes else ""
        if self.profile == "fp32-depthwise":
            extra = f", depthwise convs FP32{extra}"
        if self.engine == "nncf":
            if self.profile == "transformer":
                alpha = "" if self.smooth_quant_alpha is None else f" alpha {self.smooth_quant_alpha}"
                return f"nncf PTQ transformer (model_type TRANSFORMER, SmoothQuant{alpha}){extra}"
            return f"nncf PTQ (bias correction){extra}"
        rr = " reduce-range" if self.reduce_range else ""
        per = " per-channel" if self.spec.per_channel else " per-tensor"
        kind = "ort PTQ transformer (MatMul/Gemm only; LayerNorm, Softmax, GELU, embeddings FP32)" \
            if self.profile == "transformer" else "ort PTQ"
        return f"{kind} {self.method} {self.types}{rr}{per}{extra}"


def check_calibration_shapes(model_path: Path, data: CalibrationReader) -> None:
    """Every input's calibration samples must fit that model input (batch of 1)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for input_name, samples in data.inputs.items():
        inp = next((i for i in model.graph.input if i.name == input_name), None)
        if inp is None:
            raise SpecError(f"model has no input {input_name!r} for calibration data")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        want = dims[1:]
        got = list(samples.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise SpecError(
                f"calibration samples have shape {got} per sample but model input {input_name!r} expects "
                f"{['?' if w is None else w for w in want]}: the calibration version was built for another model "
                "or preprocessing"
            )


def node_names(model_path: Path) -> set[str]:
    return {n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node}


def _check_excludes(model_path: Path, settings: PTQSettings) -> None:
    names = node_names(model_path)
    missing = [n for n in settings.keep_fp32_nodes if n not in names]
    if missing:
        close = sorted(names)[:8]
        raise SpecError(
            f"layer(s) to keep in FP32 not found in the model: {', '.join(missing)} "
            f"(node names look like: {', '.join(close)})"
        )


def preprocess_model(src: Path, dst: Path, notes: list[str] | None = None) -> Path:
    """ONNX Runtime's quantization pre-processing (shape inference + graph optimisation): 3x faster INT8 here.

    Its symbolic shape inference fails on typical transformer graphs (dynamic sequence axes through Reshape/Expand,
    attention masks); the pre-processing then runs with ``skip_symbolic_shape=True`` (ONNX's own shape inference
    only), and `notes` records that it did.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with muted_output():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:  # noqa: BLE001 - symbolic shape inference's failures come as any exception type
        first = " ".join(str(exc).split())[:200]
        with muted_output():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        if notes is not None:
            notes.append(f"quant_pre_process: symbolic shape inference failed ({type(exc).__name__}: {first}); "
                         "pre-processed with skip_symbolic_shape=True")
    return dst


def attention_nodes(model_path: Path | onnx.ModelProto) -> list[str]:
    """Nodes that make a graph an attention model: a MatMul of two computed tensors (neither a weight nor a
    constant: query x key, scores x value), or a Softmax feeding a MatMul. Empty for CNNs and MLPs (a classifier's
    final Softmax feeds no MatMul)."""
    model = model_path if isinstance(model_path, onnx.ModelProto) else onnx.load(str(model_path),
                                                                                 load_external_data=False)
    graph = model.graph
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    # a weight reached through a cast / dequantize / transpose / reshape of a constant is still a weight
    for n in graph.node:
        if n.op_type in ("Cast", "DequantizeLinear", "Transpose", "Reshape", "Identity") and n.input \
                and n.input[0] in constant:
            constant.update(n.output)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for n in graph.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and not (set(n.input) & constant):
            found.append(n.name or n.output[0])
        elif n.op_type == "Softmax" and any(c.op_type == "MatMul" for c in consumers.get(n.output[0], [])):
            found.append(n.name or n.output[0])
    return found


def depthwise_convs(model: onnx.ModelProto) -> list[str]:
    """Conv nodes whose every input channel has a filter of its own (group == input channels > 1), by their weight:
    one input channel per group (shape [C_out, 1, kh, kw])."""
    weights = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in weights:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if group > 1 and len(weights[n.input[1]].dims) >= 2 and weights[n.input[1]].dims[1] == 1:
            out.append(n.name)
    return out


def profile_fp32_nodes(model: onnx.ModelProto, profile: Profile) -> list[str]:
    """The nodes a profile keeps in FP32, for either engine: the transformer profile's embedding Gathers, the
    fp32-depthwise profile's depthwise convolutions; none for the default."""
    if profile == "transformer":
        return embedding_gathers(model)
    if profile == "fp32-depthwise":
        return depthwise_convs(model)
    return []


def embedding_gathers(model: onnx.ModelProto) -> list[str]:
    """Gathers that look a table up by index (data is a 2-D weight): an embedding, kept FP32 by the transformer
    profile."""
    weights = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Gather" and n.input and n.input[0] in weights and len(weights[n.input[0]].dims) == 2]


def quantize_onnxruntime(src: Path, dst: Path, data: CalibrationReader, s: PTQSettings,
                         notes: list[str] | None = None) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act = QuantType.QUInt8 if s.types == "u8s8" else QuantType.QInt8
    model = onnx.load(str(src), load_external_data=False)
    excluded = (set(s.keep_fp32_nodes) | {n.name for n in model.graph.node if n.op_type in s.fp32_op_types}
                | set(profile_fp32_nodes(model, s.profile)))
    data.rewind()  # quantize_static reads from where get_next() stands; an earlier attempt left it at the end
    with muted_output():  # the calibrators print progress
        quantize_static(
            str(src), str(dst), data,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=s.op_types + s.folded_activations,
            per_channel=s.spec.per_channel,
            activation_type=act, weight_type=QuantType.QInt8, nodes_to_exclude=sorted(excluded),
            reduce_range=s.reduce_range,
            calibrate_method=getattr(CalibrationMethod, _METHODS[s.method]),
            extra_options={"ActivationSymmetric": s.types == "s8s8", "WeightSymmetric": True},
        )
    return dst


def quantize_nncf(src: Path, dst: Path, data: CalibrationReader, s: PTQSettings,
                  notes: list[str] | None = None) -> Path:
    nncf = import_nncf()  # seconds to import, and only this engine needs it
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    model = onnx.load(str(src))
    ignored = None
    names = list(s.keep_fp32_nodes) + profile_fp32_nodes(model, s.profile)
    if names or s.fp32_op_types:
        ignored = nncf.IgnoredScope(names=names, types=s.fp32_op_types, validate=False)
    smooth = {} if s.smooth_quant_alpha is None else {
        "smooth_quant_alphas": AdvancedSmoothQuantParameters(matmul=s.smooth_quant_alpha)}
    with muted_output(stderr=True):
        q = nncf.quantize(model, data.as_nncf_dataset(), subset_size=len(data), ignored_scope=ignored,
                          preset=nncf.QuantizationPreset.MIXED if s.types == "u8s8" else nncf.QuantizationPreset.PERFORMANCE,
                          model_type=nncf.ModelType.TRANSFORMER if s.profile == "transformer" else None,
                          # NNCF's answer to the same saturation: half the weight range on every layer, not only the first
                          advanced_parameters=AdvancedQuantizationParameters(
                              overflow_fix=OverflowFix.ENABLE if s.reduce_range else OverflowFix.FIRST_LAYER, **smooth))
    moved = hoist_transposes_above_qdq(q)
    if moved and notes is not None:
        notes.append(f"moved {moved} Transpose/Reshape node(s) from after a per-tensor DequantizeLinear to before "
                     "its QuantizeLinear (ONNX Runtime's QDQ transpose optimizer fails on them at opset >= 21)")
    onnx.save(q, str(dst))
    return dst


_LAYOUT_OPS = ("Transpose", "Reshape")  # a per-tensor quantization commutes with moving or regrouping the values


def _topological(graph) -> None:
    """Re-order the graph's nodes so every node follows the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a missing input: leave the order as it was
            return
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def hoist_transposes_above_qdq(model: onnx.ModelProto) -> int:
    """Rewrite ``x -> Q -> DQ -> Transpose|Reshape`` as ``x -> Transpose|Reshape -> Q -> DQ`` where the quantization
    is per tensor and each link has one consumer, until nothing moves; returns how many were moved.

    The same values either way (a per-tensor Q/DQ commutes with a transpose or a reshape). NNCF places the Q/DQ of
    attention's projections before the `view` (Reshape) and Transpose that split the heads; ONNX Runtime 1.32's
    transpose optimizer then rewrites such a pair at opset >= 21 into a QuantizeLinear whose `output_dtype`
    contradicts its zero point ("Node (view_q) ... output_dtype INT8 does not match y_zero_point type UINT8"), and
    every session on the model fails to load.

    Shapes recorded in ``value_info`` for the tensors the rewrite re-shapes are dropped, so the result passes
    ``onnx.checker.check_model(full_check=True)``.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    moved = 0
    while True:
        consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        producer = {o: n for n in graph.node for o in n.output}
        step = 0
        for t in list(graph.node):
            if t.op_type not in _LAYOUT_OPS or not t.input:
                continue
            dq = producer.get(t.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or len(consumers.get(dq.output[0], [])) != 1:
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
                continue
            scale = inits.get(q.input[1]) if len(q.input) > 1 else None
            dq_scale = inits.get(dq.input[1]) if len(dq.input) > 1 else None
            if (scale is None or dq_scale is None or int(np.prod(scale.dims)) != 1 or int(np.prod(dq_scale.dims)) != 1
                    or {dq.output[0], q.output[0]} & outputs):
                continue
            x, y = q.input[0], t.output[0]
            mid = f"{y}__pre_qdq"
            # the quantized tensor takes the moved node's output shape and the old dequantized tensor is gone: a
            # shape recorded for either (by shape inference before the rewrite) would now contradict the graph
            stale = {q.output[0], dq.output[0]}
            kept = [v for v in graph.value_info if v.name not in stale]
            del graph.value_info[:]
            graph.value_info.extend(kept)
            t.input[0], t.output[0] = x, mid
            q.input[0] = mid
            dq.output[0] = y
            step += 1
            break  # the maps are stale now: rebuild them
        if not step:
            break
        moved += step
        _topological(graph)
    return moved


def quantize(src: Path, dst: Path, data: CalibrationReader, settings: PTQSettings,
             notes: list[str] | None = None) -> Path:
    """One PTQ attempt: pre-process, quantize with `data` as the calibration samples, write `dst` (a QDQ ONNX model).

    `data` feeds every model input. `notes` (when given) receives what the run had to work around (a pre-processing
    fallback, a graph rewrite), for the attempt's record."""
    check_calibration_shapes(src, data)
    _check_excludes(src, settings)
    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess_model(src, Path(tmp) / "pre.onnx", notes)
        _check_excludes(pre, settings)
        fn = quantize_nncf if settings.engine == "nncf" else quantize_onnxruntime
        out = fn(pre, Path(tmp) / "q.onnx", data, settings, notes)
        onnx.checker.check_model(str(out), full_check=True)
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        Path(out).replace(dst)
    return dst
