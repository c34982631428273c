"""The contract every runtime backend implements.

A backend answers, for one target (a `TargetSpec`):

- ``availability(device)``: can it run here at all, and why not;
- ``max_opset(target)``: the highest default-domain ONNX opset it reads;
- ``supports_node(domain, op_type, target)``: does it have this op;
- ``prepare(model_path, target, out_dir)``: the deployable form (static batch=1 unless the target
  asks ``batch: dynamic``, the target's layout, precision pinned) written under ``out_dir``;
- ``load_runner(prepared, target)``: a `Runner` on a prepared form;
- ``runner(model_path, target)``: prepare into a temporary folder and return a runner on it;
- ``check_compiles(model_path, target)``: a structured `CompileReport` (never raises for a target
  problem: an unsupported op, an opset too high or a failed compile is a ``failed`` row).

A `Runner` is a small context manager in the style of Polygraphy's runners: the public
``infer(feeds)`` checks input names, dtypes and static shapes once, then calls ``infer_impl``;
a new runtime (or a remote device behind a command or a service) writes only
``activate_impl / infer_impl / deactivate_impl``::

    backend = get_backend("openvino")
    with backend.runner("model.onnx", target) as r:
        outputs = r.infer({"image": x})          # {output name: np.ndarray}
        print(r.precision, r.threads)            # what actually ran
        latency = benchmark(r, {"image": x})     # LatencyReport(median_ms, p90_ms, ...)

SDKs are imported inside methods, never at module level, so a missing toolchain costs an
"unavailable" row, not an import error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr

from edgeq.core.errors import EdgeqError, ModelFileError, RunnerError, is_transient
from edgeq.core.onnx_graph import (
    CONTROL_FLOW_OPS,
    STANDARD_DOMAINS,
    TensorMeta,
    iter_nodes,
    load_onnx,
    model_opset,
    node_label,
    sample_feeds,
)
from edgeq.core.platform import x86_without_vnni

Status = Literal["compiled", "declared-ok", "failed", "unavailable"]


# ---------------------------------------------------------------- records
class UnsupportedOp(BaseModel):
    node: str
    op_type: str
    domain: str = ""
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain not in STANDARD_DOMAINS else self.op_type


class LatencyReport(BaseModel):
    """Batch-1 latency of one runner; what ran is recorded next to the numbers."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    iters: int
    warmup: int
    threads: int
    precision: str
    batch: int = 1


class CompileReport(BaseModel):
    """One row of the compile-check matrix."""

    target: str
    backend: str
    device: str
    required: bool = True
    status: Status
    reason: str = Field("", description="why failed/unavailable, naming the op, node, field or value to change")
    unsupported_ops: list[UnsupportedOp] = Field(default_factory=list)
    control_flow: list[str] = Field(default_factory=list, description="'If (node n)' for each control-flow node")
    control_flow_supported: bool | None = None
    opset: int | None = None
    max_opset: int | None = None
    precision_asked: str = ""
    precision: str = Field("", description="what actually ran, as the runtime reports it")
    layout: str = ""
    batch: str = ""
    input_shapes: dict[str, list[int | str]] = Field(default_factory=dict)
    compile_s: float | None = None
    latency: LatencyReport | None = None
    toolchain: str = ""
    warnings: list[str] = Field(default_factory=list)
    artifacts: dict[str, Any] = Field(default_factory=dict, description="name -> ArtifactRef of the prepared forms")
    # The prepared form of a compiled row (files under the caller's out_dir); not serialized.
    _prepared: Any = PrivateAttr(default=None)

    @property
    def prepared(self) -> "PreparedModel | None":
        return self._prepared

    @property
    def ok(self) -> bool:
        return self.status in ("compiled", "declared-ok")

    def row(self) -> dict[str, Any]:
        """The flat matrix row shown in the Prefect UI and the CLI."""
        lat = self.latency
        cf = "none" if not self.control_flow else (
            f"{len(self.control_flow)} node(s): " + ("supported" if self.control_flow_supported else "UNSUPPORTED"))
        return {
            "target": self.target, "backend": self.backend, "device": self.device,
            "required": self.required, "status": self.status,
            "unsupported ops": ", ".join(f"{u.label} ({u.node})" for u in self.unsupported_ops) or "-",
            "control flow": cf,
            "opset": f"{self.opset}/{self.max_opset}" if self.opset is not None else "-",
            "precision": self.precision or "-", "layout": self.layout or "-", "batch": self.batch or "-",
            "compile s": round(self.compile_s, 3) if self.compile_s is not None else None,
            "latency median ms": round(lat.median_ms, 4) if lat else None,
            "latency p90 ms": round(lat.p90_ms, 4) if lat else None,
            "threads": lat.threads if lat else None,
            "reason": self.reason,
        }


class Int8Scheme(BaseModel):
    """The INT8 form a target runs fastest and correctly: activation/weight types, 7-bit weights, and why."""

    types: Literal["u8s8", "s8s8"]
    reduce_range: bool = False
    reason: str


class PreparedModel(BaseModel):
    """A deployable form written by `Backend.prepare`: the file to run and what it takes."""

    backend: str
    target: str
    path: Path = Field(description="the main file (.onnx, .xml, .engine)")
    files: dict[str, Path] = Field(default_factory=dict, description="every file to ship, by role")
    inputs: list[TensorMeta]
    outputs: list[str]
    layout: str
    batch: str
    precision: str = Field(description="asked precision, as the runtime spells it")
    warnings: list[str] = Field(default_factory=list)


def fix_batch(inputs: list[TensorMeta], batch: str, dims: dict[str, int] | None = None) -> tuple[dict[str, list[int | str]], list[str]]:
    """Shapes of the deployable form: axis 0 fixed to 1 for static1, named dims from `dims`.

    Returns (shapes, warnings); a dimension left dynamic is kept by name and warned about.
    """
    dims = dims or {}
    shapes, notes = {}, []
    for meta in inputs:
        shape: list[int | str] = []
        for axis, d in enumerate(meta.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            elif axis == 0 and batch == "static1":
                shape.append(1)
            else:
                shape.append(d if isinstance(d, str) else "?")
                notes.append(f"input {meta.name!r} axis {axis} ({d!r}) stays dynamic: pass its size in dims")
        shapes[meta.name] = shape
    return shapes, notes


def x86_cpu_scheme(runtime: str) -> Int8Scheme:
    """U8S8 on this machine's CPU; 7-bit weights where it has no VNNI (U8S8 saturation)."""
    if x86_without_vnni():
        return Int8Scheme(types="u8s8", reduce_range=True, reason=(
            f"{runtime} on this x86 CPU without VNNI: unsigned activations + signed weights, weights in 7 bits "
            "(reduce_range) because U8S8 kernels without VNNI saturate (measured: 30 output steps off OpenVINO "
            "on the demo with 8-bit weights, 1 step with 7-bit)"))
    return Int8Scheme(types="u8s8", reason=(
        f"{runtime} on an x86 CPU: unsigned activations + signed weights map onto VNNI kernels; measured, signed "
        "activations left ops unfused and ran no faster than FP32"))


# ---------------------------------------------------------------- runner
class Runner(ABC):
    """A context manager that runs one prepared model on named inputs (Polygraphy-style).

    Subclasses set ``self.inputs`` / ``self.outputs`` / ``self.precision`` / ``self.threads`` in
    ``activate_impl`` and implement ``infer_impl``; ``infer`` checks the feeds first.
    """

    def __init__(self, name: str, target: str = ""):
        self.name = name
        self.target = target
        self.is_active = False
        self.inputs: list[TensorMeta] = []
        self.outputs: list[str] = []
        self.precision = ""
        self.threads = 0
        self.batch = "static1"

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    # -- inference ---------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named inputs; returns {output name: array}. Shape/name/dtype mistakes raise RunnerError."""
        if not self.is_active:
            raise RunnerError(f"{self.name}: runner is not active; use it as `with backend.runner(...) as r:`")
        self.check_feeds(feeds)
        return self.infer_impl(feeds)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        want = {m.name: m for m in self.inputs}
        missing = sorted(set(want) - set(feeds))
        extra = sorted(set(feeds) - set(want))
        if missing or extra:
            raise RunnerError(f"{self.name}: feeds must be exactly the inputs {sorted(want)}; "
                              f"missing {missing}, unexpected {extra}")
        for name, meta in want.items():
            arr = np.asarray(feeds[name])
            if arr.dtype.name != meta.dtype:
                raise RunnerError(f"{self.name}: input {name!r} is {arr.dtype.name} but the model takes {meta.dtype}")
            if len(arr.shape) != len(meta.shape) or any(
                    isinstance(d, int) and d != got for d, got in zip(meta.shape, arr.shape)):
                hint = ""
                if (self.batch == "static1" and meta.shape and meta.shape[0] == 1 and arr.ndim == len(meta.shape)
                        and arr.shape[0] != 1):
                    hint = (f" — this is the static batch=1 form: feed one sample at a time, or set `batch: dynamic` "
                            f"on target {self.target!r}")
                raise RunnerError(f"{self.name}: input {name!r} has shape {list(arr.shape)} but the prepared model "
                                  f"takes {list(meta.shape)}{hint}")

    @abstractmethod
    def activate_impl(self) -> None:
        """Build the session/compiled model; set inputs, outputs, precision, threads."""

    @abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on checked feeds."""

    def deactivate_impl(self) -> None:
        """Release the session."""


class _TempRunner(Runner):
    """Wraps a runner on a form prepared into a temporary folder, removed on deactivate."""

    def __init__(self, inner: Runner, tmp: str):
        super().__init__(inner.name, inner.target)
        self._inner, self._tmp = inner, tmp

    def activate_impl(self) -> None:
        self._inner.activate()
        for attr in ("inputs", "outputs", "precision", "threads", "batch"):
            setattr(self, attr, getattr(self._inner, attr))

    def infer_impl(self, feeds):
        return self._inner.infer_impl(feeds)

    def deactivate_impl(self) -> None:
        try:
            self._inner.deactivate()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def benchmark(runner: Runner, feeds: dict[str, np.ndarray] | None = None, warmup: int = 10,
              iters: int = 100) -> LatencyReport:
    """Batch-1 latency: `warmup` untimed runs, then `iters` timed runs; median and p90 in ms.

    `runner` must be active; feeds default to random inputs of the runner's shapes.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"benchmark needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    feeds = feeds if feeds is not None else sample_feeds(runner.inputs)
    batch = {int(np.asarray(v).shape[0]) for v in feeds.values() if np.asarray(v).ndim}
    if batch and batch != {1}:
        raise RunnerError(f"{runner.name}: the latency benchmark runs batch 1; feeds have batch {sorted(batch)}")
    runner.check_feeds(feeds)
    for _ in range(warmup):
        runner.infer_impl(feeds)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter_ns()
        runner.infer_impl(feeds)
        times[i] = (time.perf_counter_ns() - t0) / 1e6
    return LatencyReport(median_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)),
                         mean_ms=float(times.mean()), min_ms=float(times.min()), iters=iters, warmup=warmup,
                         threads=runner.threads, precision=runner.precision)


def default_threads() -> int:
    """CPUs this process may use (what a pinned thread count defaults to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- backend
class Backend(ABC):
    """One runtime. Subclasses import their SDK inside methods, never at module level."""

    name: ClassVar[str]
    # Capabilities: what the stages ask of a backend instead of comparing its name.
    compiles: ClassVar[bool] = True  # False: a static check only ("declared")
    measures_latency: ClassVar[bool] = True  # can time the model on this machine
    ships_compiled_form: ClassVar[bool] = True  # the bundle carries its prepared form (IR, engine)
    default_device_stage: ClassVar[bool] = False  # the default on-device INT8 stage of four-way validation

    # -- what it is --------------------------------------------------------
    @abstractmethod
    def availability(self, device: str = "cpu") -> tuple[bool, str]:
        """(available, reason when not) on this machine for `device`."""

    @abstractmethod
    def max_opset(self, target=None) -> int:
        """Highest default-domain ONNX opset the installed runtime (or the target's profile) supports."""

    @abstractmethod
    def supports_node(self, domain: str, op_type: str, target=None) -> bool:
        """Whether the runtime has an implementation for this op (any version)."""

    def version(self) -> str:
        """Toolchain version (part of the compile-check cache key)."""
        return ""

    def int8_scheme(self, target) -> Int8Scheme:
        """The INT8 types this target's kernels want (default: symmetric signed, what accelerators take)."""
        return Int8Scheme(types="s8s8", reason=f"{self.name}: accelerator INT8 kernels take symmetric signed "
                                               "activations and weights")

    # -- deployable form and runner ---------------------------------------
    @abstractmethod
    def prepare(self, model_path: str | Path, target, out_dir: str | Path,
                dims: dict[str, int] | None = None) -> PreparedModel:
        """Write the deployable form of the ONNX model for `target` under `out_dir`."""

    @abstractmethod
    def load_runner(self, prepared: PreparedModel, target) -> Runner:
        """An (inactive) runner on a prepared form."""

    def runner(self, model_path: str | Path, target, dims: dict[str, int] | None = None) -> Runner:
        """Prepare `model_path` for `target` in a temporary folder and return an inactive runner on it."""
        tmp = tempfile.mkdtemp(prefix=f"edgeq-{self.name}-")
        try:
            prepared = self.prepare(model_path, target, tmp, dims)
            return _TempRunner(self.load_runner(prepared, target), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- compile check -----------------------------------------------------
    def compile_error_ops(self, message: str, model) -> list[UnsupportedOp]:
        """Ops named in a runtime's compile error (hook; default: none recognised)."""
        return []

    def error_summary(self, message: str) -> str:
        """The part of a runtime's error a user needs (hook; default: all of it)."""
        return message

    def check_compiles(self, model_path: str | Path, target, out_dir: str | Path | None = None, *,
                       dims: dict[str, int] | None = None, run_benchmark: bool = True, warmup: int = 10,
                       iters: int = 100) -> CompileReport:
        """Can `target` compile and run this model? A structured report; a target problem is a failed row.

        Raises ModelFileError only when the file itself is unreadable (the same for every target).
        """
        report = CompileReport(target=target.name, backend=self.name, device=target.device, required=target.required,
                               status="failed", precision_asked=target.precision, layout=target.layout,
                               batch=target.batch, toolchain=self.version())
        ok, why = self.availability(target.device)
        if not ok:
            report.status, report.reason = "unavailable", why
            return report
        model = load_onnx(model_path)
        self._static_checks(model, target, report)
        if not self.compiles:
            self.declared_checks(model, target, report, dims)
            report.status = "failed" if report.reason else "declared-ok"
            return report
        if report.opset > report.max_opset:  # the runtime would misread or refuse the model
            return report

        tmp = None
        if out_dir is None:
            tmp = out_dir = tempfile.mkdtemp(prefix=f"edgeq-check-{self.name}-")
        try:
            t0 = time.perf_counter()
            try:
                prepared = self.prepare(model_path, target, out_dir, dims)
                runner = self.load_runner(prepared, target)
                runner.activate()
            except EdgeqError as exc:
                report.compile_s = time.perf_counter() - t0
                self._fail(report, str(exc), model)
                return report
            except Exception as exc:  # noqa: BLE001 - the runtime's own message names the node
                if is_transient(exc):
                    raise  # a busy device is retried by the task, never cached as a failed row
                report.compile_s = time.perf_counter() - t0
                self._fail(report, f"{type(exc).__name__}: {_squash(exc)}", model)
                return report
            report.compile_s = time.perf_counter() - t0
            report.warnings += prepared.warnings
            report.input_shapes = {m.name: list(m.shape) for m in prepared.inputs}
            report.precision = runner.precision
            try:
                feeds = sample_feeds(runner.inputs)
                runner.infer(feeds)
                if run_benchmark:
                    report.latency = benchmark(runner, feeds, warmup=warmup, iters=iters)
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc):
                    raise  # a busy device is retried by the task, never cached as a failed row
                self._fail(report, f"compiled, but the first inference failed: {type(exc).__name__}: {_squash(exc)}", model)
                return report
            finally:
                runner.deactivate()
            mismatch = self.precision_mismatch(target, runner.precision)
            if mismatch:
                report.reason = mismatch
                return report
            if report.unsupported_ops:
                report.warnings.append(
                    "compiled although the op scan flagged " + ", ".join(u.label for u in report.unsupported_ops))
            report.status, report.reason = "compiled", ""
            if tmp is None:
                report._prepared = prepared
            return report
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def precision_mismatch(self, target, ran: str) -> str:
        """A reason when the runtime reports a precision other than the one asked (hook)."""
        return ""

    def declared_checks(self, model, target, report: CompileReport, dims) -> None:
        """Static checks of a declared backend (hook; only called when `compiles` is False)."""

    def _static_checks(self, model, target, report: CompileReport) -> None:
        opset = model_opset(model)
        limit = self.max_opset(target)
        who = f"{self.name} supports up to {limit}"
        if target.max_opset is not None and target.max_opset < limit:
            limit, who = target.max_opset, f"targets[{target.name}].max_opset is {target.max_opset}"
        report.opset, report.max_opset = opset, limit
        cf, cf_ok = [], True
        for node in iter_nodes(model):
            domain = node.domain if node.domain not in STANDARD_DOMAINS else ""
            if node.op_type in CONTROL_FLOW_OPS and domain == "":
                cf.append(f"{node.op_type} (node {node_label(node)})")
                cf_ok = cf_ok and self.supports_node("", node.op_type, target)
            elif not self.supports_node(domain, node.op_type, target):
                if not any(u.node == node_label(node) for u in report.unsupported_ops):
                    report.unsupported_ops.append(UnsupportedOp(
                        node=node_label(node), op_type=node.op_type, domain=domain,
                        reason=f"{self.name} has no implementation of {domain + '::' if domain else ''}{node.op_type}"))
        report.control_flow, report.control_flow_supported = cf, (cf_ok if cf else None)
        reasons = []
        if opset > limit:
            reasons.append(f"model opset {opset} is above target {target.name!r}'s maximum {limit} ({who}): "
                           f"re-export at opset <= {limit} (include this target in the export's config)")
        if report.unsupported_ops:
            reasons.append(_ops_reason(report.unsupported_ops, target.name))
        if cf and not cf_ok:
            reasons.append(f"control flow not supported on target {target.name!r}: {', '.join(cf)}")
        report.reason = "; ".join(reasons)

    def _fail(self, report: CompileReport, message: str, model) -> None:
        for u in self.compile_error_ops(message, model):
            if not any(x.node == u.node for x in report.unsupported_ops):
                report.unsupported_ops.append(u)
        prefix = _ops_reason(report.unsupported_ops, report.target) + "; " if report.unsupported_ops else ""
        report.status = "failed"
        report.reason = (f"{prefix}{self.name} could not compile it for target {report.target!r}: "
                         f"{self.error_summary(message)}")


def _ops_reason(ops: list[UnsupportedOp], target: str) -> str:
    listed = ", ".join(f"{u.label} (node {u.node!r})" for u in ops[:10])
    more = f" and {len(ops) - 10} more" if len(ops) > 10 else ""
    return (f"unsupported op(s) on target {target!r}: {listed}{more} — replace them in the model, "
            "or give the runtime a custom-op library/plugin")


def _squash(exc: BaseException, limit: int = 600) -> str:
    return " ".join(str(exc).split())[:limit]
