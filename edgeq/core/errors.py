"""Errors a user can act on: each message names the thing to change.

Every edgeq error class lives here. A stage that refuses something often has measured it first (the export
report, the quantization attempts, the four-way table, the compile matrix); that record rides on the
exception as ``report`` so the task that catches it can still publish what was measured. Anything else the
catcher needs (the stored chart of a failed validation, say) is a keyword attachment and reads back as an
attribute::

    raise GateError("do not ship: ...", report=report, chart=chart_ref)
    ...
    except GateError as exc:
        publish(exc.report, exc.chart)

Prefect pickles a failed task's exception into its persisted state, so the report and the attachments are
plain instance attributes: ``BaseException.__reduce__`` carries ``__dict__`` along with the message, and
the constructor takes the message alone, so every class round-trips through pickle without a custom
``__reduce__``.
"""

from __future__ import annotations

from typing import Any


class _Reporting(Exception):
    """Base of every edgeq exception: a message, an optional report, and named attachments."""

    report: Any = None  # read as None on instances rebuilt from older pickles that lack the attribute

    def __init__(self, message: str = "", report: Any = None, **attachments: Any):
        super().__init__(message)
        self.report = report
        for name, value in attachments.items():
            # An attachment named like an exception attribute (args, with_traceback) would break the exception.
            if name.startswith("_") or hasattr(Exception, name):
                raise TypeError(f"{type(self).__name__}: cannot attach {name!r} (reserved name)")
            setattr(self, name, value)


class EdgeqError(_Reporting):
    """Bad model, data or config: fail at once, never retried."""


class SpecError(EdgeqError):
    """A config file or spec field is wrong."""


class ExportError(EdgeqError):
    """The model cannot be exported to ONNX as specified."""


class GateError(EdgeqError):
    """A quality gate refused the artifact (parity, accuracy, agreement)."""


class CompileCheckFailed(GateError):
    """A required target cannot compile the model: the pipeline stops before quantization.

    ``report`` is the compile matrix (every target's compile report).
    """


class ModelFileError(EdgeqError):
    """The model file itself is unreadable (missing, truncated, not ONNX)."""


class RunnerError(EdgeqError):
    """Inputs do not fit the prepared model (names, dtypes, static shapes)."""


class IntegrityError(EdgeqError):
    """An artifact's bytes no longer match the sha256 it was stored under."""


class CalibrationError(EdgeqError):
    """The captures cannot give a calibration set (too few usable samples, all leaked, ...)."""


class VersionNotFound(CalibrationError):
    """No calibration version with that id in the store."""


class NotApproved(CalibrationError):
    """The version exists but is not approved (candidate or rejected)."""


class TransientError(_Reporting):
    """A fault worth retrying (a busy server, a flaky device)."""


def is_transient(exc: BaseException) -> bool:
    """Retry condition for tasks: only faults that may go away on their own."""
    return isinstance(exc, (TransientError, TimeoutError, ConnectionError))
