"""Keep third-party noise away from users: Prefect's telemetry tracebacks, torch.onnx chatter."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
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


class _ThreadMutedStream:
    """Stands in for sys.stdout/sys.stderr: drops writes from muted threads, passes everyone else's through."""

    def __init__(self, real):
        self.real = real
        self.muted: dict[int, int] = {}

    def write(self, s):
        if self.muted.get(threading.get_ident()):
            return len(s)
        return self.real.write(s)

    def flush(self):
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


_MUTE_LOCK = threading.Lock()


@contextlib.contextmanager
def muted_output(stderr: bool = False):
    """Silence library chatter (print-based progress) from *this thread* only.

    contextlib.redirect_stdout swaps the process-wide sys.stdout, so two threads (Prefect's thread task runner)
    muting at once can restore each other's buffer and leave the process printing into a StringIO for good.
    """
    names = ("stdout", "stderr") if stderr else ("stdout",)
    me = threading.get_ident()
    with _MUTE_LOCK:
        streams = []
        for name in names:
            cur = getattr(sys, name)
            if not isinstance(cur, _ThreadMutedStream):
                cur = _ThreadMutedStream(cur)
                setattr(sys, name, cur)
            cur.muted[me] = cur.muted.get(me, 0) + 1
            streams.append((name, cur))
    try:
        yield
    finally:
        with _MUTE_LOCK:
            for name, stream in streams:
                stream.muted[me] -= 1
                if not stream.muted[me]:
                    del stream.muted[me]
                if not stream.muted and getattr(sys, name) is stream:
                    setattr(sys, name, stream.real)
