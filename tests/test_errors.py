"""Errors carry what a stage measured before it refused, through Prefect's persisted failed states."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

from edgeq.core import errors
from edgeq.core.errors import CompileCheckFailed, EdgeqError, GateError, NotApproved, TransientError, is_transient
from edgeq.export import ExportReport


def _report() -> ExportReport:
    return ExportReport(model="digits-cnn", opset=17, opset_reason="lowest maximum opset", exporter="torchscript")


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_report_and_attachments_survive_a_pickle_round_trip(dumps):
    err = GateError("export refused: parity gate", report=_report(), chart={"sha256": "ab12"})
    back = pickle.loads(dumps(err))
    assert type(back) is GateError and str(back) == "export refused: parity gate"
    assert back.report == err.report and back.chart == {"sha256": "ab12"}


def test_every_error_class_round_trips_with_its_report():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert {CompileCheckFailed, NotApproved, TransientError} <= set(classes)
    for cls in classes:
        back = pickle.loads(pickle.dumps(cls("why", report={"rows": 1})))
        assert type(back) is cls and str(back) == "why" and back.report == {"rows": 1}


def test_an_error_without_a_report_says_none():
    err = pickle.loads(pickle.dumps(EdgeqError("bad config")))
    assert err.report is None and not is_transient(err)
    assert is_transient(TransientError("busy"))


def test_an_attachment_may_not_shadow_an_exception_attribute():
    with pytest.raises(TypeError, match="cannot attach 'args'"):
        GateError("x", args=(1,))
