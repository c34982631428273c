"""The contract every runtime backend implements.

A backend answers, for one target (a `TargetSpec`):

- ``availability(device)``: can it run here at all, and why not;
- ``max_opset(target)``: the highest default-domain ONNX opset it reads;
- ``supports_node(domain, op_type, target)``: does it have this op;
- ``prepare(model_path, target, out_dir)``: the deployable form (static batch=1 unless the target
  asks ``batch: dynamic``, the target's layout, precision pinned) written under ``out_dir``;
- ``load_runner(prepared, target)``: a `Runner` (edgeq/backends/runner.py) on a prepared form;
- ``runner(model_path, target)``: prepare into a temporary folder and return a runner on it;
- ``check_compiles(model_path, target)``: a structured `CompileReport` (never raises for a target
  problem: an unsupported op, an opset too high or a failed compile is a ``failed`` row);
- ``explain_int8(model_path, target)``: why an INT8 model is (not) fast there, per op type: which quantized
  Conv/MatMul/Gemm run integer kernels and which still run in float (`KernelRow`s; the default says the
  backend cannot tell).

The stages never compare backend names: they ask a backend's capabilities (``compiles``,
``measures_latency``, ``ships_compiled_form``, ``default_device_stage``) and its per-target answers
(``int8_scheme``, ``no_compiled_form_reason``, ``cache_fingerprint``, ``runs_reference_runtime``), so a
new backend is one registry line, not an edit of every stage.

SDKs are imported inside methods, never at module level, so a missing toolchain costs an
"unavailable" row, not an import error.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field

from edgeq.backends.records import CompileReport, Int8Scheme, PreparedModel, UnsupportedOp
from edgeq.backends.runner import Runner, _TempRunner, benchmark
from edgeq.core.errors import EdgeqError, is_transient
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
from edgeq.core.platform import declared_x86_without_vnni, x86_without_vnni


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


def x86_cpu_scheme(runtime: str, declared_isa: list[str] | None = None) -> Int8Scheme:
    """U8S8 on the target's CPU; 7-bit weights where it has no VNNI (U8S8 saturation). The CPU is the one the target
    declares (`cpu_isa`: the model ships to another machine) or else this one."""
    if declared_isa is not None:
        without_vnni = declared_x86_without_vnni(declared_isa)
        cpu = f"the target's declared CPU (cpu_isa {', '.join(declared_isa)})"
    else:
        without_vnni, cpu = x86_without_vnni(), "this x86 CPU"
    if without_vnni:
        return Int8Scheme(types="u8s8", reduce_range=True, reason=(
            f"{runtime} on {cpu}, without VNNI: unsigned activations + signed weights, weights in 7 bits "
            "(reduce_range) because U8S8 kernels without VNNI saturate (measured: 30 output steps off OpenVINO "
            "on the demo with 8-bit weights, 1 step with 7-bit)"))
    return Int8Scheme(types="u8s8", reason=(
        f"{runtime} on {cpu if declared_isa is not None else 'an x86 CPU'}: unsigned activations + signed weights "
        "map onto VNNI kernels; measured, signed "
        "activations left ops unfused and ran no faster than FP32"))


# ---------------------------------------------------------------- INT8 kernels
class KernelRow(BaseModel):
    """One op type of an INT8 model as a runtime runs it: how many of its nodes run an integer kernel, how many
    quantized ones still run in float (a DequantizeLinear feeding a float op: not fused), and which.

    `note` alone ("not available: why") when the runtime cannot say. Times (ONNX Runtime's profiler, OpenVINO's
    PERF_COUNT) are the sum over these nodes of each one's median ms per inference, in the INT8 model and in the
    FP32 model on the same target; the profilers' own overhead inflates them a little, so compare rows, not totals.
    """

    runtime: str
    target: str
    op_type: str = Field(description="the model's op (Conv, MatMul, Gemm) or the runtime's layer type")
    integer: int = 0
    float_quantized: int = Field(0, description="quantized in the model, run in float (DequantizeLinear -> float op)")
    float_unquantized: int = Field(0, description="float in the model (kept FP32 by the quantizer), run in float")
    kernels: str = Field("", description="what ran, e.g. 'QLinearConv x3' or 'jit_gemm_i8 x12 (i8)'")
    unfused: list[str] = Field(default_factory=list, description="names of the quantized nodes that run in float")
    int8_ms: float | None = None
    fp32_ms: float | None = None
    fp32_kernels: str = ""
    note: str = ""

    def row(self) -> dict:
        """The flat table row shown in the Prefect UI."""
        named = ", ".join(self.unfused[:20]) + (f" … (+{len(self.unfused) - 20})" if len(self.unfused) > 20 else "")
        return {"target": self.target, "runtime": self.runtime, "op": self.op_type, "integer kernel": self.integer,
                "float (quantized, not fused)": self.float_quantized, "float (kept FP32)": self.float_unquantized,
                "kernels": self.kernels, "int8 ms": None if self.int8_ms is None else round(self.int8_ms, 4),
                "fp32 ms": None if self.fp32_ms is None else round(self.fp32_ms, 4), "fp32 kernels": self.fp32_kernels,
                "not fused": named, "note": self.note}


# Ops that move or reshape data without computing on it: a DequantizeLinear behind them still feeds the next op.
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "ReorderInput",
                           "ReorderOutput", "Cast", "Expand", "Gather", "Slice", "Split", "Concat"})


def dequantized_inputs(graph) -> dict[str, list[str]]:
    """node name -> its inputs that come from a DequantizeLinear (directly or through data-movement ops)."""
    producer = {o: n for n in graph.node for o in n.output}

    def from_dq(name: str, depth: int = 0) -> bool:
        node = producer.get(name)
        if node is None or depth > 6:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        return node.op_type in _PASS_THROUGH and bool(node.input) and from_dq(node.input[0], depth + 1)

    return {node_label(n): [i for i in n.input if i and from_dq(i)] for n in graph.node}


def kernel_counts(names: list[str]) -> str:
    """'A x2, B x1' in order of frequency."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ---------------------------------------------------------------- backend
class Backend(ABC):
    """One runtime. Subclasses import their SDK inside methods, never at module level."""

    name: ClassVar[str]
    # Capabilities: what the stages ask of a backend instead of comparing its name.
    compiles: ClassVar[bool] = True  # False: a static check only; no prepare, no runner on this machine
    measures_latency: ClassVar[bool] = True  # its runner can be timed here (quantization attempts, matrix rows)
    ships_compiled_form: ClassVar[bool] = True  # the bundle carries its prepared form (IR, engine)
    default_device_stage: ClassVar[bool] = False  # picked as four-way validation's device INT8 stage by default
    # The PTQ engine whose models this runtime is built to run fast (quantization.target_forms: fastest tries it for
    # a target of this backend when the ladder did not): NNCF for OpenVINO. None: no engine of its own.
    native_ptq_engine: ClassVar[str | None] = None

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
        """Toolchain version, as shown in the compile matrix."""
        return ""

    def cache_fingerprint(self, target) -> str:
        """What, besides the model and the target spec, decides this target's compile-check row.

        Part of the compile-check cache key: a new toolchain (or, for a declared target, an edited
        profile) must miss the cache. A toolchain that cannot even report its version is part of the
        key too, so installing it later misses.
        """
        try:
            return self.version()
        except Exception as exc:  # noqa: BLE001 - a broken SDK import is still a distinct key
            return f"unavailable: {type(exc).__name__}"

    def check_target(self, target) -> None:
        """Refuse a target spec this backend cannot use (a missing field), naming it; runs when a config loads."""

    def int8_scheme(self, target) -> Int8Scheme:
        """The INT8 types this target's kernels want (default: symmetric signed, what accelerators take)."""
        return Int8Scheme(types="s8s8", reason=f"{self.name}: accelerator INT8 kernels take symmetric signed "
                                               "activations and weights")

    def no_compiled_form_reason(self, target) -> str:
        """Why a published bundle has no prepared form for `target` (read when `ships_compiled_form` is False)."""
        return f"backend {self.name!r} ships no compiled form"

    def explain_int8(self, model_path: str | Path, target, fp32_path: str | Path | None = None,
                     feeds: dict | None = None) -> list[KernelRow]:
        """Per op type, how the runtime runs the INT8 model at `model_path` on `target`: integer kernels against
        quantized nodes left in float, naming those (`fp32_path`/`feeds`: the FP32 model and real batch-1 inputs,
        for a runtime that times layers). Default: one row saying this backend cannot tell."""
        return [KernelRow(runtime=self.name, target=target.name, op_type="-",
                          note=f"not available: the {self.name} backend does not report the kernels each layer ran")]

    def runs_reference_runtime(self, target) -> bool:
        """Whether `target` runs a model on the runtime and device of four-way validation's ONNX rows (ONNX
        Runtime's CPU provider): as the device stage it would hold ONNX Runtime against itself."""
        return False

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
                if run_benchmark and self.measures_latency:
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
