"""Post-training static quantization to QDQ ONNX with ONNX Runtime's or NNCF's quantizer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel

from edgeq.calibration.readers import CalibrationReader
from edgeq.core.errors import SpecError
from edgeq.core.quiet import muted_output
from edgeq.core.specs import Int8Types, PTQEngine, PTQMethod, QuantizationSpec

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


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
        return {"engine": self.engine, "method": self.method, "types": self.types, "reduce_range": self.reduce_range,
                "per_channel": self.spec.per_channel, "op_types": list(self.spec.op_types),
                "keep_fp32_nodes": list(self.keep_fp32_nodes), "keep_fp32_op_types": list(self.spec.keep_fp32_op_types)}

    def label(self) -> str:
        extra = f", fp32: {', '.join(self.keep_fp32_nodes)}" if self.keep_fp32_nodes else ""
        if self.engine == "nncf":
            return f"nncf PTQ (bias correction){extra}"
        rr = " reduce-range" if self.reduce_range else ""
        per = " per-channel" if self.spec.per_channel else " per-tensor"
        return f"ort PTQ {self.method} {self.types}{rr}{per}{extra}"


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


def preprocess_model(src: Path, dst: Path) -> Path:
    """ONNX Runtime's quantization pre-processing (shape inference + graph optimisation): 3x faster INT8 here."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with muted_output():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    return dst


def quantize_onnxruntime(src: Path, dst: Path, data: CalibrationReader, s: PTQSettings) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act = QuantType.QUInt8 if s.types == "u8s8" else QuantType.QInt8
    model = onnx.load(str(src), load_external_data=False)
    excluded = set(s.keep_fp32_nodes) | {n.name for n in model.graph.node if n.op_type in s.spec.keep_fp32_op_types}
    data.rewind()  # quantize_static reads from where get_next() stands; an earlier attempt left it at the end
    with muted_output():  # the calibrators print progress
        quantize_static(
            str(src), str(dst), data,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(s.spec.op_types), per_channel=s.spec.per_channel,
            activation_type=act, weight_type=QuantType.QInt8, nodes_to_exclude=sorted(excluded),
            reduce_range=s.reduce_range,
            calibrate_method=getattr(CalibrationMethod, _METHODS[s.method]),
            extra_options={"ActivationSymmetric": s.types == "s8s8", "WeightSymmetric": True},
        )
    return dst


def quantize_nncf(src: Path, dst: Path, data: CalibrationReader, s: PTQSettings) -> Path:
    import nncf  # seconds to import, and only this engine needs it
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    model = onnx.load(str(src))
    ignored = None
    if s.keep_fp32_nodes or s.spec.keep_fp32_op_types:
        ignored = nncf.IgnoredScope(names=list(s.keep_fp32_nodes), types=list(s.spec.keep_fp32_op_types),
                                    validate=False)
    with muted_output(stderr=True):
        q = nncf.quantize(model, data.as_nncf_dataset(), subset_size=len(data), ignored_scope=ignored,
                          preset=nncf.QuantizationPreset.MIXED if s.types == "u8s8" else nncf.QuantizationPreset.PERFORMANCE,
                          # NNCF's answer to the same saturation: half the weight range on every layer, not only the first
                          advanced_parameters=AdvancedQuantizationParameters(
                              overflow_fix=OverflowFix.ENABLE if s.reduce_range else OverflowFix.FIRST_LAYER))
    onnx.save(q, str(dst))
    return dst


def quantize(src: Path, dst: Path, data: CalibrationReader, settings: PTQSettings) -> Path:
    """One PTQ attempt: pre-process, quantize with `data` as the calibration samples, write `dst` (a QDQ ONNX model)."""
    check_calibration_shapes(src, data)
    _check_excludes(src, settings)
    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess_model(src, Path(tmp) / "pre.onnx")
        _check_excludes(pre, settings)
        fn = quantize_nncf if settings.engine == "nncf" else quantize_onnxruntime
        out = fn(pre, Path(tmp) / "q.onnx", data, settings)
        onnx.checker.check_model(str(out))
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        Path(out).replace(dst)
    return dst
