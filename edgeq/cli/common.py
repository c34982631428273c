"""What every edgeq command shares: quiet Prefect, consoles, one way to fail and to run a flow."""

from __future__ import annotations

from edgeq.core.quiet import quiet_environment

quiet_environment()


import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from edgeq.core.errors import EdgeqError  # noqa: E402

console = Console()
err_console = Console(stderr=True)


def fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_flow(fn, *args, explain=None, **kwargs):
    """Run a flow; a user-facing error prints cleanly and exits non-zero.

    `explain(exc)` may turn a non-edgeq failure into `(message, exit code)` (e.g. a review that timed out).
    """
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


