"""What every edgeq command shares: quiet Prefect, consoles, one way to fail and to run a flow."""

from __future__ import annotations

import logging
import os

from edgeq.core.quiet import quiet_environment

quiet_environment()


import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from edgeq.core.errors import EdgeqError  # noqa: E402

# Piped or captured output has no terminal width, and rich would wrap tables at 80 columns ("compile\ns"): in a
# log or a file a wide line reads better than a broken one. COLUMNS, when set, still decides.
PIPED_WIDTH = 200


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, width=PIPED_WIDTH)
    return console


console = make_console()
err_console = make_console(stderr=True)

# `edgeq --verbose COMMAND`: Prefect's own report of an expected error, traceback included, is shown too.
VERBOSE = False


def fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def quiet_expected_errors() -> None:
    """Before a flow runs: an EdgeqError (a gate, a bad config, an export the model cannot do) is reported once, by
    `fail`, instead of also by Prefect with its traceback. Other exceptions keep theirs; --verbose keeps all."""
    if VERBOSE:
        return
    from prefect.logging.configuration import ensure_logging_setup

    from edgeq.core.quiet import hide_expected_errors

    ensure_logging_setup()  # creates the console handler that gets the filter (a no-op once Prefect set it up)
    hide_expected_errors((EdgeqError,))
    # Prefect's background services drain their queues at exit and say so ("EventsWorker - Still processing items:
    # 1 items remaining..."), after edgeq's one-line error; nothing is lost, and --verbose keeps the line.
    for name in ("EventsWorker", "APILogWorker"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_flow(fn, *args, explain=None, **kwargs):
    """Run a flow; a user-facing error prints cleanly and exits non-zero.

    `explain(exc)` may turn a non-edgeq failure into `(message, exit code)` (e.g. a review that timed out).
    """
    quiet_expected_errors()
    state = fn(*args, return_state=True, **kwargs)
    if not state.is_completed():
        try:
            state.result()
        except EdgeqError as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001
            explained = explain(exc) if explain else None
            if explained:
                fail(*explained)
            fail(f"{type(exc).__name__}: {exc}")
        fail(f"flow ended {state.type.value}: {state.message}")
    return state.result()


