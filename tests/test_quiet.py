import sys
import threading

from edgeq.core.quiet import muted_output


def test_muting_in_threads_never_leaves_the_process_silenced(capsys):
    real = sys.stdout
    inside = threading.Barrier(2)
    leave_first = threading.Event()

    def worker(first: bool):
        with muted_output():
            print("chatter that must not show")
            inside.wait()
            if first:
                leave_first.set()  # leave while the other thread is still muting (redirect_stdout lost stdout here)
            else:
                leave_first.wait()

    threads = [threading.Thread(target=worker, args=(f,)) for f in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sys.stdout is real
    print("still visible")
    out = capsys.readouterr().out
    assert "still visible" in out and "chatter" not in out


def _record(name: str, msg: str, exc: BaseException | None = None):
    import logging

    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None,
                             (type(exc), exc, None) if exc is not None else None)


def test_console_filter_hides_prefects_reports_of_expected_errors_only():
    from edgeq.core.errors import CompileCheckFailed, EdgeqError, GateError
    from edgeq.core.quiet import _ExpectedErrorFilter

    keep = _ExpectedErrorFilter((EdgeqError,)).filter
    hidden = [
        _record("prefect.flow_runs", "Encountered exception during execution: GateError('do not ship')", GateError("x")),
        _record("prefect.task_runs", "Finished in state Failed('Task run encountered an exception GateError: x')"),
        _record("prefect.flow_runs", "Finished in state Failed('Flow run encountered an exception: "
                                     "CompileCheckFailed: 1 required target(s) cannot take model m')"),
        _record("prefect.task_runs", "Task run failed with exception: CompileCheckFailed('x') - Retries are exhausted",
                CompileCheckFailed("x")),
    ]
    shown = [
        _record("prefect.flow_runs", "Encountered exception during execution: KeyError('k')", KeyError("k")),
        _record("prefect.task_runs", "Finished in state Failed('Task run encountered an exception KeyError: k')"),
        _record("prefect.flow_runs", "Finished in state Completed()"),
        _record("edgeq", "encountered an exception: GateError: a message of edgeq's own"),
    ]
    assert [keep(r) for r in hidden] == [False] * len(hidden)
    assert [keep(r) for r in shown] == [True] * len(shown)
