"""The export stage as a Prefect task."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from edgeq.core.data import load_inputs, take
from edgeq.core.errors import GateError
from edgeq.core.modeling import build_model
from edgeq.core.specs import EdgeqConfig
from edgeq.core.store import ArtifactRef, ArtifactStore, sha256_file
from edgeq.export import ExportReport, choose_opset, run_export
from edgeq.tasks.artifacts import MISSING, display_rows
from edgeq.tasks.caching import code_fingerprint, content_key, retry_transient, split_fingerprint


class ExportResult(BaseModel):
    onnx: ArtifactRef
    report: ExportReport


def export_cache_key(cfg: EdgeqConfig) -> str:
    m = cfg.model
    return content_key(
        "export",
        weights=sha256_file(m.weights) if m.weights.is_file() else f"missing:{m.weights}",
        factory_source=code_fingerprint(m.factory),
        model=m.model_dump(mode="json", exclude={"weights"}),
        opset=choose_opset(cfg.targets)[0],
        targets=[t.model_dump(mode="json", include={"name", "backend", "max_opset", "profile"}) for t in cfg.targets],
        samples=split_fingerprint(cfg.data.test),
        preprocess=cfg.data.preprocess.model_dump(mode="json"),
        thresholds=[cfg.thresholds.export_atol, cfg.thresholds.export_rtol, cfg.thresholds.parity_samples,
                    cfg.thresholds.probe_atol],
        store=cfg.store_url,
    )


def export_to_store(cfg: EdgeqConfig) -> ExportResult:
    """Export the config's model, gate it, and put the ONNX file in the store."""
    model = build_model(cfg.model)
    test, _ = load_inputs(cfg.data.test, cfg.model.inputs, cfg.data.preprocess)
    samples = take(test, slice(0, cfg.thresholds.parity_samples))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{cfg.model.name}.onnx"
        report = run_export(model, cfg.model, cfg.targets, samples, cfg.thresholds, out)
        ref = ArtifactStore(cfg.store_url).put_file(
            out, meta={"stage": "export", "opset": report.opset, "exporter": report.exporter}
        )
    return ExportResult(onnx=ref, report=report)


def publish_export_report(report: ExportReport, failed: str = "") -> None:
    """Markdown + table artifacts in the Prefect UI."""
    create_markdown_artifact(markdown=export_markdown(report, failed), key="export-report",
                             description=f"export of {report.model}")
    create_table_artifact(
        table=display_rows([r.model_dump() for r in report.parity] + [
            {"output": f"probe {p.input}[{p.axis}]={p.size}", "max_abs_diff": p.max_abs_diff, "passed": p.ok}
            for p in report.probe]),
        key="export-parity", description="PyTorch vs ONNX Runtime parity and dynamic-shape probe")


def export_markdown(report: ExportReport, failed: str = "") -> str:
    lines = [f"# Export of `{report.model}`: {'FAILED' if failed else 'passed'}", "",
             f"- opset **{report.opset}** ({report.opset_reason}); exporter `{report.exporter}`"]
    if failed:
        lines += ["", "```", failed, "```"]
    lines += ["", "## Parity (PyTorch vs ONNX Runtime)", "", "| output | max abs | max rel | worst sample | samples | tol | ok |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.output} | {r.max_abs_diff:.3g} | {r.max_rel_diff:.3g} | {r.worst_sample} | {r.samples} | {r.tolerance:g} | "
              f"{'yes' if r.passed else '**no**'} |" for r in report.parity]
    lines += ["", "## Dynamic-shape probe", "", "| input | axis | dim | size | max abs | ok | error |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p.input} | {p.axis} | {p.dim} | {p.size} | {MISSING if p.max_abs_diff is None else f'{p.max_abs_diff:.3g}'} | "
              f"{'yes' if p.ok else '**no**'} | {p.error} |" for p in report.probe]
    lines += ["", "## Graph scan (custom ops, control flow)", ""]
    if not report.findings:
        lines.append("No custom-domain ops and no control flow.")
    else:
        lines += ["| target | node | op | supported | note |", "|---|---|---|---|---|"]
        lines += [f"| {s.target} | {s.node} | {s.op} | {'yes' if s.supported else '**no**'} | {s.note} |" for s in report.target_support]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines)


@task(
    name="export",
    cache_key_fn=lambda ctx, params: export_cache_key(params["cfg"]),
    persist_result=True,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
)
def export_task(cfg: EdgeqConfig) -> ExportResult:
    try:
        return export_to_store(cfg)
    except GateError as exc:
        if exc.report is not None:  # refused after measuring: the report says what was measured
            publish_export_report(exc.report, failed=str(exc))
        raise
