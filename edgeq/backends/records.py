"""What backends report: compile-check rows, latency, prepared forms and INT8 schemes (plain pydantic records).

Records carry no runtime: they are what the stages read, cache and show, so they import no SDK and
no runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from edgeq.core.onnx_graph import STANDARD_DOMAINS, TensorMeta

Status = Literal["compiled", "declared-ok", "failed", "unavailable"]


class UnsupportedOp(BaseModel):
    node: str
    op_type: str
    domain: str = ""
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain not in STANDARD_DOMAINS else self.op_type


class LatencyReport(BaseModel):
    """Batch-1 latency of one runner; what ran is recorded next to the numbers."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    iters: int
    warmup: int
    threads: int
    precision: str
    batch: int = 1


class CompileReport(BaseModel):
    """One row of the compile-check matrix."""

    target: str
    backend: str
    device: str
    required: bool = True
    status: Status
    reason: str = Field("", description="why failed/unavailable, naming the op, node, field or value to change")
    unsupported_ops: list[UnsupportedOp] = Field(default_factory=list)
    control_flow: list[str] = Field(default_factory=list, description="'If (node n)' for each control-flow node")
    control_flow_supported: bool | None = None
    opset: int | None = None
    max_opset: int | None = None
    precision_asked: str = ""
    precision: str = Field("", description="what actually ran, as the runtime reports it")
    layout: str = ""
    batch: str = ""
    input_shapes: dict[str, list[int | str]] = Field(default_factory=dict)
    compile_s: float | None = None
    latency: LatencyReport | None = None
    toolchain: str = ""
    warnings: list[str] = Field(default_factory=list)
    artifacts: dict[str, Any] = Field(default_factory=dict, description="name -> ArtifactRef of the prepared forms")
    # The prepared form of a compiled row (files under the caller's out_dir); not serialized.
    _prepared: Any = PrivateAttr(default=None)

    @property
    def prepared(self) -> "PreparedModel | None":
        return self._prepared

    @property
    def ok(self) -> bool:
        return self.status in ("compiled", "declared-ok")

    def row(self) -> dict[str, Any]:
        """The flat matrix row shown in the Prefect UI and the CLI."""
        lat = self.latency
        cf = "none" if not self.control_flow else (
            f"{len(self.control_flow)} node(s): " + ("supported" if self.control_flow_supported else "UNSUPPORTED"))
        return {
            "target": self.target, "backend": self.backend, "device": self.device,
            "required": self.required, "status": self.status,
            "unsupported ops": ", ".join(f"{u.label} ({u.node})" for u in self.unsupported_ops) or "-",
            "control flow": cf,
            "opset": f"{self.opset}/{self.max_opset}" if self.opset is not None else "-",
            "precision": self.precision or "-", "layout": self.layout or "-", "batch": self.batch or "-",
            "compile s": round(self.compile_s, 3) if self.compile_s is not None else None,
            "latency median ms": round(lat.median_ms, 4) if lat else None,
            "latency p90 ms": round(lat.p90_ms, 4) if lat else None,
            "threads": lat.threads if lat else None,
            "reason": self.reason,
        }


class Int8Scheme(BaseModel):
    """The INT8 form a target runs fastest and correctly: activation/weight types, 7-bit weights, and why."""

    types: Literal["u8s8", "s8s8"]
    reduce_range: bool = False
    reason: str


class PreparedModel(BaseModel):
    """A deployable form written by `Backend.prepare`: the file to run and what it takes."""

    backend: str
    target: str
    path: Path = Field(description="the main file (.onnx, .xml, .engine)")
    files: dict[str, Path] = Field(default_factory=dict, description="every file to ship, by role")
    inputs: list[TensorMeta]
    outputs: list[str]
    layout: str
    batch: str
    precision: str = Field(description="asked precision, as the runtime spells it")
    warnings: list[str] = Field(default_factory=list)
