"""OpenVINO backend: CPU (GPU/NPU when present).

Deployable form: the ONNX model read by OpenVINO's ONNX frontend, reshaped to static batch=1
(unless the target asks ``batch: dynamic``), the target's layout set through OpenVINO's
pre/post-processing API, saved as IR (xml/bin) with FP32 weights kept (``save_model``
compresses weights to FP16 unless told not to).

Precision is pinned: on CPUs with bf16 support OpenVINO's CPU plugin runs an "FP32" model in
bf16 unless ``INFERENCE_PRECISION_HINT`` is set, and it quietly runs an ``f16`` hint as bf16
where the CPU has no fp16 arithmetic. The runner reports the compiled model's own
``INFERENCE_PRECISION_HINT`` property: the precision that actually ran.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgeq.backends.base import Backend, KernelRow, dequantized_inputs, fix_batch, kernel_counts, x86_cpu_scheme
from edgeq.backends.records import Int8Scheme, PreparedModel, UnsupportedOp
from edgeq.backends.runner import Runner
from edgeq.core.onnx_graph import (
    TensorMeta,
    graph_inputs,
    iter_nodes,
    load_onnx,
    node_label,
    onnx_precision,
    sample_feeds,
)

# target precision -> OpenVINO inference precision hint. An int8 target runs a quantized model: its
# quantized layers run int8 from the model itself; the hint pins everything else to f32.
PRECISION_HINT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}


def _core():
    import openvino as ov

    return ov.Core()


def _compile_config(target) -> dict[str, str]:
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINT[target.precision], "PERFORMANCE_HINT": "LATENCY"}
    if target.threads:
        config["INFERENCE_NUM_THREADS"] = str(target.threads)
    return config


# Two threads preparing models at once (Prefect's thread runner fanning out over models x targets) deadlocked
# inside OpenVINO: one in PrePostProcessor.build(), the other in Output.get_partial_shape(). Model editing is
# serialized per process; compiling and inference are not.
_PREPARE_LOCK = threading.Lock()

# The CPU plugin's layer types that do a Conv/MatMul/Gemm's arithmetic; every other layer is summed as "other".
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INTEGER_PRECISIONS = ("u8", "i8")


def _rt(info, key: str) -> str:
    return info[key].astype(str) if key in info else ""


def _onnx_name(layer: str) -> str:
    """The ONNX node a runtime layer came from: OpenVINO's low-precision passes name fused layers
    `<node>/DequantizationMultiply` (or ...Subtract)."""
    return re.sub(r"/Dequantization\w*$", "", layer)


def profile_layers(path: str | Path, target, feeds: dict | None, runs: int = 20, budget_s: float = 2.0
                   ) -> list[tuple[str, str, str, str, float]]:
    """(name, layer type, runtime precision, kernel, median ms per inference) of every layer OpenVINO runs for the
    model at `path` (an IR or ONNX file), compiled as the runner compiles it plus PERF_COUNT."""
    core = _core()
    compiled = core.compile_model(core.read_model(str(path)), target.device.upper(),
                                  {**_compile_config(target), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    if feeds is None:
        feeds = sample_feeds([TensorMeta(name=p.get_any_name(), shape=[d.get_length() if d.is_static else 1
                                                                        for d in p.get_partial_shape()],
                                         dtype=np.dtype(p.get_element_type().to_dtype()).name)
                              for p in compiled.inputs])
    for _ in range(3):
        request.infer(feeds)
    times: dict[str, list[float]] = {}
    done, t0 = 0, time.perf_counter()
    while done < runs and (done < 3 or time.perf_counter() - t0 < budget_s):
        request.infer(feeds)
        for info in request.profiling_info:
            times.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e3)
        done += 1
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info, name = op.get_rt_info(), op.get_friendly_name()
        layers.append((name, _rt(info, "layerType"), _rt(info, "runtimePrecision"), _rt(info, "primitiveType"),
                       float(np.median(times[name])) if name in times else 0.0))
    return layers


def classify_layers(int8_layers, fp32_layers, quantized_nodes: set[str], runtime: str, target: str
                    ) -> list[KernelRow]:
    """Rows per compute layer type: layers running u8/i8 against f32 ones, the kernels and their time, beside the
    FP32 model's same layer type; then one row for every other layer. An f32 layer whose ONNX node reads a
    DequantizeLinear (`quantized_nodes`) was quantized in the model and is named; one that did not was kept FP32."""
    rows: dict[str, KernelRow] = {}
    kernels: dict[str, list[str]] = {}
    other = KernelRow(runtime=runtime, target=target, op_type="other layers", int8_ms=0.0)
    for name, kind, precision, kernel, ms in int8_layers:
        if kind in ("Parameter", "Result", "Const", "Constant", "Input", "Output"):
            continue
        if kind not in COMPUTE_LAYERS:
            other.integer += precision in INTEGER_PRECISIONS
            other.float_unquantized += precision not in INTEGER_PRECISIONS
            other.int8_ms += ms
            continue
        row = rows.setdefault(kind, KernelRow(runtime=runtime, target=target, op_type=kind, int8_ms=0.0))
        kernels.setdefault(kind, []).append(f"{kernel} ({precision})")
        row.int8_ms += ms
        if precision in INTEGER_PRECISIONS:
            row.integer += 1
        elif _onnx_name(name) in quantized_nodes:
            row.float_quantized += 1
            row.unfused.append(f"{name} ({precision})")
        else:
            row.float_unquantized += 1
    for kind, row in rows.items():
        row.kernels = kernel_counts(kernels[kind])
    if fp32_layers is not None:
        fp32_kernels: dict[str, list[str]] = {}
        other.fp32_ms = 0.0
        for _name, kind, precision, kernel, ms in fp32_layers:
            if kind in ("Parameter", "Result", "Const", "Constant", "Input", "Output"):
                continue
            row = rows.get(kind) if kind in COMPUTE_LAYERS else other
            if row is None:
                row = rows.setdefault(kind, KernelRow(runtime=runtime, target=target, op_type=kind))
            row.fp32_ms = (row.fp32_ms or 0.0) + ms
            if kind in COMPUTE_LAYERS:
                fp32_kernels.setdefault(kind, []).append(f"{kernel} ({precision})")
        for kind, names in fp32_kernels.items():
            rows[kind].fp32_kernels = kernel_counts(names)
    other.note = "every other layer (reorders, eltwise, normalisation, Q/DQ folded into them)"
    return sorted(rows.values(), key=lambda r: r.op_type) + [other]


class OpenVinoRunner(Runner):
    """A compiled OpenVINO model (IR or ONNX file) with one infer request."""

    def __init__(self, path: str | Path, target):
        super().__init__(f"openvino[{target.name}]", target.name)
        self.path = Path(path)
        self.device = target.device.upper()
        self.config = _compile_config(target)
        self.batch = target.batch
        self.compiled = self.request = None

    def activate_impl(self) -> None:
        core = _core()
        self.compiled = core.compile_model(core.read_model(str(self.path)), self.device, self.config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [
            TensorMeta(name=p.get_any_name(),
                       shape=[d.get_length() if d.is_static else "?" for d in p.get_partial_shape()],
                       dtype=np.dtype(p.get_element_type().to_dtype()).name)
            for p in self.compiled.inputs]
        self.outputs = [p.get_any_name() for p in self.compiled.outputs]
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer(feeds)
        # copy: the request reuses its output buffers on the next call
        return {name: np.array(res[port]) for name, port in zip(self.outputs, self.compiled.outputs)}

    def deactivate_impl(self) -> None:
        self.request = self.compiled = None


class OpenVinoBackend(Backend):
    name = "openvino"
    default_device_stage = True
    native_ptq_engine = "nncf"

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as exc:
            return False, f"openvino is not installed ({exc})"
        devices = ov.Core().available_devices
        if not any(d.split(".")[0] == device.upper() for d in devices):
            return False, f"OpenVINO device {device.upper()} not present (available: {', '.join(devices)})"
        return True, ""

    def version(self) -> str:
        import openvino as ov

        return f"openvino {ov.__version__}"

    def int8_scheme(self, target) -> Int8Scheme:
        if target.device == "cpu":
            return x86_cpu_scheme("OpenVINO CPU", target.cpu_isa)
        return super().int8_scheme(target)

    def max_opset(self, target=None) -> int:
        # The OpenVINO 2025/2026 ONNX frontend reads opsets up to 22 (its documented support range).
        return 22

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        # Standard domain ops and ONNX Runtime's contrib domain are what the ONNX frontend translates;
        # an unknown op shows up as a conversion failure in the compile check.
        return domain in ("", "ai.onnx", "com.microsoft", "org.openvinotoolkit")

    # -- deployable form ---------------------------------------------------
    def prepare(self, model_path, target, out_dir, dims=None) -> PreparedModel:
        """Read, reshape (static batch=1), set layout with PrePostProcessor, save IR with FP32 weights."""
        proto = load_onnx(model_path)  # a clear error for a corrupt file before OpenVINO's frontends guess
        with _PREPARE_LOCK:
            return self._prepare(proto, model_path, target, out_dir, dims)

    def _prepare(self, proto, model_path, target, out_dir, dims) -> PreparedModel:
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        inputs = graph_inputs(proto)
        shapes, notes = fix_batch(inputs, target.batch, dims)
        model = _core().read_model(str(model_path))
        model.reshape({model.input(name): ov.PartialShape([ov.Dimension(d) if isinstance(d, int) else ov.Dimension()
                                                           for d in shape])
                       for name, shape in shapes.items()})
        four_d = [m.name for m in inputs if len(m.shape) == 4]
        if four_d:
            ppp = PrePostProcessor(model)
            for name in four_d:
                ppp.input(name).model().set_layout(ov.Layout("NCHW"))
                ppp.input(name).tensor().set_layout(ov.Layout(target.layout))
            model = ppp.build()
        elif target.layout != "NCHW":
            notes.append(f"layout {target.layout} ignored: the model has no 4-D input")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        xml = out / f"{Path(model_path).stem}.{target.batch}.{target.layout}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        metas = [TensorMeta(name=p.get_any_name(),
                            shape=[d.get_length() if d.is_static else "?" for d in p.get_partial_shape()],
                            dtype=np.dtype(p.get_element_type().to_dtype()).name) for p in model.inputs]
        if onnx_precision(proto) == "int8":
            notes.append("quantized layers run int8 as the model says; the precision hint covers the rest")
        return PreparedModel(backend=self.name, target=target.name, path=xml,
                             files={"ir_xml": xml, "ir_bin": xml.with_suffix(".bin")}, inputs=metas,
                             outputs=[p.get_any_name() for p in model.outputs], layout=target.layout,
                             batch=target.batch, precision=PRECISION_HINT[target.precision], warnings=notes)

    def load_runner(self, prepared: PreparedModel, target) -> Runner:
        return OpenVinoRunner(prepared.path, target)

    def explain_int8(self, model_path, target, fp32_path=None, feeds=None) -> list[KernelRow]:
        """Compile the deployable form as the runner does (precision hint pinned) with PERF_COUNT, run it a few times,
        and read each layer's runtime precision (`runtimePrecision`), kernel (`primitiveType`) and time from the
        runtime model; the FP32 model's layers (`fp32_path`) are timed alike for comparison."""
        quantized = {name for name, dq in dequantized_inputs(load_onnx(model_path).graph).items() if dq}
        tmp = Path(tempfile.mkdtemp(prefix="edgeq-explain-ov-"))
        try:
            int8 = profile_layers(self.prepare(model_path, target, tmp / "int8").path, target, feeds)
            fp32 = (profile_layers(self.prepare(fp32_path, target, tmp / "fp32").path, target, feeds)
                    if fp32_path is not None else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return classify_layers(int8, fp32, quantized, self.name, target.name)

    def precision_mismatch(self, target, ran: str) -> str:
        asked = PRECISION_HINT[target.precision]
        if ran and ran != asked:
            return (f"target {target.name!r} asked {target.precision} (INFERENCE_PRECISION_HINT={asked}) but OpenVINO "
                    f"{target.device.upper()} compiled it as {ran}: this device has no {asked} arithmetic; "
                    f"set precision to one it runs (e.g. fp32)")
        return ""

    def error_summary(self, message: str) -> str:
        m = re.search(r"(Model wasn't fully converted\..*)", message)
        return m.group(1) if m else message

    def compile_error_ops(self, message: str, model) -> list[UnsupportedOp]:
        m = re.search(r"No conversion rule found for operations:\s*(.+?)(?:\s--|$)", message)
        if not m:
            return []
        names = {re.sub(r"-\d+$", "", n.strip()).rsplit(".", 1)[-1] for n in m.group(1).split(",")}
        return [UnsupportedOp(node=node_label(n), op_type=n.op_type, domain=n.domain,
                              reason="OpenVINO's ONNX frontend has no conversion rule for it")
                for n in iter_nodes(model) if n.op_type in names]
