"""TensorRT backend (optional extra ``edgeq[tensorrt]``; needs an NVIDIA GPU).

Where TensorRT or a GPU is absent, ``availability`` says why and the matrix row reads
"unavailable: <reason>"; nothing here imports ``tensorrt`` at module level.

Deployable form: a serialized engine built from the ONNX file with one optimization profile
pinned to batch 1 (static1) or 1..8 (dynamic), precision flags from the target. Buffers live in
torch CUDA tensors (torch is already a dependency), so no extra CUDA Python package is needed.
This backend was written against the TensorRT 10 Python API and could not be exercised on the
CPU-only development machine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import numpy as np

from edgeq.backends.base import Backend, fix_batch
from edgeq.backends.records import PreparedModel, UnsupportedOp
from edgeq.backends.runner import Runner
from edgeq.core.errors import EdgeqError
from edgeq.core.onnx_graph import TensorMeta, graph_inputs, iter_nodes, load_onnx, node_label

# The TensorRT 10 ONNX parser reads opsets 9..20 (onnx-tensorrt's support matrix); a constant, so
# choosing the export opset never imports tensorrt.
_TRT_MAX_OPSET = 20
_DYNAMIC_MAX_BATCH = 8


def _gpu_reason() -> str:
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi"):
        return ""
    return "no NVIDIA GPU on this machine (no /dev/nvidia0, no nvidia-smi)"


class TensorRtRunner(Runner):
    def __init__(self, engine_path: str | Path, target):
        super().__init__(f"tensorrt[{target.name}]", target.name)
        self.path = Path(engine_path)
        self.batch = target.batch
        self.precision = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "int8"}[target.precision]
        self.engine = self.context = None

    def activate_impl(self) -> None:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.inputs = [TensorMeta(name=n, shape=[d if d >= 0 else "?" for d in self.engine.get_tensor_shape(n)],
                                  dtype=np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name) for n in ins]
        self.outputs = [n for n in names if n not in ins]
        self.threads = 1

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt
        import torch

        keep = []
        for name, arr in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(arr.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EdgeqError(f"{self.name}: TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def deactivate_impl(self) -> None:
        self.context = self.engine = None


class TensorRtBackend(Backend):
    name = "tensorrt"

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        reasons = []
        if device not in ("cuda", "gpu"):
            reasons.append(f"device {device!r}: TensorRT runs on an NVIDIA GPU (device: cuda)")
        if importlib.util.find_spec("tensorrt") is None:
            reasons.append("the tensorrt package is not installed (pip install 'edgeq[tensorrt]')")
        gpu = _gpu_reason()
        if gpu:
            reasons.append(gpu)
        if importlib.util.find_spec("torch") is not None and not reasons:
            import torch

            if not torch.cuda.is_available():
                reasons.append("torch sees no CUDA device (a CPU-only torch build, or no driver)")
        return (not reasons), "; ".join(reasons)

    def version(self) -> str:
        try:
            import tensorrt as trt
        except ImportError:
            return "tensorrt (not installed)"
        return f"tensorrt {trt.__version__}"

    def max_opset(self, target=None) -> int:
        return _TRT_MAX_OPSET

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        # Standard ops go to the ONNX parser, which names what it cannot take; custom domains need a plugin.
        return domain in ("", "ai.onnx")

    def prepare(self, model_path, target, out_dir, dims=None) -> PreparedModel:
        import tensorrt as trt

        proto = load_onnx(model_path)
        inputs = graph_inputs(proto)
        shapes, notes = fix_batch(inputs, target.batch, dims)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(model_path).read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EdgeqError("TensorRT's ONNX parser refused the model: " + " | ".join(errors)[:800])
        config = builder.create_builder_config()
        flag = {"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16, "int8": trt.BuilderFlag.INT8}
        if target.precision in flag:
            config.set_flag(flag[target.precision])
        profile = builder.create_optimization_profile()
        for m in inputs:
            shape = [d if isinstance(d, int) else 1 for d in shapes[m.name]]
            hi = list(shape)
            if target.batch == "dynamic" and not isinstance(shapes[m.name][0], int):
                hi[0] = _DYNAMIC_MAX_BATCH
            profile.set_shape(m.name, shape, shape, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise EdgeqError(f"TensorRT could not build an engine for target {target.name!r} (see the TensorRT log)")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{Path(model_path).stem}.{target.batch}.{target.precision}.engine"
        path.write_bytes(bytes(engine))
        return PreparedModel(backend=self.name, target=target.name, path=path, files={"engine": path},
                             inputs=[TensorMeta(name=m.name, shape=shapes[m.name], dtype=m.dtype) for m in inputs],
                             outputs=[o.name for o in proto.graph.output], layout=target.layout, batch=target.batch,
                             precision=target.precision, warnings=notes)

    def load_runner(self, prepared: PreparedModel, target) -> Runner:
        return TensorRtRunner(prepared.path, target)

    def compile_error_ops(self, message: str, model) -> list[UnsupportedOp]:
        ops = set(re.findall(r"No importer registered for op: (\w+)", message))
        return [UnsupportedOp(node=node_label(n), op_type=n.op_type, domain=n.domain, reason="no TensorRT importer")
                for n in iter_nodes(model) if n.op_type in ops]
