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
import threading
from pathlib import Path

import numpy as np

from edgeq.backends.base import Backend, fix_batch, x86_cpu_scheme
from edgeq.backends.records import Int8Scheme, PreparedModel, UnsupportedOp
from edgeq.backends.runner import Runner
from edgeq.core.onnx_graph import TensorMeta, graph_inputs, iter_nodes, load_onnx, node_label, onnx_precision

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
            return x86_cpu_scheme("OpenVINO CPU")
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
