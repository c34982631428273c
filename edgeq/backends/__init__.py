"""Runtime backends behind one contract, found by name; each SDK is imported only when used.

Public API for other stages::

    from edgeq.backends import get_backend, benchmark
    backend = get_backend(target.backend)
    with backend.runner(onnx_path, target) as r:      # an edgeq.backends.runner.Runner
        out = r.infer({"image": x})                   # {output name: np.ndarray}
        lat = benchmark(r, warmup=10, iters=100)     # LatencyReport(median_ms, p90_ms, threads, precision)
    report = backend.check_compiles(onnx_path, target)  # CompileReport (one matrix row)
"""

from __future__ import annotations

import importlib

from edgeq.backends.base import Backend
from edgeq.backends.records import CompileReport, LatencyReport
from edgeq.backends.runner import PairedLatency, Runner, benchmark, interleaved_benchmark, paired_benchmark
from edgeq.core.errors import SpecError

__all__ = ["Backend", "CompileReport", "LatencyReport", "PairedLatency", "Runner", "benchmark", "get_backend",
           "interleaved_benchmark", "known_backends", "paired_benchmark"]

# name -> "module:Class"; modules are imported on first use so a missing SDK costs nothing here.
# Extras a backend needs: tensorrt -> `pip install 'edgeq[tensorrt]'` plus an NVIDIA GPU.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "edgeq.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "edgeq.backends.openvino:OpenVinoBackend",
    "command": "edgeq.backends.command:CommandBackend",
    "tensorrt": "edgeq.backends.tensorrt:TensorRtBackend",
    "declared": "edgeq.backends.declared:DeclaredBackend",
}


def known_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered under `name`; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())}")
    module_name, _, cls_name = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)()
