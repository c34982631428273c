"""ONNX Runtime backend: CPU execution provider; the CUDA, TensorRT, DirectML, OpenVINO, QNN and CoreML execution
providers where the installed onnxruntime build has them (a target's `provider`, or `device`).

Session creation is the compile check. The deployable form is the ONNX file with its dynamic
dimensions fixed (static batch=1 unless the target asks ``batch: dynamic``) and ONNX Runtime's
optimized model saved next to it; the runner runs the optimized file.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeq.backends.base import Backend, KernelRow, dequantized_inputs, fix_batch, kernel_counts, x86_cpu_scheme
from edgeq.backends.records import Int8Scheme, PreparedModel, UnsupportedOp
from edgeq.backends.runner import Runner, default_threads
from edgeq.core.errors import EdgeqError
from edgeq.core.onnx_graph import (
    ORT_DTYPES,
    TensorMeta,
    graph_inputs,
    iter_nodes,
    load_onnx,
    node_label,
    onnx_precision,
    sample_feeds,
)
from edgeq.core.ort import ort_session, session_options

# Highest opset each ONNX Runtime release implements (ONNX Runtime's compatibility table).
_ORT_MAX_OPSET = {(1, 20): 21, (1, 21): 22, (1, 22): 22, (1, 23): 23}
# device (a target's `device`, or its `provider`) -> the execution providers a session asks for, in order
_PROVIDERS = {"cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
              "directml": ["DmlExecutionProvider", "CPUExecutionProvider"],
              "openvino": ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
              "qnn": ["QNNExecutionProvider", "CPUExecutionProvider"],
              "coreml": ["CoreMLExecutionProvider", "CPUExecutionProvider"]}
# Where each provider comes from: the wheel or build that holds it (ONNX Runtime's install docs).
_PROVIDER_SOURCE = {
    "cuda": "an NVIDIA GPU with CUDA 12 and `pip install onnxruntime-gpu` (in place of onnxruntime)",
    "tensorrt": "an NVIDIA GPU with CUDA and TensorRT libraries and `pip install onnxruntime-gpu`",
    "directml": "Windows 10/11 with a DirectX 12 GPU and `pip install onnxruntime-directml` (in place of onnxruntime)",
    "openvino": "an Intel CPU/GPU/NPU and `pip install onnxruntime-openvino` (in place of onnxruntime)",
    "qnn": "Windows on Snapdragon (Qualcomm NPU) and `pip install onnxruntime-qnn` (in place of onnxruntime)",
    "coreml": "macOS or iOS: the onnxruntime wheel for macOS holds CoreMLExecutionProvider",
}


@lru_cache(maxsize=1)
def _cpu_kernels() -> frozenset[tuple[str, str]]:
    from onnxruntime.capi import _pybind_state as C

    return frozenset(
        (("" if k.domain == "ai.onnx" else k.domain), k.op_name)
        for k in C.get_all_opkernel_def()
        if k.provider == "CPUExecutionProvider"
    )


@lru_cache(maxsize=256)
def _graph_level_op(op_type: str) -> bool:
    """Standard ops ONNX Runtime handles without a kernel: Constant (folded), and ops ONNX defines as functions."""
    import onnx

    if op_type == "Constant":
        return True
    try:
        schema = onnx.defs.get_schema(op_type)
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


# ONNX Runtime 1.32 CPU kernels that compute a Conv/MatMul/Gemm in integers (ONNX and com.microsoft domains), and the
# op each one stands for. MatMulNBits keeps activations in float (weight-only).
INTEGER_KERNELS = {
    "QLinearConv": "Conv", "ConvInteger": "Conv",
    "QLinearMatMul": "MatMul", "MatMulInteger": "MatMul", "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul", "MatMulInteger16": "MatMul",
    "QGemm": "Gemm", "QAttention": "Attention", "DynamicQuantizeLSTM": "LSTM",
}
# Float kernels (after ONNX Runtime's fusions and NCHWc layout) and the op each one stands for.
FLOAT_KERNELS = {
    "Conv": "Conv", "FusedConv": "Conv", "ConvTranspose": "ConvTranspose",
    "MatMul": "MatMul", "FusedMatMul": "MatMul", "MatMulNBits": "MatMul",
    "Gemm": "Gemm", "FusedGemm": "Gemm", "Attention": "Attention", "LSTM": "LSTM",
}


def _original_name(name: str) -> str:
    """ONNX Runtime's layout transforms rename a node `<name>_token_<n>`."""
    return re.sub(r"(_token_\d+)+$", "", name)


def _op_of(node, orig_type: dict[str, str]) -> str | None:
    """The model op a runtime node computes (Conv, MatMul, Gemm...), None for a node that is not one."""
    if node.op_type not in INTEGER_KERNELS and node.op_type not in FLOAT_KERNELS:
        return None
    name = node_label(node)
    op = orig_type.get(_original_name(name)) or orig_type.get(name)
    if op is None or op in ("QuantizeLinear", "DequantizeLinear"):
        op = INTEGER_KERNELS.get(node.op_type) or FLOAT_KERNELS[node.op_type]
    return op


def _kernel_name(node) -> str:
    return (f"{node.domain}." if node.domain not in ("", "ai.onnx", "com.microsoft") else "") + node.op_type


def classify_optimized_graph(optimized, original, runtime: str, target: str, times: dict[str, float] | None = None,
                             fp32: tuple | None = None) -> list[KernelRow]:
    """Rows per op type from ONNX Runtime's optimized graph (`optimized`) of an INT8 model (`original`).

    An integer kernel counts under the op it replaced; a float Conv/MatMul/Gemm fed by a DequantizeLinear is a
    quantized node ONNX Runtime did not fuse (it dequantizes, then runs the float kernel); one with no
    DequantizeLinear input was kept in float by the quantizer. Then a row for the QuantizeLinear/DequantizeLinear
    nodes left between kernels (each a float<->int8 conversion) and one for every other node. `times`: ms per
    node name (ONNX Runtime's profiler); `fp32`: (optimized graph, original graph, times) of the FP32 model, whose
    kernels and times go beside each row."""
    orig_type = {node_label(n): n.op_type for n in original.graph.node}
    dq_in = dequantized_inputs(optimized.graph)
    timed = times is not None
    times = times or {}
    rows: dict[str, KernelRow] = {}
    kernels: dict[str, list[str]] = {}
    conversions = KernelRow(runtime=runtime, target=target, op_type="QuantizeLinear/DequantizeLinear",
                            int8_ms=0.0 if timed else None,
                            note="float<->int8 conversions left between kernels (each one a pass over the tensor)")
    other = KernelRow(runtime=runtime, target=target, op_type="other nodes", int8_ms=0.0 if timed else None,
                      note="every other node (elementwise, pooling, layout, normalisation)")
    conv_kinds: list[str] = []
    for n in optimized.graph.node:
        name = node_label(n)
        ms = times.get(name, 0.0)
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            conv_kinds.append(n.op_type)
            if timed:
                conversions.int8_ms += ms
            continue
        op = _op_of(n, orig_type)
        if op is None:
            other.float_unquantized += 1
            if timed:
                other.int8_ms += ms
            continue
        base = _original_name(name)
        row = rows.setdefault(op, KernelRow(runtime=runtime, target=target, op_type=op, int8_ms=0.0 if timed else None))
        kernels.setdefault(op, []).append(_kernel_name(n))
        if timed:
            row.int8_ms += ms
        if n.op_type in INTEGER_KERNELS:
            row.integer += 1
        elif n.op_type == "MatMulNBits":
            row.float_quantized += 1
            row.unfused.append(f"{base} (MatMulNBits: weight-only, float activations)")
        elif dq_in.get(name):
            row.float_quantized += 1
            row.unfused.append(base)
        else:
            row.float_unquantized += 1
    for op, row in rows.items():
        row.kernels = kernel_counts(kernels[op])
    conversions.kernels = kernel_counts(conv_kinds)
    out = sorted(rows.values(), key=lambda r: r.op_type)
    if conv_kinds:
        out.append(conversions)
    if timed:
        out.append(other)
    if fp32 is not None:
        f_opt, f_orig, f_times = fp32
        f_type = {node_label(n): n.op_type for n in f_orig.graph.node}
        f_kernels: dict[str, list[str]] = {}
        other.fp32_ms = 0.0
        for n in f_opt.graph.node:
            op, ms = _op_of(n, f_type), f_times.get(node_label(n), 0.0)
            row = other if op is None else rows.get(op)
            if row is None:
                row = rows[op] = KernelRow(runtime=runtime, target=target, op_type=op)
                out.insert(0, row)
            row.fp32_ms = (row.fp32_ms or 0.0) + ms
            if op is not None:
                f_kernels.setdefault(op, []).append(_kernel_name(n))
        for op, names in f_kernels.items():
            rows[op].fp32_kernels = kernel_counts(names)
    return out


def profile_nodes(path: Path, target, providers: list[str], feeds: dict | None, optimized: Path, prefix: Path,
                  runs: int = 20, budget_s: float = 2.0) -> dict[str, float]:
    """Median ms per node of the model at `path` run as the runner runs it (graph optimization "all"), from ONNX
    Runtime's profiler; the optimized graph is written to `optimized`."""
    import json
    import time

    import onnxruntime as ort

    so = session_options(threads=target.threads or default_threads(), optimization="all",
                         optimized_model_path=optimized, log_severity=4)
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(path), so, providers=providers)
    if feeds is None:
        feeds = sample_feeds([TensorMeta(name=i.name, shape=[d if isinstance(d, int) else 1 for d in i.shape],
                                         dtype=ORT_DTYPES.get(i.type, "float32")) for i in session.get_inputs()])
    for _ in range(3):
        session.run(None, feeds)
    done, t0 = 0, time.perf_counter()
    while done < runs and (done < 3 or time.perf_counter() - t0 < budget_s):
        session.run(None, feeds)
        done += 1
    with open(session.end_profiling()) as f:
        events = json.load(f)
    per_node: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e3)
    # the last `done` runs: the warm-up runs are profiled too
    return {name: float(np.median(d[-done:])) for name, d in per_node.items()}


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session on one ONNX file."""

    def __init__(self, path: str | Path, target, providers: list[str] | None = None):
        super().__init__(f"onnxruntime[{target.name}]", target.name)
        self.path = Path(path)
        self.providers = providers or _PROVIDERS.get(target.device, ["CPUExecutionProvider"])
        self.threads = target.threads or default_threads()
        self.batch = target.batch
        self.session = None

    def activate_impl(self) -> None:
        self.session = ort_session(self.path, providers=self.providers, threads=self.threads)
        self.inputs = [TensorMeta(name=i.name, shape=[d if isinstance(d, int) else (d or "?") for d in i.shape],
                                  dtype=ORT_DTYPES.get(i.type, "float32")) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.precision = onnx_precision(load_onnx(self.path))

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))

    def deactivate_impl(self) -> None:
        self.session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    ships_compiled_form = False  # the bundle's INT8 ONNX model is what it runs
    native_ptq_engine = "onnxruntime"

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime is not installed ({exc})"
        if device == "cpu":
            return True, ""
        if device not in _PROVIDERS:
            return False, f"unknown device {device!r} for onnxruntime ({', '.join(_PROVIDERS)})"
        want = _PROVIDERS[device][0]
        if want not in ort.get_available_providers():
            return False, (f"{want} is not in this onnxruntime build (it has "
                           f"{', '.join(ort.get_available_providers())}); it needs {_PROVIDER_SOURCE[device]}")
        return True, ""

    def version(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

    def int8_scheme(self, target) -> Int8Scheme:
        if target.device == "cpu":
            return x86_cpu_scheme("ONNX Runtime", target.cpu_isa)
        if target.device == "openvino":
            return x86_cpu_scheme("ONNX Runtime's OpenVINO provider", target.cpu_isa)
        if target.device in ("cuda", "tensorrt"):
            return Int8Scheme(types="s8s8", reason=f"ONNX Runtime on {target.device}: GPU INT8 kernels take "
                                                   "symmetric signed activations and weights")
        return Int8Scheme(types="u8s8", reason=f"ONNX Runtime's {target.device} provider: QDQ with unsigned "
                                               "activations and signed weights, ONNX Runtime's default; not measured "
                                               "here (set quantization.types to override)")

    def no_compiled_form_reason(self, target) -> str:
        return "ships the INT8 ONNX model itself"

    def runs_reference_runtime(self, target) -> bool:
        return target.device == "cpu"  # the CPU provider is what the ONNX rows run on; CUDA/TensorRT providers differ

    def max_opset(self, target=None) -> int:
        import onnxruntime as ort

        major, minor = (int(p) for p in ort.__version__.split(".")[:2])
        known = [v for (ma, mi), v in _ORT_MAX_OPSET.items() if (ma, mi) <= (major, minor)]
        return max(known) if known else 21

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        domain = "" if domain == "ai.onnx" else domain
        if (domain, op_type) in _cpu_kernels():
            return True
        return domain == "" and _graph_level_op(op_type)

    # -- deployable form ---------------------------------------------------
    def prepare(self, model_path, target, out_dir, dims=None) -> PreparedModel:
        """Fix dynamic dims (batch=1 for static1), then save ONNX Runtime's optimized model."""
        import onnx
        from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

        model = load_onnx(model_path)
        inputs = graph_inputs(model)
        if target.precision in ("fp16", "bf16"):
            raise EdgeqError(
                f"target {target.name!r}: ONNX Runtime's CPU provider runs the model in the precision of its tensors "
                f"({onnx_precision(model)} here), not {target.precision}: convert the model to {target.precision} "
                "first, or use the openvino backend, or set precision: fp32")
        if target.layout == "NHWC" and any(len(m.shape) == 4 for m in inputs):
            raise EdgeqError(
                f"target {target.name!r} asks layout NHWC, but ONNX Runtime runs the model's own NCHW inputs "
                "(no pre-processing API): use layout: NCHW, or the openvino backend (which inserts the layout change)")
        shapes, notes = fix_batch(inputs, target.batch, dims)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(model_path).stem
        for name, shape in shapes.items():
            if all(isinstance(d, int) for d in shape):
                make_input_shape_fixed(model.graph, name, shape)
        static = out / f"{stem}.{target.batch}.onnx"
        onnx.save(model, str(static))
        optimized = out / f"{stem}.ort.onnx"
        providers = _PROVIDERS.get(target.device, ["CPUExecutionProvider"])
        threads = target.threads or default_threads()
        if target.device != "cpu":
            notes += self._fallback_note(static, providers, threads)
        # Session creation is the compile; "extended" keeps the saved file portable across CPUs.
        ort_session(static, providers=providers, threads=threads, optimization="extended", optimized_model_path=optimized)
        return PreparedModel(
            backend=self.name, target=target.name, path=optimized, files={"onnx": static, "ort_optimized": optimized},
            inputs=[TensorMeta(name=m.name, shape=shapes[m.name], dtype=m.dtype) for m in inputs],
            outputs=[o.name for o in model.graph.output], layout=target.layout, batch=target.batch,
            precision=onnx_precision(model), warnings=notes)

    def explain_int8(self, model_path, target, fp32_path=None, feeds=None) -> list[KernelRow]:
        """Read the graph ONNX Runtime runs: the deployable form `prepare` writes, loaded at the runner's graph
        optimization level ("all", ONNX Runtime's default) with `optimized_model_filepath` set; classify each
        Conv/MatMul/Gemm (`classify_optimized_graph`) and time every node with ONNX Runtime's profiler, beside the
        FP32 model's (`fp32_path`) run alike."""
        providers = _PROVIDERS.get(target.device, ["CPUExecutionProvider"])
        tmp = Path(tempfile.mkdtemp(prefix="edgeq-explain-ort-"))
        try:
            def run(path, role):
                prepared = self.prepare(path, target, tmp / role)
                optimized = tmp / role / "runtime.onnx"
                times = profile_nodes(prepared.path, target, providers, feeds, optimized, tmp / role / "profile")
                return load_onnx(optimized), load_onnx(path), times

            opt, orig, times = run(model_path, "int8")
            fp32 = run(fp32_path, "fp32") if fp32_path is not None else None
            return classify_optimized_graph(opt, orig, self.name, target.name, times, fp32)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fallback_note(self, path: Path, providers: list[str], threads: int) -> list[str]:
        """Nodes the accelerator provider cannot take run on the CPU: say so."""
        try:
            ort_session(path, providers=providers, threads=threads, config={"session.disable_cpu_ep_fallback": "1"})
        except Exception as exc:  # noqa: BLE001 - the message names the nodes that fall back
            return [f"some nodes fall back to CPUExecutionProvider on {providers[0]}: {' '.join(str(exc).split())[:400]}"]
        return []

    def load_runner(self, prepared: PreparedModel, target) -> Runner:
        return OnnxRuntimeRunner(prepared.path, target)

    def error_summary(self, message: str) -> str:
        return re.sub(r"Load model from \S+ failed:\s*", "", message)

    def compile_error_ops(self, message: str, model) -> list[UnsupportedOp]:
        ops = set(re.findall(r"(?:[\w.]+:)?(\w+)\(-?\d+\) is not a registered function/op", message))
        ops |= set(re.findall(r"No Op registered for (\w+)", message))
        ops |= set(re.findall(r"Could not find an implementation for (\w+)\(", message))
        return [UnsupportedOp(node=node_label(n), op_type=n.op_type, domain=n.domain,
                              reason="onnxruntime has no kernel for it") for n in iter_nodes(model) if n.op_type in ops]
