"""ONNX Runtime backend: CPU execution provider; CUDA/TensorRT execution providers when present.

Session creation is the compile check. The deployable form is the ONNX file with its dynamic
dimensions fixed (static batch=1 unless the target asks ``batch: dynamic``) and ONNX Runtime's
optimized model saved next to it; the runner runs the optimized file.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeq.backends.base import Backend, fix_batch, x86_cpu_scheme
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
)
from edgeq.core.ort import ort_session

# Highest opset each ONNX Runtime release implements (ONNX Runtime's compatibility table).
_ORT_MAX_OPSET = {(1, 20): 21, (1, 21): 22, (1, 22): 22, (1, 23): 23}
_PROVIDERS = {"cpu": ["CPUExecutionProvider"],
              "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
              "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


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

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return False, f"onnxruntime is not installed ({exc})"
        if device == "cpu":
            return True, ""
        want = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(device)
        if want is None:
            return False, f"unknown device {device!r} for onnxruntime (cpu, cuda, tensorrt)"
        if want not in ort.get_available_providers():
            return False, f"{want} is not in this onnxruntime build ({', '.join(ort.get_available_providers())})"
        return True, ""

    def version(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

    def int8_scheme(self, target) -> Int8Scheme:
        if target.device == "cpu":
            return x86_cpu_scheme("ONNX Runtime")
        return Int8Scheme(types="s8s8", reason=f"ONNX Runtime on {target.device}: GPU INT8 kernels take symmetric "
                                               "signed activations and weights")

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
