"""What this machine's CPU can do: the ISA flags that decide how INT8 runs on it."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

_ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
        "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "asimddp", "sve")
# x86 instructions with an INT8 dot product that accumulates without the 16-bit intermediate of AVX2's vpmaddubsw.
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def _flags() -> frozenset[str]:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return frozenset(flags)


def cpu_isa() -> dict[str, Any]:
    """Machine, processor and the ISA flags that matter for INT8 (recorded in manifests and benchmarks)."""
    return {"machine": platform.machine(), "processor": platform.processor(),
            "isa": sorted(f for f in _ISA if f in _flags())}


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def x86_without_vnni() -> bool:
    """An x86 CPU whose INT8 kernels multiply u8 x s8 pairs into saturating 16-bit sums (AVX2/AVX-512 without VNNI).

    ONNX Runtime documents the risk for U8S8 models on such CPUs; measured here (AVX2, no VNNI) on the demo CNN,
    ONNX Runtime's U8S8 outputs were 30 output quantization steps away from OpenVINO's, and 1 step with 7-bit
    weights (reduce_range).
    """
    flags = _flags()
    return is_x86() and bool(flags) and not any(f in flags for f in _VNNI)


def declared_x86_without_vnni(isa: list[str]) -> bool:
    """The same question for a CPU declared by its ISA flags (a target's `cpu_isa`, named as /proc/cpuinfo names
    them): x86 (any of sse4_2, avx, avx2, avx512f) and none of the VNNI/AMX flags."""
    flags = {f.lower() for f in isa}
    return bool(flags & {"sse4_2", "avx", "avx2", "avx512f"}) and not flags & set(_VNNI)
