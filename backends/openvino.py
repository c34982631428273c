"""OpenVINO backend."""

from __future__ import annotations

from backends.base import Backend


class OpenVinoBackend(Backend):
    name = "openvino"

    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError as exc:
            return False, f"openvino is not installed ({exc})"
        devices = ov.Core().available_devices
        if device.upper() not in devices:
            return False, f"OpenVINO device {device.upper()} not present (available: {', '.join(devices)})"
        return True, ""

    def max_opset(self) -> int:
        # The OpenVINO 2025/2026 ONNX frontend reads opsets up to 22 (its documented support range).
        return 22

    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        # Standard domain ops and ONNX Runtime's contrib domain are what the ONNX frontend translates;
        # an unknown op shows up as a conversion failure in the compile check.
        return domain in ("", "ai.onnx", "com.microsoft", "org.openvinotoolkit")
