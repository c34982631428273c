"""The `edgeq` command line."""

from __future__ import annotations

from edgeq.quiet import quiet_environment

quiet_environment()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgeq.errors import EdgeqError  # noqa: E402

app = typer.Typer(help="PyTorch model -> verified INT8 edge model, as a Prefect DAG of cached, gated tasks.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
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


def print_export_report(report) -> None:
    t = Table(title=f"export of {report.model}: opset {report.opset} ({report.exporter} exporter)")
    for col in ("output", "max abs diff", "max rel diff", "worst sample", "samples", "tolerance", "parity"):
        t.add_column(col)
    for r in report.parity:
        t.add_row(r.output, f"{r.max_abs_diff:.3g}", f"{r.max_rel_diff:.3g}", str(r.worst_sample), str(r.samples),
                  f"{r.tolerance:g}", "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    console.print(t)
    probe = ", ".join(f"{p.input}[{p.axis}]={p.size}: {'ok' if p.ok else 'FAIL'}" for p in report.probe)
    console.print(f"dynamic-shape probe: {probe or 'no dynamic axes'}")
    if report.findings:
        ft = Table(title="graph scan held against targets")
        for col in ("target", "node", "op", "supported", "note"):
            ft.add_column(col)
        for s in report.target_support:
            ft.add_row(s.target, s.node, s.op, "yes" if s.supported else "[red]no[/]", s.note)
        console.print(ft)
    else:
        console.print("graph scan: no custom-domain ops, no control flow")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


@app.command()
def export(config: Path = typer.Argument(..., help="edgeq YAML config")) -> None:
    """Export the config's model to ONNX, probe dynamic shapes, and gate on PyTorch parity."""
    from flows.export import ExportParams, export_model

    result = run_flow(export_model, ExportParams(config=str(config)))
    print_export_report(result.report)
    console.print(f"ONNX model: {result.onnx.uri}  sha256 {result.onnx.sha256[:16]}…")


def print_four_way(manifest: dict) -> None:
    from edgeq.validation import ValidationReport, format_table

    console.print(format_table(ValidationReport.model_validate(manifest["four_way"])), highlight=False, soft_wrap=True)


@app.command()
def convert(
    config: Path = typer.Argument(..., help="edgeq YAML config"),
    calibration: str = typer.Option("latest", "--calibration", "-c", help="approved calibration version id"),
    mode: str = typer.Option(None, "--mode", help="auto | ptq | qat (default: the config's)"),
) -> None:
    """Export -> compile check -> quantize -> four-way validation -> publish; prints the four-way table."""
    from flows.convert import ConvertParams, convert_model

    manifest = run_flow(convert_model, ConvertParams(config=str(config), calibration=calibration, mode=mode))
    print_four_way(manifest)
    console.print(f"speed: {manifest['speed']}", highlight=False, soft_wrap=True)
    console.print(f"[green]published[/] {manifest['bundle_id']} at {manifest['uri']}", soft_wrap=True)


DEMO_REVIEWER = "edgeq-demo"


@app.command()
def demo(config: Path = typer.Argument(Path("digits-demo.yaml"), help="the demo config")) -> None:
    """The whole demo in one command: build the demo, build and approve (as the demo reviewer) a calibration
    set, then convert: export, compile check, quantize, four-way validation, publish."""
    from calibration.versions import record_decision
    from edgeq.specs import load_config
    from edgeq.store import ArtifactStore
    from flows.calibration import CalibrationParams, build_calibration_set

    built = run_flow(build_calibration_set, CalibrationParams(config=str(config), wait_for_review=False))
    vid = built.record.version
    cfg_store = ArtifactStore(load_config(config).store_url)
    record = record_decision(
        cfg_store, vid, approve=True, reviewer=DEMO_REVIEWER,
        comment="approved automatically by `edgeq demo` for the embedded demo; real calibration sets are "
                "reviewed by a person in the Prefect UI or with `edgeq calibration review`",
        via="edgeq demo") if built.record.status == "candidate" else built.record
    console.print(f"calibration version {vid}: {record.status} by {record.decision.reviewer if record.decision else '-'}")
    convert(config, calibration=vid, mode=None)


# Sub-command groups contributed by other modules register themselves on `app`.
from edgeq import cli_calibration, cli_check  # noqa: E402,F401


def main() -> None:  # pragma: no cover
    sys.exit(app())


@app.command()
def quantize(
    config: Path = typer.Argument(..., help="edgeq YAML config"),
    calibration: str = typer.Option(None, "--calibration", "-c", help="approved calibration version id (default: latest approved)"),
) -> None:
    """Quantize to INT8 QDQ ONNX from an approved calibration version, escalating until the SLA holds."""
    from edgeq.quantization.escalate import format_attempts
    from flows.quantize import QuantizeParams, quantize_model

    result = run_flow(quantize_model, QuantizeParams(config=str(config), calibration=calibration))
    rep = result.report
    console.print(f"policy: start with {rep.policy.start} — {'; '.join(rep.policy.reasons)}")
    console.print(f"types: {rep.types} ({rep.types_reason})")
    console.print(format_attempts(rep), highlight=False)
    chosen = rep.chosen_attempt
    console.print(f"chosen: attempt {chosen.index} ({chosen.label}) {rep.metric_name} {chosen.metric:.4f} vs FP32 "
                  f"{rep.fp32_metric:.4f}; {rep.speed_note}")
    console.print(f"INT8 model: {result.int8.uri}")
