"""Why INT8 is not faster than FP32 on a target: which quantized ops run integer kernels, and which do not.

A speed verdict alone ("INT8 is 1.47x SLOWER") leaves the user to guess. When the chosen INT8 model is not faster
than FP32 on the deployment target, the target's backend is asked how its runtime runs that model
(`Backend.explain_int8`): ONNX Runtime from the optimized graph it writes (an integer kernel such as QLinearConv,
QLinearMatMul, QGemm, MatMulIntegerToFloat, or a DequantizeLinear feeding the float op, i.e. not fused), OpenVINO
from the compiled model's runtime precision, kernel and time per layer beside the FP32 model's. The answer is a list
of `KernelRow`s per op type: the table artifact `int8-kernels`, the `int8_kernels` of the quantization report and
two lines under the verdict (counts, the first unfused nodes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.backends import get_backend
from edgeq.backends.base import KernelRow
from edgeq.core.specs import TargetSpec

ARTIFACT_KEY = "int8-kernels"
CONVERSIONS = "QuantizeLinear/DequantizeLinear"
OTHER = ("other layers", "other nodes")  # OpenVINO, ONNX Runtime
NAMED = 5  # unfused nodes named in the summary lines; the table names them all


def explain_speed(int8_onnx: str | Path, target: TargetSpec, fp32_onnx: str | Path | None = None,
                  feeds: dict[str, np.ndarray] | None = None) -> list[KernelRow]:
    """The target's backend's per-op-type account of how it runs the INT8 model; a runtime that cannot give one
    (or fails to) is one row saying why, never an exception: the verdict stands without its explanation."""
    backend = get_backend(target.backend)
    try:
        ok, why = backend.availability(target.device)
        if not ok:
            return [KernelRow(runtime=backend.name, target=target.name, op_type="-", note=f"not available: {why}")]
        return backend.explain_int8(int8_onnx, target, fp32_path=fp32_onnx, feeds=feeds)
    except Exception as exc:  # noqa: BLE001 - an explanation that fails must not fail the conversion
        return [KernelRow(runtime=backend.name, target=target.name, op_type="-",
                          note=f"not available: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")]


def _ms(value: float | None) -> str:
    return f"{value:.3f} ms"


def explanation_lines(rows: list[KernelRow], key: str = ARTIFACT_KEY) -> str:
    """Two lines: integer against float per op type (with times where the runtime gave them), then the first nodes
    that were quantized but run in float, and the Q/DQ conversions left; the table is the artifact `key`."""
    if not rows:
        return ""
    head = f"why ({rows[0].runtime} on {rows[0].target}): "
    notes = [r.note for r in rows if r.op_type == "-" and r.note]
    if notes:
        return head + "; ".join(notes)
    parts, unfused, tail = [], [], []
    for r in rows:
        if r.op_type == CONVERSIONS:
            tail.append(f"{r.kernels} left between kernels" + (f" ({_ms(r.int8_ms)})" if r.int8_ms is not None else ""))
            continue
        if r.op_type in OTHER:
            if r.int8_ms is not None and r.fp32_ms is not None:
                tail.append(f"{r.op_type} {_ms(r.int8_ms)} vs FP32 {_ms(r.fp32_ms)}")
            continue
        quantized = r.integer + r.float_quantized
        if not quantized and not r.float_unquantized:
            continue
        part = f"{r.op_type} {r.integer}/{quantized} quantized in integer kernels"
        if r.float_unquantized:
            part += f", {r.float_unquantized} kept FP32"
        if r.int8_ms is not None and r.fp32_ms is not None:
            part += f", {_ms(r.int8_ms)} vs FP32 {_ms(r.fp32_ms)}"
        if r.fp32_kernels:
            part += f" [{r.kernels} vs FP32 {r.fp32_kernels}]"
        parts.append(part)
        unfused += r.unfused
    line1 = head + ("; ".join(parts) or "no Conv/MatMul/Gemm found")
    if unfused:
        more = f" (+{len(unfused) - NAMED} more)" if len(unfused) > NAMED else ""
        line2 = f"not fused, run in float after DequantizeLinear: {', '.join(unfused[:NAMED])}{more}"
    else:
        line2 = "every quantized Conv/MatMul/Gemm runs an integer kernel"
    line2 += "".join(f"; {t}" for t in tail) + f" (table: Prefect artifact {key!r})"
    return f"{line1}\n{line2}"


def kernel_table(rows: list[KernelRow]) -> list[dict]:
    """The rows as the table artifact shows them."""
    return [r.row() for r in rows]
