"""Keep third-party noise away from users: Prefect's telemetry tracebacks, torch.onnx chatter."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_environment() -> None:
    """Call before Prefect is imported (the CLI and the tests do)."""
    # The ephemeral server's telemetry write races its own migrations ("database is locked" tracebacks).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    quiet_loggers()


def quiet_loggers() -> None:
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo", "torch.export",
                 "nncf", "prefect.server", "uvicorn", "uvicorn.error", "docket"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
