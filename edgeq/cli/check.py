"""`edgeq check`: the compile-check matrix."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgeq.cli.common import console, fail, quiet_expected_errors
from edgeq.core.errors import CompileCheckFailed, EdgeqError

_STATUS_STYLE = {"compiled": "green", "declared-ok": "cyan", "failed": "bold red", "unavailable": "yellow"}


# Two tables of matrix columns (column -> short header), so the matrix fits an 80-column terminal.
_TABLES = [
    {"target": "target", "backend": "backend", "status": "status", "required": "required", "opset": "opset",
     "precision": "precision", "layout": "layout", "batch": "batch"},
    {"target": "target", "compile s": "compile s", "latency median ms": "p50 ms", "latency p90 ms": "p90 ms",
     "threads": "threads", "control flow": "control flow", "unsupported ops": "unsupported ops"},
]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return escape(str(v))


def print_matrix(matrix) -> None:
    for i, columns in enumerate(_TABLES):
        title = (f"compile check of {matrix.model} (onnx {matrix.onnx_sha256[:12]}…)" if i == 0
                 else "compile time and batch-1 latency")
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        for header in columns.values():
            t.add_column(header, overflow="fold", no_wrap=header in ("target", "status"))
        for r in matrix.reports:
            row = r.row()
            cells = [_cell(row[c]) for c in columns]
            if "status" in columns:
                cells[list(columns).index("status")] = f"[{_STATUS_STYLE[r.status]}]{r.status}[/]"
            t.add_row(*cells)
        console.print(t)
    console.print("declared-ok: a static check against a target profile, not a compile; "
                  "latency: batch 1, median (p50) and p90.", highlight=False)
    for r in matrix.reports:
        if r.reason:
            console.print(f"[bold]{escape(r.target)}[/] ({r.status}): {escape(r.reason)}", highlight=False)
        for w in r.warnings:
            console.print(f"[yellow]warning[/] {escape(r.target)}: {escape(w)}", highlight=False)


def check(
    config: Path = typer.Argument(..., help="edgeq YAML config"),
    warmup: int = typer.Option(10, min=0, help="untimed batch-1 runs before the latency benchmark"),
    iters: int = typer.Option(100, min=1, help="timed batch-1 runs (median and p90)"),
) -> None:
    """Export (cached) and compile-check every target; exit 1 when a required target fails."""
    from edgeq.flows.compile_check import CompileCheckParams, compile_check

    quiet_expected_errors()
    state = compile_check(CompileCheckParams(config=str(config), warmup=warmup, iters=iters), return_state=True)
    if state.is_completed():
        print_matrix(state.result())
        return
    try:
        state.result()
    except CompileCheckFailed as exc:
        print_matrix(exc.report)
        fail(escape(str(exc)))
    except EdgeqError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001
        fail(f"{type(exc).__name__}: {exc}")
    fail(f"flow ended {state.type.value}: {state.message}")
