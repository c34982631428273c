"""Four-way validation with ship gates: PyTorch FP32, ONNX FP32, ONNX INT8, on-device INT8.

Same held-out samples, same metric, for every stage; each adjacent pair is gated:
  PyTorch FP32 -> ONNX FP32   max abs output diff <= export tolerance; on failure, the first ONNX node
                              whose output departs from a fresh export of the PyTorch model is named.
  ONNX FP32   -> ONNX INT8    metric drop <= INT8 SLA; on failure, the per-layer sensitivity table.
  ONNX INT8   -> device INT8  outputs within N quantization steps of the output (the step read from the
                              INT8 graph, never from the outputs it judges) and top-1 agreement >= the
                              floor on the confident samples. INT8 runtimes legitimately differ by a
                              step (OpenVINO rounds half away from zero, ONNX Runtime half to even), so
                              bit equality would be the wrong gate. The device stage must be another
                              runtime or device than the ONNX INT8 row, or the gate is reported as not run.

Every stage feeds all of the model's named inputs (a Batch, `{input name: array}`) and runs all of its outputs.
The metric scores the first output (`metric_output`); export parity and device agreement hold EVERY output against
its tolerance, one gate row per output. The top-1 clause applies to a classifier's output (metric `top1`, the first
output); for any other output (an embedding, a box regressor) it reads "n/a: not a classifier" and the max-abs clause
alone gates. An embedder (`cosine`, scored against the FP32 PyTorch outputs) also reports retrieval agreement
(overlap of the 10 nearest neighbours with FP32) per stage.
"""

from __future__ import annotations

import base64
import io
import tempfile
import time
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import BaseModel, Field

from edgeq.backends import benchmark, get_backend, known_backends
from edgeq.calibration.readers import CalibrationReader
from edgeq.core.compare import OutputComparison, Tolerance, compare_output, min_cosine, step_tolerance, top1_text
from edgeq.core.data import batch_size, take
from edgeq.core.errors import GateError, SpecError
from edgeq.core.metrics import extra_metrics, score
from edgeq.core.onnx_graph import OutputStep, load_onnx, output_step
from edgeq.core.quiet import muted_output
from edgeq.core.specs import EdgeqConfig, TargetSpec
from edgeq.export import export_onnx, make_inputs, parity_tolerance, run_onnx
from edgeq.quantization.ptq import as_batch, preprocess_model
from edgeq.quantization.sensitivity import sensitivity_table


class StageRow(BaseModel):
    stage: str
    runtime: str
    metric: float
    ci95: float
    samples: int
    latency_ms: float | None = None
    precision: str = ""
    extra_metrics: dict[str, float] = Field(default_factory=dict)  # e.g. retrieval overlap@10 with FP32 (embedders)


class GateRow(BaseModel):
    gate: str
    pair: str
    output: str = ""  # the model output this row compares (parity and device agreement: one row per output)
    measured: str
    threshold: str
    passed: bool
    max_abs_diff: float | None = None
    top1_agreement: float | None = None  # on every sample
    confident_top1_agreement: float | None = None  # on the samples whose reference top-1 margin exceeds the tolerance
    tolerance: float | None = None  # in output units
    tolerance_source: str = ""  # where the tolerance's step was read (the INT8 graph), or why the floor applies
    ran: bool = True  # False: nothing independent to compare (`measured` says why); never counts as passed
    waived: bool = False  # a gate that did not run, accepted by the config: it does not block publishing
    where: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def result(self) -> str:
        if self.ran:
            return "PASS" if self.passed else "FAIL"
        return "NOT RUN, waived by the config" if self.waived else "NOT RUN"


class ValidationReport(BaseModel):
    model: str
    metric_name: str
    samples: int
    metric_output: str = ""  # the output the metric scores (the model's first)
    outputs: list[str] = Field(default_factory=list)  # every output compared
    calibration_version: str
    device_target: str
    stages: list[StageRow]
    gates: list[GateRow]
    notes: list[str] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed or g.waived for g in self.gates)

    def failed_gates(self) -> list[GateRow]:
        """Gates that block publishing: failed, or not run without the config accepting it."""
        return [g for g in self.gates if not (g.passed or g.waived)]


# ---------------------------------------------------------------- data hygiene
def check_disjoint(test_ids: list[str], calibration_ids: set[str], version: str) -> None:
    """The test split must share no sample with the calibration version.

    Compared by content identity (`edgeq.core.data.content_ids`: the model's input after data.preprocess, in
    the model's layout), so a test split stored as scaled float32 or channels-last still meets the uint8
    captures it shares with the calibration set; sources that cannot be put in one form were refused there.
    """
    overlap = sum(i in calibration_ids for i in test_ids)
    if overlap:
        raise GateError(
            f"the test split shares {overlap} of {len(test_ids)} samples with calibration version {version} "
            "(the same model input after data.preprocess): a held-out set must be disjoint from the calibration "
            "set — fix data.test or rebuild the calibration set from captures that exclude the test split"
        )


# ---------------------------------------------------------------- runners
def _torch_outputs(model: torch.nn.Module, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    out = model(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().numpy() for o in outs]


def run_torch_batched(model: torch.nn.Module, x: Mapping[str, np.ndarray] | np.ndarray,
                      outputs: Sequence[str] | None = None) -> dict[str, np.ndarray] | np.ndarray:
    """The PyTorch model over a Batch (every input, in the model's input order) in chunks of 256: {output name:
    array} for `outputs` (the model's outputs in order). One array in: the first output's array out."""
    if not isinstance(x, Mapping):
        return run_torch_batched(model, {"x": x}, ["y"])["y"]
    n = batch_size(x)
    parts: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, n, 256):
            parts.append(_torch_outputs(model, take(x, slice(i, i + 256))))
    names = list(outputs) if outputs is not None else [str(j) for j in range(len(parts[0]))]
    if len(parts[0]) != len(names):
        raise SpecError(f"the PyTorch model returns {len(parts[0])} output(s) but model.outputs names {len(names)} "
                        f"({names})")
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def torch_latency(model: torch.nn.Module, sample: Mapping[str, np.ndarray] | np.ndarray, iters: int) -> float:
    """Batch-1 latency of the PyTorch model: `sample` is batch-1 feeds of every input, or one sample (no batch
    axis) of a one-input model."""
    feeds = dict(sample) if isinstance(sample, Mapping) else {"x": sample[None]}
    ts = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
    with torch.no_grad():
        for _ in range(max(5, iters // 10)):
            model(*ts)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(*ts)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _batch1(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:1]) for k, v in x.items()}


def run_target(path: Path, target: TargetSpec, x: Mapping[str, np.ndarray], outputs: Sequence[str],
               iters: int) -> tuple[dict[str, np.ndarray], float | None, str]:
    """Every output ({name: array}) over the Batch `x` (every input fed; sample by sample on a static batch-1
    form), the batch-1 latency on a real sample (None on a backend whose runs cannot be timed here: a `command`
    device), and the precision that really ran. An output the target does not return is absent from the dict (the
    comparison names it)."""
    backend = get_backend(target.backend)
    ok, why = backend.availability(target.device)
    if not ok:
        raise SpecError(f"device target {target.name} is unavailable: {why}")
    with backend.runner(path, target) as runner:
        if target.batch == "dynamic":  # one call for the whole split (a remote device pays per call)
            results = [runner.infer(dict(x))]
        else:
            results = [runner.infer(take(x, slice(i, i + 1))) for i in range(batch_size(x))]
        lat = benchmark(runner, _batch1(x), warmup=max(5, iters // 10), iters=iters) if backend.measures_latency \
            else None
        precision = runner.precision
    outs = {name: np.concatenate([r[name] for r in results]) for name in outputs if all(name in r for r in results)}
    return outs, (lat.median_ms if lat else None), precision


def pick_device_target(cfg: EdgeqConfig) -> TargetSpec:
    name = cfg.validation.device_target
    if name:
        t = next((t for t in cfg.targets if t.name == name), None)
        if t is None:
            raise SpecError(f"validation.device_target {name!r} is not one of the targets "
                            f"({', '.join(t.name for t in cfg.targets)})")
        return t
    # An unknown backend name is the compile check's failed row, not a reason to refuse picking here.
    t = next((t for t in cfg.targets if t.backend in known_backends() and get_backend(t.backend).default_device_stage
              and not get_backend(t.backend).runs_reference_runtime(t)), None)
    if t is None:
        raise SpecError("no device target: set validation.device_target (the default is the first openvino target)")
    return t


def not_independent(target: TargetSpec) -> str:
    """Why `target` as the device stage would check nothing ('' when it runs another runtime or device than the
    ONNX INT8 row): the backend says whether it runs the reference runtime."""
    if target.backend in known_backends() and get_backend(target.backend).runs_reference_runtime(target):
        return (f"device target {target.name!r} runs the INT8 model on the runtime and device of the ONNX INT8 row "
                f"({target.backend} on {target.device}), so the two rows agree by construction")
    return ""


def check_device_stage(cfg: EdgeqConfig) -> TargetSpec:
    """The device stage's target, refused before any work when it is not independent of the ONNX INT8 row, unless
    the config accepts a conversion without an independent device check."""
    target = pick_device_target(cfg)
    why = not_independent(target)
    if why and cfg.validation.require_independent_device:
        raise SpecError(
            f"validation.device_target: {why}: no independent device check would run. Name a target on another "
            "runtime or device as validation.device_target (openvino, a board through the command backend, ...), or "
            "set validation.require_independent_device: false to convert without one (the device agreement gate is "
            "then reported as not run)")
    return target


# ---------------------------------------------------------------- localization
def _feeds(x: Mapping[str, np.ndarray] | np.ndarray, input_name: str | None) -> dict[str, np.ndarray]:
    if isinstance(x, Mapping):
        return dict(x)
    if input_name is None:
        raise TypeError("one array of samples needs its input name")
    return {input_name: x}


def _all_activations(path: Path, x: Mapping[str, np.ndarray] | np.ndarray,
                     input_name: str | None = None) -> dict[str, np.ndarray]:
    """Every intermediate tensor of the model at `path` over the samples of every input (a Batch)."""
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    feeds = _feeds(x, input_name)
    with tempfile.TemporaryDirectory() as tmp, muted_output():
        aug = Path(tmp) / "aug.onnx"
        modify_model_output_intermediate_tensors(str(path), str(aug))
        acts = collect_activations(str(aug), CalibrationReader(feeds, {k: v.dtype for k, v in feeds.items()}))
    return {k: np.concatenate(v) for k, v in acts.items()}


def first_departing_node(reference: Path, candidate: Path, x: Mapping[str, np.ndarray] | np.ndarray,
                         input_name: str | None, atol: float) -> list[dict[str, Any]]:
    """Walk the reference graph in order; the first node whose output differs in `candidate` beyond `atol`, both
    run on the samples of every input (`x` a Batch; one array feeds `input_name`)."""
    ref_acts = _all_activations(reference, x, input_name)
    cand_acts = _all_activations(candidate, x, input_name)
    graph = onnx.load(str(reference), load_external_data=False).graph
    compared = 0
    for node in graph.node:
        for out in node.output:
            if out in ref_acts and out in cand_acts and ref_acts[out].shape == cand_acts[out].shape:
                compared += 1
                diff = float(np.abs(ref_acts[out].astype(np.float64) - cand_acts[out]).max())
                if diff > atol:
                    return [{"node": node.name, "op_type": node.op_type, "output": out, "max_abs_diff": diff,
                             "tolerance": atol, "nodes_matching_before": compared - 1}]
    return [{"node": "", "note": f"no node output departs beyond {atol:g} among {compared} compared "
                                  "(graphs may differ in structure)"}]


def fresh_reference_export(cfg: EdgeqConfig, model: torch.nn.Module, x: Mapping[str, np.ndarray] | np.ndarray,
                           opset: int, out: Path) -> Path:
    export_onnx(model, cfg.model, opset, make_inputs(cfg.model, cfg.model.example_dims, x), out)
    return out


def tolerance_source(step: OutputStep, steps: float, floor: float) -> str:
    """Where a tolerance of `steps` output steps (at least `floor`) came from, for the gate's record."""
    if step.step is None:
        return f"{step.source}: the tolerance is thresholds.int8_atol_floor ({floor:g})"
    if steps * step.step < floor:
        return (f"{step.source} ({step.step:.3g}); {steps:g} steps of it are below thresholds.int8_atol_floor, "
                f"which applies ({floor:g})")
    return f"{step.source} ({step.step:.3g})"


def agreement_text(c: OutputComparison, reference: str, classifier: bool = True) -> str:
    """What an agreement gate measured: both clauses, each of which can fail alone (the top-1 clause only for a
    classifier's output)."""
    text = f"max abs diff {c.max_abs_diff:.3g}"
    if c.steps is not None:
        text += f" ({c.steps:.1f} output steps)"
    if not classifier:
        text += ", top-1 agreement n/a: not a classifier"
    elif c.confident_samples is not None:
        text += f", {top1_text(c, reference)}"
    return text


# ---------------------------------------------------------------- the stage
def validate_four_way(cfg: EdgeqConfig, model: torch.nn.Module, fp32_onnx: Path, int8_onnx: Path,
                      test: tuple[Mapping[str, np.ndarray] | np.ndarray, np.ndarray | None],
                      calib: Mapping[str, np.ndarray] | np.ndarray | None,
                      calibration_version: str, opset: int) -> ValidationReport:
    """Run the four stages and every gate; returns the report (check `.passed`).

    `test` is (Batch of every model input, labels or None) and `calib` the calibration version's samples (a Batch);
    one array stands for the only input of a one-input model.
    """
    spec, th = cfg.model, cfg.thresholds
    outputs = list(spec.outputs)
    outn = outputs[0]  # the metric's output
    many = len(outputs) > 1
    x, y = as_batch(test[0], spec.inputs), test[1]
    n = batch_size(x)
    calib_b = None if calib is None else as_batch(calib, spec.inputs)
    iters = cfg.validation.latency_iters
    device = pick_device_target(cfg)
    dependent = not_independent(device)
    ort_cpu = TargetSpec(name="onnxruntime-cpu", backend="onnxruntime", batch="dynamic")

    def classifier(name: str) -> bool:
        """The top-1 clause applies to a classifier's output: the metric's output when the metric is top-1."""
        return spec.metric == "top1" and name == outn

    def titled(name: str, text: str) -> str:
        return f"output {name!r}: {text}" if many else text

    pt = run_torch_batched(model, x, outputs)
    reference = pt[outn] if spec.metric in ("cosine", "retrieval") else None
    o32 = run_onnx(fp32_onnx, x, outputs=outputs)
    o8 = run_onnx(int8_onnx, x, outputs=outputs)
    dev, dev_ms, dev_prec = run_target(int8_onnx, device, x, outputs, iters)
    # Before anything reads the device's outputs: scoring or comparing another shape would broadcast it.
    for name in outputs:
        if name not in dev:
            raise GateError(f"device agreement refused on target {device.name!r}: output {name!r} is missing from the "
                            "device INT8 outputs: the device must return every model output")
        shape = compare_output(name, o8[name], dev[name], Tolerance.measure_only(), labels=("ONNX INT8", "device INT8"))
        if shape.max_abs_diff is None:
            raise GateError(f"device agreement refused on target {device.name!r}: {shape.error}; a device output of "
                            "another shape is refused, never broadcast: the device must return one row per input "
                            "sample, shaped like the model's output")
    lat = {}
    for name, path in (("ONNX FP32", fp32_onnx), ("ONNX INT8", int8_onnx)):
        with get_backend("onnxruntime").runner(path, ort_cpu) as r:
            lat[name] = benchmark(r, _batch1(x), warmup=max(5, iters // 10), iters=iters).median_ms
    stages = []
    for stage, runtime, out, ms, prec in (
        ("PyTorch FP32", f"torch {torch.__version__}", pt, torch_latency(model, _batch1(x), iters), "fp32"),
        ("ONNX FP32", "onnxruntime CPU", o32, lat["ONNX FP32"], "fp32"),
        ("ONNX INT8", "onnxruntime CPU", o8, lat["ONNX INT8"], "int8"),
        ("device INT8", f"{device.backend} {device.device} ({device.name}" + (", not independent)" if dependent else ")"),
         dev, dev_ms, dev_prec),
    ):
        m, ci = score(spec.metric, out[outn], y, reference)
        stages.append(StageRow(stage=stage, runtime=runtime, metric=m, ci95=ci, samples=n, latency_ms=ms, precision=prec,
                               extra_metrics=extra_metrics(spec.metric, out[outn], reference)))

    gates, notes = [], []
    if many:
        notes.append(f"{spec.metric} scores the first output {outn!r}; export parity and device agreement compare "
                     f"every output ({', '.join(outputs)})")
    # Gate 1: export parity, every output.
    parity_rows = []
    for name in outputs:
        tol, scale = parity_tolerance(pt[name], th)
        c1 = compare_output(name, pt[name], o32[name], Tolerance.absolute(tol), labels=("PyTorch FP32", "ONNX FP32"))
        parity_rows.append(GateRow(gate="export parity", pair="PyTorch FP32 -> ONNX FP32", output=name,
                                   measured=titled(name, c1.error or f"max abs diff {c1.max_abs_diff:.3g}"),
                                   threshold=f"<= {tol:.3g}" + (f" ({th.export_atol:g} + {th.export_rtol:g} x largest "
                                                                f"|output| {scale:.3g})" if th.export_rtol else ""),
                                   passed=c1.passed, max_abs_diff=c1.max_abs_diff, tolerance=tol,
                                   top1_agreement=c1.top1_agreement if classifier(name) else None))
    failed1 = next((g for g in parity_rows if not g.passed), None)
    if failed1 is not None:
        with tempfile.TemporaryDirectory() as tmp:
            few = take(x, slice(0, 8))
            ref = fresh_reference_export(cfg, model, few, opset, Path(tmp) / "reference.onnx")
            failed1.where = first_departing_node(ref, fp32_onnx, few, None, th.export_atol)
    gates += parity_rows
    # Gate 2: INT8 accuracy SLA, on the metric's output.
    drop = stages[1].metric - stages[2].metric
    c2 = compare_output(outn, o32[outn], o8[outn], Tolerance.measure_only(), labels=("ONNX FP32", "ONNX INT8"),
                        top1=None if classifier(outn) else False)  # numbers only
    g2 = GateRow(gate="INT8 accuracy SLA", pair="ONNX FP32 -> ONNX INT8", output=outn,
                 measured=f"{spec.metric} {stages[2].metric:.4f} vs {stages[1].metric:.4f} (drop {drop:+.4f}, "
                          f"±{stages[2].ci95:.4f} at 95 % over {n} samples)"
                          + (f" on output {outn!r}" if many else ""),
                 threshold=f"drop <= {th.int8_max_drop:g}", passed=drop <= th.int8_max_drop,
                 max_abs_diff=c2.max_abs_diff, top1_agreement=c2.top1_agreement)
    if not g2.passed and calib_b is not None:
        with tempfile.TemporaryDirectory() as tmp:
            pre = preprocess_model(fp32_onnx, Path(tmp) / "pre.onnx")
            try:
                rows = sensitivity_table(pre, int8_onnx,
                                         CalibrationReader(take(calib_b, slice(0, 32)), {i.name: i.dtype for i in spec.inputs}),
                                         cfg.quantization.op_types)
                g2.where = [r.model_dump() for r in rows[:10]]
            except Exception as exc:  # noqa: BLE001 - graphs that no longer line up still fail the gate
                g2.where = [{"note": f"sensitivity table unavailable: {exc}"}]
    gates.append(g2)
    # Gate 3: device agreement, every output, within N quantization steps of it, the step read from the INT8 graph.
    pair3 = f"ONNX INT8 -> device INT8 ({device.name})"
    top1_clause = (f"top-1 agreement >= {th.device_min_agreement:g} on confident samples (on every sample when fewer "
                   "than half are confident)")
    if dependent:
        waived = not cfg.validation.require_independent_device
        for name in outputs:
            gates.append(GateRow(gate="device agreement", pair=pair3, output=name,
                                 measured=titled(name, f"not run: no independent device check ran: {dependent}"),
                                 threshold=f"<= {th.device_quant_steps:g} output steps and {top1_clause}",
                                 passed=False, ran=False, waived=waived))
        notes.append(f"no independent device check ran: {dependent}" + (
            " (accepted: validation.require_independent_device is false)" if waived else ""))
    else:
        int8_graph = load_onnx(int8_onnx)
        for name in outputs:
            cls = classifier(name)
            ostep = output_step(int8_graph, name)
            tol3 = step_tolerance(th.device_quant_steps, ostep.step, th.int8_atol_floor,
                                  min_top1=th.device_min_agreement if cls else None)
            c3 = compare_output(name, o8[name], dev[name], tol3, labels=("ONNX INT8", "device INT8"),
                                top1=None if cls else False)
            source = tolerance_source(ostep, th.device_quant_steps, th.int8_atol_floor)
            clause = f" and {top1_clause}" if cls else "; top-1 clause n/a: not a classifier"
            measured = c3.error or agreement_text(c3, "ONNX INT8", cls)
            threshold = (f"<= {th.device_quant_steps:g} output steps ({c3.tolerance:.3g})" if ostep.step is not None
                         else f"<= {c3.tolerance:.3g} (thresholds.int8_atol_floor: no output step in the graph)")
            passed = c3.passed
            if ostep.step is None and not cls and not c3.error:
                # A float head after the last quantized tensor (LayerNorm, pooling, L2 normalisation): the graph
                # gives no step to count in, and an absolute floor says nothing about an embedding's scale. Its
                # direction is what a user of it compares: every sample's cosine must reach the threshold.
                cos, worst = min_cosine(o8[name], dev[name])
                measured += f"; least cosine similarity {cos:.6f} (sample #{worst})"
                threshold = (f"cosine >= {th.device_min_cosine:g} on every sample (no output step in the graph: a "
                             f"float head after the last quantized tensor)")
                passed = cos >= th.device_min_cosine
                source = f"{ostep.source}: per-sample cosine (thresholds.device_min_cosine {th.device_min_cosine:g})"
            g3 = GateRow(gate="device agreement", pair=pair3, output=name,
                         measured=titled(name, measured),
                         threshold=threshold + clause,
                         passed=passed, max_abs_diff=c3.max_abs_diff, top1_agreement=c3.top1_agreement,
                         confident_top1_agreement=c3.confident_top1_agreement, tolerance=c3.tolerance,
                         tolerance_source=source)
            if not g3.passed:
                g3.where = [{"output": name, "worst_sample": c3.worst_sample,
                             "max_abs_within_tolerance": c3.within_tolerance,
                             "confident_agreement_ok": c3.agreement_ok if cls else "n/a: not a classifier",
                             "note": f"{device.backend} runner exposes final outputs only: per-layer intermediates "
                                     "are not readable through it"}]
            gates.append(g3)
            notes.append(f"device tolerance{f' ({name})' if many else ''}: {th.device_quant_steps:g} x the output "
                         f"step, {source}")
    return ValidationReport(model=spec.name, metric_name=spec.metric, samples=n, metric_output=outn, outputs=outputs,
                            calibration_version=calibration_version, device_target=device.name, stages=stages,
                            gates=gates, notes=notes)


def shown_precision(row: StageRow) -> str:
    """The precision column as people read it. An INT8 stage whose runtime reports its floating-point inference
    hint (OpenVINO's `f32`: the precision of the layers left unquantized) reads "int8 (hint f32)", not as if the
    INT8 model ran in FP32."""
    if "INT8" in row.stage and not any(k in row.precision.lower() for k in ("int8", "i8", "u8")):
        return f"int8 (hint {row.precision})" if row.precision else "int8"
    return row.precision


def format_table(report: ValidationReport) -> str:
    extras = list(dict.fromkeys(k for s in report.stages for k in s.extra_metrics))
    lines = [f"{'stage':14} {'runtime':34} {report.metric_name:>8} {'±95%':>7} {'n':>5} {'ms':>8}  precision"
             + "".join(f"  {k}" for k in extras)]
    for s in report.stages:
        lines.append(f"{s.stage:14} {s.runtime[:34]:34} {s.metric:8.4f} {s.ci95:7.4f} {s.samples:5d} "
                     f"{'-' if s.latency_ms is None else f'{s.latency_ms:8.3f}':>8}  {shown_precision(s)}"
                     + "".join(f"  {s.extra_metrics[k]:.4f}" if k in s.extra_metrics else "  -" for k in extras))
    if report.metric_output and len(report.outputs) > 1:
        lines.append(f"({report.metric_name} on output {report.metric_output!r}; gates compare every output: "
                     f"{', '.join(report.outputs)})")
    lines.append("")
    for g in report.gates:
        lines.append(f"[{g.result}] {g.gate}: {g.pair}: {g.measured} (threshold {g.threshold})")
        for w in g.where[:5]:
            lines.append(f"         where: {w}")
    return "\n".join(lines)


def chart_png(report: ValidationReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [s.stage for s in report.stages]
    a.bar(names, [s.metric for s in report.stages], yerr=[s.ci95 for s in report.stages], color="#4C72B0")
    lo = min(s.metric - s.ci95 for s in report.stages)
    a.set_ylim(max(0.0, lo - 0.05), 1.0 if report.metric_name in ("top1", "cosine") else None)
    a.set_title(f"{report.metric_name} per stage ({report.samples} held-out samples)")
    a.tick_params(axis="x", labelrotation=15)
    b.bar(names, [s.latency_ms or 0 for s in report.stages], color="#DD8452")
    b.set_title("batch-1 latency (ms, median)")
    b.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
