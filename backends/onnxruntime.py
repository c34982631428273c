"""ONNX Runtime backend."""

from __future__ import annotations

from functools import lru_cache

from backends.base import Backend

# Highest opset each ONNX Runtime release implements (ONNX Runtime's compatibility table).
_ORT_MAX_OPSET = {(1, 20): 21, (1, 21): 22, (1, 22): 22, (1, 23): 23}


@lru_cache(maxsize=1)
def _cpu_kernels() -> frozenset[tuple[str, str]]:
    from onnxruntime.capi import _pybind_state as C

    return frozenset(
        (("" if k.domain == "ai.onnx" else k.domain), k.op_name)
        for k in C.get_all_opkernel_def()
        if k.provider == "CPUExecutionProvider"
    )


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

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

    def max_opset(self) -> int:
        import onnxruntime as ort

        major, minor = (int(p) for p in ort.__version__.split(".")[:2])
        known = [v for (ma, mi), v in _ORT_MAX_OPSET.items() if (ma, mi) <= (major, minor)]
        return max(known) if known else 21

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        return (("" if domain == "ai.onnx" else domain), op_type) in _cpu_kernels()
