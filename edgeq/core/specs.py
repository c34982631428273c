"""Typed specs loaded from a YAML config: model, targets, data, thresholds.

Relative paths in a config are resolved against the config file's folder, so a
config and its files move together.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgeq.core.errors import SpecError

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _resolve(v: Path | None, info: ValidationInfo) -> Path | None:
    if v is None:
        return None
    base = (info.context or {}).get("base_dir")
    v = Path(v).expanduser()
    if not v.is_absolute() and base is not None:
        v = Path(base) / v
    return v


def _import_path(v: str) -> str:
    if not _IMPORT_PATH.match(v):
        raise ValueError(f"{v!r} is not an import path of the form 'package.module:function'")
    return v


RelPath = Annotated[Path, AfterValidator(_resolve)]
ImportPath = Annotated[str, AfterValidator(_import_path)]


def load_object(path: str) -> Any:
    """Import `package.module:attr` (runs that module's code: only configs you trust)."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise SpecError(f"cannot import {module_name!r} (from {path!r}): {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{module_name!r} has no attribute {part!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocess(Spec):
    """What the model sees: x = (raw * scale - mean) / std, per channel when lists."""

    scale: float = 1.0
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0


class InputSpec(Spec):
    """One named model input; a string dimension is dynamic and named (`batch`, `seq`)."""

    name: str
    shape: list[int | str] = Field(description="e.g. [batch, 1, 8, 8]; names mark dynamic axes")
    dtype: Literal["float32", "float16", "int64", "int32", "uint8", "bool"] = "float32"
    preprocess: Preprocess | None = Field(
        None, description="this input's preprocessing (a float input only); default: data.preprocess for float "
                          "inputs. Integer and bool inputs (token ids, masks) are never preprocessed")

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int | str]) -> list[int | str]:
        for d in v:
            if isinstance(d, int) and d <= 0:
                raise ValueError(f"static dimensions must be positive, got {d}")
            if isinstance(d, str) and not d.isidentifier():
                raise ValueError(f"dynamic dimension name {d!r} must be an identifier like 'batch'")
        return v

    @model_validator(mode="after")
    def _preprocess_floats_only(self) -> "InputSpec":
        if self.preprocess is not None and not self.is_float:
            raise ValueError(f"input {self.name!r} is {self.dtype}: only float inputs are preprocessed (token ids and "
                             "masks are fed as they are); remove its 'preprocess'")
        return self

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float32", "float16")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class ModelSpec(Spec):
    name: str = Field(description="model name, used in bundle and report names")
    factory: ImportPath = Field(description="'package.module:function' returning a torch.nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    weights: RelPath = Field(description="safetensors file, or a state_dict saved with torch.save")
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)
    example_dims: dict[str, int] = Field(
        default_factory=lambda: {"batch": 2},
        description="sizes of the dynamic dimensions in the export example",
    )
    metric: str = Field("top1", description="'top1', 'cosine' (to the FP32 outputs), 'retrieval' (overlap of the 10 "
                                            "nearest neighbours, FP32 vs INT8), or 'package.module:function'")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto",
        description="auto: torch.export-based exporter at opset >= 18, TorchScript exporter below",
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v in ("top1", "cosine", "retrieval"):
            return v
        return _import_path(v)

    @model_validator(mode="after")
    def _names(self) -> "ModelSpec":
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be unique, got {names}")
        for inp in self.inputs:
            for d in inp.dynamic_axes.values():
                if d not in self.example_dims:
                    raise ValueError(
                        f"input {inp.name!r} has dynamic dimension {d!r} with no size in example_dims"
                    )
        return self


class TargetSpec(Spec):
    # A file and folder name in the bundle (its compiled form, its own INT8 model) and part of task run names.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="letters, digits, '.', '_' and '-' (it names the target's files in the bundle)")
    backend: str = Field(description="onnxruntime, openvino, tensorrt, or declared")
    device: str = "cpu"
    max_opset: int | None = Field(None, ge=7, description="default: what the installed runtime supports")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    batch: Literal["static1", "dynamic"] = "static1"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    required: bool = Field(True, description="a required target that cannot compile stops the pipeline")
    profile: RelPath | None = Field(None, description="target profile YAML (declared targets)")
    command: list[str] | None = Field(
        None, description="backend 'command': a program run as COMMAND MODEL INPUTS.npz OUTPUTS.npz (a remote device)")
    threads: int | None = Field(None, ge=1, description="inference threads; default: every CPU this process may use")
    provider: Literal["cpu", "directml", "cuda", "tensorrt", "openvino", "qnn", "coreml"] | None = Field(
        None, description="onnxruntime targets: the execution provider (CPU, DirectML, CUDA, TensorRT, OpenVINO, QNN, "
                          "CoreML); it is the target's device")
    cpu_isa: list[str] | None = Field(
        None, description="CPU targets: the ISA flags of the CPU the model ships to, as /proc/cpuinfo names them (e.g. "
                          "[avx2, fma] or [avx512f, avx512_vnni]), when that is not this machine's; an x86 CPU without "
                          "VNNI/AMX gets 7-bit weights (reduce_range). Default: this machine's CPU")

    @model_validator(mode="before")
    @classmethod
    def _provider_is_the_device(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("provider") is not None:
            provider = str(data["provider"]).lower()
            if data.get("backend") != "onnxruntime":
                raise ValueError(f"'provider' is for onnxruntime targets (an ONNX Runtime execution provider); "
                                 f"target {data.get('name')!r} has backend {data.get('backend')!r}")
            if data.get("device", "cpu") not in ("cpu", provider):
                raise ValueError(f"target {data.get('name')!r} sets provider {provider!r} and device "
                                 f"{data['device']!r}: the provider is the device, set one of them")
            data = {**data, "provider": provider, "device": provider}
        return data


class SplitSource(Spec):
    """Where one data split comes from."""

    kind: Literal["arrays", "image_folder", "loader"]
    path: RelPath | None = Field(
        None, description="arrays: .npz with one array per model input name (a one-input model may call it x) and "
                          "optional labels y, or a one-input .npy; image_folder: the folder (one-input models)")
    labels: RelPath | None = Field(None, description="image_folder: CSV/Parquet with columns path,label")
    loader: ImportPath | None = Field(
        None, description="loader: function returning (inputs, labels): inputs a dict {input name: array} (one "
                          "array for a one-input model), labels an array or None")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    preprocessed: bool = Field(
        False, description="the samples are the model's input already (data.preprocess applied): used as they are, "
                           "and taken back through data.preprocess to compare them with raw captures")

    @model_validator(mode="after")
    def _complete(self) -> "SplitSource":
        if self.kind in ("arrays", "image_folder") and self.path is None:
            raise ValueError(f"kind {self.kind!r} needs 'path'")
        if self.kind == "image_folder" and self.labels is None:
            raise ValueError("kind 'image_folder' needs 'labels' (a table with columns path,label)")
        if self.kind == "loader" and self.loader is None:
            raise ValueError("kind 'loader' needs 'loader' ('package.module:function')")
        return self


class CaptureSpec(Spec):
    """Production captures for the calibration flow."""

    path: RelPath = Field(description="folder of images, or an .npz/.npy array file")
    metadata: RelPath = Field(description="CSV or Parquet, one row per capture")
    strata: list[str] = Field(default_factory=list, description="metadata columns to stratify on")
    expected_strata: dict[str, list[str]] = Field(
        default_factory=dict,
        description="values each stratum column should have; values with no usable capture are reported missing",
    )
    id_column: str = Field("capture_id", description="metadata column naming each capture (default: its path)")
    path_column: str = Field("path", description="image folder: metadata column with each file's relative path")
    index_column: str = Field("index", description="array file: metadata column with each row's array index")
    augmented_column: str | None = Field("augmented", description="metadata column flagging augmented rows")
    target_size: int = Field(1024, ge=1, description="samples to select (all usable ones when the pool is smaller)")
    min_size: int = Field(256, ge=1, description="fewer usable samples fail the flow unless overridden")
    min_size_override: str | None = Field(
        None, description="reason for accepting fewer than min_size samples (recorded in the version)"
    )
    seed: int = Field(0, description="seed of the stratified sample")


class DataSpec(Spec):
    validation: SplitSource = Field(description="chooses among quantization attempts")
    test: SplitSource = Field(description="held out: parity and final validation only")
    train: SplitSource | None = Field(None, description="training split (QAT, leakage checks)")
    captures: CaptureSpec | None = None
    train_manifest: RelPath | None = Field(None, description="pixel hashes (column sha256) of the training set")
    test_manifest: RelPath | None = Field(None, description="pixel hashes (column sha256) of the test set")
    preprocess: Preprocess = Preprocess()


class Thresholds(Spec):
    export_atol: float = Field(1e-5, gt=0, description="PyTorch vs ONNX FP32: max abs diff, plus export_rtol's part")
    export_rtol: float = Field(
        1e-5, ge=0, description="PyTorch vs ONNX FP32: the tolerance's part relative to the outputs' scale, per "
                                "output: this x the largest |PyTorch output| on the parity samples (float32 rounding "
                                "grows with the values and differs by CPU kernel); 0 leaves export_atol alone")
    parity_samples: int = Field(32, ge=10, le=100, description="real samples in the parity gate")
    int8_max_drop: float = Field(0.01, ge=0, description="INT8 metric may drop at most this much (0.01 = 1 point)")
    device_quant_steps: float = Field(
        3.0, gt=0, description="device vs ONNX INT8: outputs within this many quantization steps of the output, the "
                               "step read from the INT8 graph (the scale of the DequantizeLinear that produces it)")
    device_min_agreement: float = Field(
        0.99, ge=0, le=1, description="device vs ONNX INT8: top-1 agreement on the confident samples (ONNX INT8 top-1 "
                                      "margin above the tolerance)")
    device_min_cosine: float = Field(
        0.999, gt=0, le=1, description="device vs ONNX INT8, an output that is not a classifier's and has no output "
                                       "step in the INT8 graph (a float head after the last quantized tensor: "
                                       "LayerNorm, pooling, L2 normalisation): every sample's cosine similarity "
                                       "must reach this")
    int8_atol_floor: float = Field(
        1e-3, gt=0, description="device agreement and the QAT export check: the least tolerance, in output units; the "
                                "whole tolerance where the INT8 graph gives no output quantization step (an output "
                                "computed in float from unquantized weights after the last quantized tensor)")
    probe_atol: float = Field(
        1e-4, gt=0, description="dynamic-shape probe, PyTorch vs ONNX at other sizes: max abs diff (never below "
                                "each output's parity tolerance); it looks for baked-in shapes, float noise is the "
                                "parity gate's job")
    qat_parity_steps: float = Field(
        3.0, gt=0, description="QAT export check, ONNX Runtime vs the QAT model in PyTorch: tolerance in quantization "
                               "steps of the output, read from the exported graph")
    int8_min_speedup: float = Field(
        1.0, ge=0, description="speed gate: the chosen INT8 model must run at least this many times faster than FP32 "
                               "on the deployment target (batch 1, side by side, median of quantization.speed_rounds "
                               "alternating rounds), or it does not ship; 0 turns the gate off. Not checked where the "
                               "deployment target cannot be timed on this machine")
    qat_min_agreement: float = Field(
        0.99, ge=0, le=1, description="QAT export check: top-1 agreement on the confident samples (PyTorch top-1 "
                                      "margin above the tolerance)")


# Typed once: the config's PTQ choices here, and each attempt's values in edgeq.quantization.ptq.PTQSettings.
PTQEngine = Literal["onnxruntime", "nncf"]
PTQMethod = Literal["minmax", "entropy", "percentile"]
Int8Types = Literal["u8s8", "s8s8"]  # activations/weights


class QuantizationSpec(Spec):
    """How to reach INT8. Defaults follow what was measured on x86 CPUs, not the libraries' defaults."""

    mode: Literal["auto", "ptq", "qat"] = Field("auto", description="auto: policy, then escalation until the SLA holds")
    engine: PTQEngine = Field("onnxruntime", description="first PTQ engine (auto tries both)")
    calibration: str = Field("latest", description="approved calibration version id, or 'latest' approved")
    method: PTQMethod = "minmax"
    per_channel: bool = Field(True, description="per-channel weights (per-tensor costs far more accuracy)")
    types: Literal["auto", Int8Types] = Field(
        "auto", description="activation/weight types; auto chooses per deployment target, reason recorded")
    reduce_range: bool | None = Field(
        None, description="7-bit weights against U8S8 saturation on x86 CPUs without VNNI; default: decided from "
                          "the deployment target and this CPU, reason recorded")
    op_types: list[str] = Field(
        default_factory=lambda: ["Conv", "ConvTranspose", "MatMul", "Gemm"],
        description="op types to quantize (quantizing LayerNorm/Gather/Add wrecked transformer accuracy)")
    keep_fp32_nodes: list[str] = Field(default_factory=list, description="node names kept in FP32")
    keep_fp32_op_types: list[str] = Field(default_factory=list, description="op types kept in FP32")
    sla: Literal["flexible", "fixed"] = Field("flexible", description="fixed: a production SLA, QAT regardless")
    deploy_target: str | None = Field(None, description="target whose latency must improve (default: first)")
    max_sensitive_fp32: int = Field(3, ge=0, description="escalation keeps at most this many layers in FP32")
    qat_epochs: int = Field(3, ge=1)
    qat_lr: float = Field(1e-4, gt=0)
    qat_loss: ImportPath | None = Field(None, description="loss function import path (default cross-entropy)")
    latency_iters: int = Field(100, ge=10, description="timed batch-1 runs per attempt and runtime")
    speed_rounds: int = Field(5, ge=1, description="the speed verdict times FP32 and the chosen INT8 model side by "
                                                   "side on the deployment target in this many alternating rounds")
    target_forms: Literal["shared", "fastest"] = Field(
        "shared", description="shared: every target gets the deployment target's INT8 model. fastest: every other "
                              "target timed here may get another attempt that meets the SLA (its runtime's own "
                              "quantizer is tried: NNCF for OpenVINO) when it runs more than 5 % faster there, side "
                              "by side; each such form is validated four-way on that target and published for it")
    target_engines: dict[str, PTQEngine] = Field(
        default_factory=dict, description="target name -> PTQ engine whose model that target gets (the chosen "
                                          "attempt's settings made by this engine; it must meet the SLA), e.g. "
                                          "{openvino-cpu: nncf}; validated four-way on that target")


class ValidationSpec(Spec):
    device_target: str | None = Field(
        None, description="target whose runner is the on-device INT8 stage (default: the first openvino target)")
    require_independent_device: bool = Field(
        True, description="refuse a device target that would run the INT8 model on the runtime and device of the "
                          "ONNX INT8 row (ONNX Runtime on this CPU): that comparison checks nothing. false: convert "
                          "anyway; the device agreement gate is reported as not run and does not block publishing")
    latency_iters: int = Field(100, ge=10, description="timed batch-1 runs per runtime in the report")


class TrainingSpec(Spec):
    """The user's training entrypoint, called by the `retrain_to_deploy` flow."""

    entrypoint: ImportPath = Field(
        "edgeq.demo:train_digits_demo",
        description="'package.module:function' called as fn(config=EdgeqConfig, **kwargs); returns a "
                    "torch.nn.Module or a state_dict (name -> tensor)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the entrypoint")
    weights_name: str | None = Field(
        None, description="file name of the new weights in the store (default: <model name>.safetensors)")


class EdgeqConfig(Spec):
    name: str
    prepare: ImportPath | None = Field(None, description="called once before a run (builds the demo)")
    prepare_kwargs: dict[str, Any] = Field(default_factory=dict)
    store: str = Field(".edgeq/store", description="artifact store: local folder or fsspec URL")
    model: ModelSpec
    targets: list[TargetSpec] = Field(min_length=1)
    data: DataSpec
    thresholds: Thresholds = Thresholds()
    quantization: QuantizationSpec = QuantizationSpec()
    validation: ValidationSpec = ValidationSpec()
    training: TrainingSpec | None = Field(None, description="retraining entrypoint (default: the demo trainer)")
    base_dir: Path = Field(Path("."), exclude=True, description="folder of the config file")

    @model_validator(mode="after")
    def _unique_targets(self) -> "EdgeqConfig":
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique, got {names}")
        pinned = self.quantization.target_engines
        unknown = sorted(set(pinned) - set(names))
        if unknown:
            raise ValueError(f"quantization.target_engines names {unknown}, which are not targets ({', '.join(names)})")
        deploy = self.quantization.deploy_target or names[0]
        if deploy in pinned:
            raise ValueError(f"quantization.target_engines pins the deployment target {deploy!r}: its model is the "
                             "one the ladder chooses; set quantization.engine to start the ladder with that engine")
        return self

    @property
    def store_url(self) -> str:
        if "://" in self.store:
            return self.store
        p = Path(self.store).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the config:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and nesting)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path) -> EdgeqConfig:
    """Load and validate a YAML config; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a YAML mapping (model:, targets:, data:, ...), got {type(data).__name__}")
    base = path.resolve().parent
    try:
        return EdgeqConfig.model_validate({**data, "base_dir": base}, context={"base_dir": base})
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, str(path))) from None
