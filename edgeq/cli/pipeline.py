"""`edgeq export`, `quantize`, `convert` and `demo`: the pipeline's commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from edgeq.cli.common import console, run_flow


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


def export(config: Path = typer.Argument(..., help="edgeq YAML config")) -> None:
    """Export the config's model to ONNX, probe dynamic shapes, and gate on PyTorch parity."""
    from edgeq.flows.export import ExportParams, export_model

    result = run_flow(export_model, ExportParams(config=str(config)))
    print_export_report(result.report)
    console.print(f"ONNX model: {result.onnx.uri}  sha256 {result.onnx.sha256[:16]}…")


def print_four_way(manifest: dict) -> None:
    from edgeq.validation import ValidationReport, format_table

    console.print(format_table(ValidationReport.model_validate(manifest["four_way"])), highlight=False, soft_wrap=True)


def speed_text(note: str) -> str:
    """The speed verdict, and under it (when INT8 is not faster) why: integer kernels against float ops per op
    type and the first nodes left unfused, with the artifact that holds the whole table."""
    verdict, *why = note.split("\n")
    return "\n".join([f"speed: {verdict}"] + [f"  {w}" for w in why])


def print_forms_note(note: str) -> None:
    """What each target's INT8 model is and why (quantization.target_forms); nothing when every target shares one."""
    if note:
        console.print("\n".join(["INT8 model per target:"] + [f"  {line}" for line in note.split("\n")]),
                      highlight=False, soft_wrap=True)


def convert(
    config: Path = typer.Argument(..., help="edgeq YAML config"),
    calibration: str = typer.Option("latest", "--calibration", "-c", help="approved calibration version id"),
    mode: str = typer.Option(None, "--mode", help="auto | ptq | qat (default: the config's)"),
) -> None:
    """Export -> compile check -> quantize -> four-way validation -> publish; prints the four-way table."""
    from edgeq.flows.convert import ConvertParams, convert_model

    manifest = run_flow(convert_model, ConvertParams(config=str(config), calibration=calibration, mode=mode))
    print_four_way(manifest)
    console.print(speed_text(manifest["speed"]), highlight=False, soft_wrap=True)
    print_forms_note(manifest.get("target_forms_note", ""))
    console.print(f"[green]published[/] {manifest['bundle_id']} at {manifest['uri']}", soft_wrap=True)


DEMO_REVIEWER = "edgeq-demo"


def demo(config: Path = typer.Argument(Path("digits-demo.yaml"), help="the demo config")) -> None:
    """The whole demo in one command: build the demo, build and approve (as the demo reviewer) a calibration
    set, then convert: export, compile check, quantize, four-way validation, publish."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.specs import load_config
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.calibration import CalibrationParams, build_calibration_set

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


def quantize(
    config: Path = typer.Argument(..., help="edgeq YAML config"),
    calibration: str = typer.Option(None, "--calibration", "-c", help="approved calibration version id (default: latest approved)"),
) -> None:
    """Quantize to INT8 QDQ ONNX from an approved calibration version, escalating until the SLA holds."""
    from edgeq.flows.quantize import QuantizeParams, quantize_model
    from edgeq.quantization.escalate import format_attempts

    result = run_flow(quantize_model, QuantizeParams(config=str(config), calibration=calibration))
    rep = result.report
    console.print(f"policy: start with {rep.policy.start} — {'; '.join(rep.policy.reasons)}")
    console.print(f"types: {rep.types} ({rep.types_reason})")
    console.print(format_attempts(rep), highlight=False)
    chosen = rep.chosen_attempt
    console.print(f"chosen: attempt {chosen.index} ({chosen.label}) {rep.metric_name} {chosen.metric:.4f} vs FP32 "
                  f"{rep.fp32_metric:.4f}")
    console.print(speed_text(rep.speed_note), highlight=False, soft_wrap=True)
    console.print(f"INT8 model: {result.int8.uri}")
    for name, ref in result.forms.items():
        console.print(f"INT8 model for {name}: {ref.uri} ({rep.target_forms[name].reason})", soft_wrap=True)
    print_forms_note(rep.forms_note)

