"""Errors a user can act on: each message names the thing to change."""


class EdgeqError(Exception):
    """Bad model, data or config: fail at once, never retried."""


class SpecError(EdgeqError):
    """A config file or spec field is wrong."""


class ExportError(EdgeqError):
    """The model cannot be exported to ONNX as specified."""


class GateError(EdgeqError):
    """A quality gate refused the artifact (parity, accuracy, agreement)."""


class ModelFileError(EdgeqError):
    """The model file itself is unreadable (missing, truncated, not ONNX)."""


class RunnerError(EdgeqError):
    """Inputs do not fit the prepared model (names, dtypes, static shapes)."""


class TransientError(Exception):
    """A fault worth retrying (a busy server, a flaky device)."""


def is_transient(exc: BaseException) -> bool:
    """Retry condition for tasks: only faults that may go away on their own."""
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError))
