"""Keep third-party noise away from users: Prefect's telemetry tracebacks, torch.onnx chatter."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings


def quiet_environment() -> None:
    """Call before Prefect is imported (the CLI and the tests do)."""
    # The ephemeral server's telemetry write races its own migrations ("database is locked" tracebacks), and offline
    # it logs "Failed to send telemetry".
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh Prefect home migrates its database on the first start: on a busy 2-core machine that took longer than
    # Prefect's 20 s default, and the command failed with "Timed out while attempting to connect".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    quiet_loggers()


def quiet_loggers() -> None:
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo", "torch.export",
                 "nncf", "prefect.server", "uvicorn", "uvicorn.error", "docket"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
    prefect_logger = logging.getLogger("prefect")
    if _not_temporary_server_notice not in prefect_logger.filters:
        prefect_logger.addFilter(_not_temporary_server_notice)


def import_nncf():
    """`import nncf`, then its logger back to errors only: NNCF sets its own logger to INFO when first imported,
    after `quiet_loggers` ran, and its per-node notes ("Not adding activation input quantizer for operation ...")
    would fill the user's console."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    return nncf


def _not_temporary_server_notice(record: logging.LogRecord) -> bool:
    """Drops Prefect's "Starting temporary server ... See https://www.prefect.io/docs/..." and "Stopping temporary
    server" lines: edgeq starts that server on purpose when PREFECT_API_URL is unset, and its README says how to run
    a dedicated one. (A filter on the `prefect` logger sees only its own records, not its children's run logs.)"""
    return not str(record.msg).startswith(("Starting temporary server", "Stopping temporary server"))


class _ExpectedErrorFilter(logging.Filter):
    """On a console handler: hides the records by which Prefect reports an *expected* exception.

    Prefect reports a failing run's exception several times (the task's "Finished in state Failed(...)", the flow's
    "Encountered exception during execution" with its traceback, the flow's "Finished in state Failed(...)") before
    the command itself says, once, what went wrong. Records about any other exception pass, tracebacks included.
    Handlers that send logs to the Prefect API are not touched: the UI keeps the full record.
    """

    # How Prefect's engines name the exception in those lines: "encountered an exception: GateError: ...",
    # "encountered an exception GateError: ...", "failed with exception: GateError('...')".
    _NAMED = re.compile(r"(?:encountered an exception:? |failed with exception: )(\w+)[:(]")

    def __init__(self, expected: tuple[type[BaseException], ...]):
        super().__init__()
        self.expected = expected

    def _is_expected_name(self, name: str) -> bool:
        classes = list(self.expected)
        while classes:
            cls = classes.pop()
            if cls.__name__ == name:
                return True
            classes.extend(cls.__subclasses__())
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not isinstance(exc, self.expected)
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        named = self._NAMED.search(record.getMessage())
        return not (named and self._is_expected_name(named.group(1)))


def hide_expected_errors(expected: tuple[type[BaseException], ...]) -> None:
    """Keep Prefect's console output free of its reports of `expected` exceptions (tracebacks included).

    Call after Prefect is imported: its logging setup creates the console handler. Calling again changes nothing.
    """
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
                isinstance(f, _ExpectedErrorFilter) for f in handler.filters):
            handler.addFilter(_ExpectedErrorFilter(expected))


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
