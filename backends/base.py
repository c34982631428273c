"""The contract every runtime backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

# Control-flow ops whose support differs between runtimes and compilers.
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


class Backend(ABC):
    """One runtime. Subclasses import their SDK inside methods, never at module level."""

    name: ClassVar[str]

    @abstractmethod
    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        """(available, reason when not) on this machine for `device`."""

    @abstractmethod
    def max_opset(self) -> int:
        """Highest default-domain ONNX opset the installed runtime supports."""

    @abstractmethod
    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        """Whether the runtime has an implementation for this op (any version)."""
