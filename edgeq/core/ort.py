"""The one place ONNX Runtime sessions are built.

Export parity, the QAT export check, four-way validation and the onnxruntime backend all run ONNX models
through ONNX Runtime; building every session here keeps their settings (threads, graph optimization,
providers, logging) from drifting apart between the stage that measures and the backend that ships.
onnxruntime is imported on use: core stays importable where only onnx is installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

CPU = ("CPUExecutionProvider",)
Optimization = Literal["disabled", "basic", "extended", "all"]

# ONNX Runtime's log severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
LOG_ERRORS = 3
LOG_FATAL = 4


def session_options(
    *,
    threads: int | None = None,
    optimization: Optimization = "all",
    optimized_model_path: str | Path | None = None,
    log_severity: int = LOG_ERRORS,
    config: Mapping[str, str] | None = None,
):
    """`onnxruntime.SessionOptions` with edgeq's settings.

    threads: intra-op threads, with inter-op pinned to 1 so the thread count a report states is what ran;
    None leaves both to ONNX Runtime. optimization: graph optimization level ("all" is ONNX Runtime's
    default; "extended" keeps a saved optimized model portable across CPUs). optimized_model_path: where ONNX
    Runtime writes the optimized graph. config: session config entries (``session.disable_cpu_ep_fallback``...).
    """
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    so.graph_optimization_level = levels[optimization]
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def ort_session(
    path: str | Path,
    *,
    providers: Sequence[str] = CPU,
    threads: int | None = None,
    optimization: Optimization = "all",
    optimized_model_path: str | Path | None = None,
    log_severity: int = LOG_ERRORS,
    config: Mapping[str, str] | None = None,
):
    """An `onnxruntime.InferenceSession` on the model at `path` (see :func:`session_options`)."""
    import onnxruntime as ort

    so = session_options(threads=threads, optimization=optimization, optimized_model_path=optimized_model_path,
                         log_severity=log_severity, config=config)
    return ort.InferenceSession(str(path), so, providers=list(providers))
