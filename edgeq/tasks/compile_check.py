"""The compile-check stage: one cached task per target, a matrix artifact, and the gate before quantizing."""

from __future__ import annotations

import tempfile

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from edgeq.backends import CompileReport, get_backend
from edgeq.core.errors import CompileCheckFailed, EdgeqError
from edgeq.core.specs import TargetSpec
from edgeq.core.store import ArtifactRef, ArtifactStore
from edgeq.tasks.artifacts import display_rows, md_cell, short_text
from edgeq.tasks.caching import content_key, retry_transient

MATRIX_COLUMNS = ["target", "backend", "status", "unsupported ops", "control flow", "opset", "precision", "layout",
                  "batch", "compile s", "latency median ms", "latency p90 ms", "threads", "required", "reason"]


class BenchSettings(BaseModel):
    warmup: int = Field(10, ge=0, le=1000, description="untimed batch-1 runs before timing")
    iters: int = Field(100, ge=1, le=100_000, description="timed batch-1 runs (median and p90)")


class CompileMatrix(BaseModel):
    """Every target's compile report for one ONNX file: the exported FP32 graph, or the INT8 graph that will ship."""

    model: str
    onnx_sha256: str
    reports: list[CompileReport]
    graph: str = "FP32"  # or "INT8"

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([r.row() for r in self.reports], columns=MATRIX_COLUMNS)

    @property
    def failed_required(self) -> list[CompileReport]:
        return [r for r in self.reports if r.required and not r.ok]


def compile_check_key(onnx: ArtifactRef, target: TargetSpec, bench: BenchSettings, store_url: str) -> str:
    """ONNX content + target spec + the backend's fingerprint (toolchain version; a declared target's profile
    content) + pipeline version."""
    try:
        fingerprint = get_backend(target.backend).cache_fingerprint(target)
    except EdgeqError as exc:  # an unknown backend: check_target turns it into a failed row, cached like any other
        fingerprint = f"unavailable: {type(exc).__name__}"
    return content_key("compile-check", onnx=onnx.sha256, target=target.model_dump(mode="json"),
                       toolchain=fingerprint, bench=bench.model_dump(), store=store_url)


def check_target(onnx: ArtifactRef, target: TargetSpec, store_url: str,
                 bench: BenchSettings = BenchSettings()) -> CompileReport:
    """Compile-check one target; the prepared forms (IR, optimized ONNX) go to the store.

    An unknown backend name is a failed row naming the known ones (a bad target must not hide the others).
    """
    store = ArtifactStore(store_url)
    path = store.local_path(onnx)
    try:
        backend = get_backend(target.backend)
    except EdgeqError as exc:
        return CompileReport(target=target.name, backend=target.backend, device=target.device, required=target.required,
                             status="failed", reason=f"target {target.name!r}: {exc}", precision_asked=target.precision,
                             layout=target.layout, batch=target.batch)
    with tempfile.TemporaryDirectory() as tmp:
        report = backend.check_compiles(path, target, tmp, warmup=bench.warmup, iters=bench.iters)
        prepared = report.prepared
        if report.status == "compiled" and prepared is not None:
            meta = {"stage": "compile-check", "target": target.name, "backend": backend.name,
                    "onnx_sha256": onnx.sha256, "precision": report.precision, "layout": prepared.layout,
                    "batch": prepared.batch, "toolchain": report.toolchain}
            for role, file in prepared.files.items():
                if file.is_file():
                    report.artifacts[role] = store.put_file(file, meta={**meta, "role": role}).model_dump()
    return report


def gate_required_targets(matrix: CompileMatrix) -> None:
    """Raise CompileCheckFailed naming each required target that did not compile (and why)."""
    bad = matrix.failed_required
    if bad:
        lines = [f"- {r.target} ({r.backend}, {r.status}): {r.reason}" for r in bad]
        what, stop = ((f"model {matrix.model}", "the pipeline stops before quantization") if matrix.graph == "FP32" else
                      (f"the {matrix.graph} model of {matrix.model}", "it is neither validated nor published"))
        raise CompileCheckFailed(
            f"{len(bad)} required target(s) cannot take {what} (onnx {matrix.onnx_sha256[:12]}…); "
            f"{stop}. Fix the model or the target, or mark the target "
            "`required: false`:\n" + "\n".join(lines), report=matrix)


def matrix_markdown(matrix: CompileMatrix) -> str:
    lines = [f"# Compile check of `{matrix.model}` {matrix.graph} (onnx `{matrix.onnx_sha256[:12]}…`)", ""]
    bad = matrix.failed_required
    stop = "the pipeline stops before quantization" if matrix.graph == "FP32" else "the INT8 model is not published"
    lines.append(f"**{len(bad)} required target(s) failed**: {stop}." if bad
                 else "Every required target compiles (or passes its declared profile).")
    lines += ["", "`declared-ok` is a static check against a target profile, not a compile.", ""]
    lines += _markdown_table(matrix.table().drop(columns=["reason"]))
    reasons = [r for r in matrix.reports if r.reason or r.warnings]
    if reasons:
        lines += ["", "## Reasons and warnings", ""]
        for r in reasons:
            lines += [f"- **{r.target}** ({r.status}): {r.reason}"] + [f"  - warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def _markdown_table(df: pd.DataFrame) -> list[str]:
    def cell(v) -> str:
        return md_cell(None if isinstance(v, float) and pd.isna(v) else v)

    return (["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)])


STATUS_COLUMNS = ["target", "backend", "status", "required", "reason"]
DETAIL_COLUMNS = ["target", "opset", "precision", "layout", "batch", "compile s", "latency median ms",
                  "latency p90 ms", "threads", "control flow", "unsupported ops"]


def publish_matrix(matrix: CompileMatrix) -> None:
    """Table + markdown artifacts in the Prefect UI."""
    table = matrix.table().astype(object).where(matrix.table().notna(), None)
    suffix = "" if matrix.graph == "FP32" else f"-{matrix.graph.lower()}"
    rows = table.to_dict(orient="records")
    # Two tables: the UI shows a table's cells on one line, and all fifteen columns (2,300 px) put the reason
    # off-screen. First what failed and why (the full reasons are in the markdown report), then the measurements.
    create_table_artifact(
        table=display_rows({**{c: r.get(c) for c in STATUS_COLUMNS}, "reason": short_text(r.get("reason"))}
                           for r in rows),
        key=f"compile-matrix{suffix}",
        description=f"compile check of {matrix.model} {matrix.graph}: status per target (full reasons in "
                    f"compile-check-report{suffix}; measurements in compile-details{suffix})")
    create_table_artifact(
        table=display_rows({c: r.get(c) for c in DETAIL_COLUMNS} for r in rows), key=f"compile-details{suffix}",
        description=f"compile check of {matrix.model} {matrix.graph}: opset, precision, layout, compile time, "
                    "batch-1 latency")
    create_markdown_artifact(markdown=matrix_markdown(matrix), key=f"compile-check-report{suffix}",
                             description=f"compile check of {matrix.model} {matrix.graph}")


@task(
    name="compile-check",
    task_run_name="compile-check-{target.name}",
    cache_key_fn=lambda ctx, params: compile_check_key(params["onnx"], params["target"], params["bench"],
                                                       params["store_url"]),
    persist_result=True,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
)
def compile_check_task(onnx: ArtifactRef, target: TargetSpec, store_url: str, bench: BenchSettings) -> CompileReport:
    return check_target(onnx, target, store_url, bench)
