"""Compare the named outputs of two runs of a model, output by output (in the spirit of Polygraphy's
``CompareFunc.simple``).

Every gate that holds one run against another (PyTorch vs ONNX at export, the dynamic-shape probe, the QAT
export check, the four-way validation gates) goes through :func:`compare_outputs`, so they agree on what
"max abs diff", "worst sample" and "top-1 agreement" mean::

    records = compare_outputs({"logits": int8_out}, {"logits": device_out},
                              step_tolerance(3, output_step(int8_model, "logits").step, floor=1e-3, min_top1=0.99),
                              labels=("ONNX INT8", "device INT8"))
    records[0].passed, records[0].max_abs_diff, records[0].worst_sample, records[0].confident_top1_agreement

Shapes are checked first and non-finite values are refused: neither gives a number worth holding against a
tolerance, so such an output fails with ``error`` saying why. Where a tolerance is counted in quantization
steps, the caller gives the step: which step (an output's quantization scale read from the graph) is the
gate's decision, not the comparator's.

Two clauses, each able to fail alone: the max abs difference within the tolerance, and top-1 agreement on the
*confident* samples, those whose reference top-1 margin (best minus runner-up) exceeds the tolerance. A
difference within the tolerance can still flip such a sample (each of the two values moving by more than
half the tolerance), which is a real disagreement; a sample whose margin is within the tolerance is a near
tie an allowed difference can flip, reported as ``near_ties`` and not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

# Keeps the relative difference finite where the reference is exactly zero.
_REL_EPS = 1e-6


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate output may be from the reference.

    atol: absolute, in output units. steps + step: ``steps`` quantization steps of size ``step``, never less
    than atol (the floor). min_top1: top-1 agreement floor on the confident samples (reference top-1 margin
    above the limit), checked where top-1 is meaningful; on every sample when fewer than half are confident.
    """

    atol: float = 0.0
    steps: float | None = None
    step: float | None = None
    min_top1: float | None = None

    @classmethod
    def absolute(cls, atol: float, *, min_top1: float | None = None) -> Tolerance:
        return cls(atol=atol, min_top1=min_top1)

    @classmethod
    def in_steps(cls, steps: float, step: float, *, floor: float = 0.0, min_top1: float | None = None) -> Tolerance:
        return cls(atol=floor, steps=steps, step=step, min_top1=min_top1)

    @classmethod
    def measure_only(cls) -> Tolerance:
        """No limit: for the numbers alone (a gate decided on something else)."""
        return cls(atol=math.inf)

    @property
    def limit(self) -> float:
        if self.steps is not None:
            if self.step is None:
                raise ValueError("a tolerance in quantization steps needs the step size")
            return max(self.steps * self.step, self.atol)
        return self.atol


def step_tolerance(steps: float, step: float | None, floor: float, *, min_top1: float | None = None) -> Tolerance:
    """``steps`` quantization steps of ``step`` (at least ``floor``); ``floor`` alone where there is no step."""
    if step is None:
        return Tolerance.absolute(floor, min_top1=min_top1)
    return Tolerance.in_steps(steps, step, floor=floor, min_top1=min_top1)


def range_step(values: np.ndarray, levels: int = 255) -> float:
    """One step of an 8-bit quantizer spanning the observed range of `values`: (max - min) / 255.

    A description of data, not a tolerance: a tolerance taken from the values it checks widens with every
    outlier in them. Gates read the step from the quantized graph instead (``edgeq.core.onnx_graph.output_step``).
    """
    return float(values.max() - values.min()) / levels


class OutputComparison(BaseModel):
    """One output of two runs held against its tolerance."""

    output: str
    passed: bool
    reference_shape: list[int]
    candidate_shape: list[int]
    samples: int = 0
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    worst_sample: int | None = None  # the sample (index along axis 0) with the largest abs diff
    tolerance: float
    step: float | None = None  # when the tolerance is in quantization steps
    steps: float | None = None  # max_abs_diff in those steps
    within_tolerance: bool | None = None  # the max-abs clause (None: not compared)
    top1_agreement: float | None = None  # on every sample; None where top-1 is not meaningful (one value per sample)
    confident_samples: int | None = None  # samples whose reference top-1 margin exceeds the tolerance
    confident_top1_agreement: float | None = None  # top-1 agreement on those (None: no confident sample)
    near_ties: int = 0  # top-1 disagreements on the other samples: reported, not counted
    # The tolerance left fewer than half the samples confident (one quantization step that coarse): the agreement
    # clause then holds top-1 on every sample, else constant or garbage outputs within the range would pass.
    agreement_on_all: bool = False
    agreement_ok: bool | None = None  # the agreement clause (None: no floor asked, or top-1 not meaningful)
    error: str = ""  # why the values were not compared (shapes differ, non-finite values); passed is then False


def _per_sample(a: np.ndarray) -> np.ndarray:
    """(samples, values) view: axis 0 is the sample axis; a scalar is one sample."""
    return a.reshape(1, -1) if a.ndim == 0 else a.reshape(len(a), -1)


def _non_finite(a: np.ndarray, label: str, name: str) -> str:
    if not np.issubdtype(a.dtype, np.inexact):
        return ""
    bad = ~np.isfinite(_per_sample(a))
    if not bad.any():
        return ""
    first = int(bad.any(axis=1).argmax())
    return (f"output {name!r}: {label} has {int(bad.sum())} non-finite value(s) (NaN/Inf), the first in sample "
            f"{first}; refusing to compare")


def compare_output(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, *,
                   labels: tuple[str, str] = ("reference", "candidate"), top1: bool | None = None) -> OutputComparison:
    """One output: shapes, then finiteness, then the numbers. `top1` None: where a sample has several values."""
    ref, got = np.asarray(reference), np.asarray(candidate)
    base = dict(output=name, reference_shape=list(ref.shape), candidate_shape=list(got.shape),
                tolerance=tolerance.limit, step=tolerance.step if tolerance.steps is not None else None)
    if ref.shape != got.shape:  # never broadcast: (1, 10) against (297, 10) would compare one sample 297 times
        return OutputComparison(**base, passed=False,
                                error=f"output {name!r}: {labels[0]} shape {ref.shape} != {labels[1]} shape {got.shape}")
    ref2 = _per_sample(ref).astype(np.float64)
    got2 = _per_sample(got).astype(np.float64)
    n = len(ref2)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are refused below, with their count
        diff = np.abs(ref2 - got2)
        rel_all = diff / (np.abs(ref2) + _REL_EPS)
    if diff.size:
        per_sample = diff.max(axis=1)
        mad, worst = float(per_sample.max()), int(per_sample.argmax())
        rel = float(rel_all.max())
    else:
        mad, worst, rel = 0.0, 0, 0.0
    rec = OutputComparison(**base, passed=False, samples=n, max_abs_diff=mad, max_rel_diff=rel, worst_sample=worst)
    if base["step"]:
        rec.steps = mad / base["step"]
    rec.error = _non_finite(ref, labels[0], name) or _non_finite(got, labels[1], name)
    if rec.error:
        return rec
    rec.within_tolerance = mad <= tolerance.limit
    if (top1 or (top1 is None and ref.ndim >= 1 and ref2.shape[1] > 1)) and ref2.shape[1]:
        agree = ref2.argmax(axis=1) == got2.argmax(axis=1)
        rec.top1_agreement = float(agree.mean()) if n else 1.0
        if ref2.shape[1] > 1:
            top2 = np.sort(ref2, axis=1)[:, -2:]
            confident = (top2[:, 1] - top2[:, 0]) > tolerance.limit
        else:  # one value per sample: nothing can flip
            confident = np.ones(n, dtype=bool)
        rec.confident_samples = int(confident.sum())
        rec.near_ties = int((~agree & ~confident).sum())
        if rec.confident_samples:
            rec.confident_top1_agreement = float(agree[confident].mean())
        if tolerance.min_top1 is not None:
            agreement = rec.confident_top1_agreement
            if 2 * rec.confident_samples < n:
                rec.agreement_on_all, agreement = True, rec.top1_agreement
            rec.agreement_ok = agreement is None or agreement >= tolerance.min_top1
    rec.passed = bool(rec.within_tolerance) and rec.agreement_ok is not False
    return rec


def top1_text(c: OutputComparison, reference: str) -> str:
    """The agreement clause as measured, for a gate's record or error: on the confident samples, or on every sample
    where fewer than half are confident (`agreement_on_all`)."""
    if c.agreement_on_all:
        return (f"top-1 agreement {c.top1_agreement:.4f} on all {c.samples} samples (only {c.confident_samples} "
                f"confident at {reference} top-1 margin > {c.tolerance:.3g}: the tolerance is that coarse, so every "
                "sample counts)")
    agree = "n/a" if c.confident_top1_agreement is None else f"{c.confident_top1_agreement:.4f}"
    text = (f"top-1 agreement {agree} on {c.confident_samples or 0} confident samples ({reference} top-1 margin > "
            f"{c.tolerance:.3g})")
    return text + (f"; {c.near_ties} near-tie flip(s) not counted" if c.near_ties else "")


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    tolerance: Tolerance | Mapping[str, Tolerance], *, outputs: Sequence[str] | None = None,
                    labels: tuple[str, str] = ("reference", "candidate"),
                    top1: bool | None = None) -> list[OutputComparison]:
    """Every output in `outputs` (default: the reference's) compared with its tolerance.

    `tolerance` is one for all outputs or one per output name. An output the candidate lacks fails with
    ``error`` naming it.
    """
    names = list(outputs) if outputs is not None else list(reference)
    records = []
    for name in names:
        tol = tolerance[name] if isinstance(tolerance, Mapping) else tolerance
        if name not in candidate or name not in reference:
            missing = labels[1] if name not in candidate else labels[0]
            records.append(OutputComparison(
                output=name, passed=False, reference_shape=list(np.shape(reference.get(name, ()))),
                candidate_shape=list(np.shape(candidate.get(name, ()))), tolerance=tol.limit,
                error=f"output {name!r} is missing from the {missing} outputs"))
            continue
        records.append(compare_output(name, reference[name], candidate[name], tol, labels=labels, top1=top1))
    return records


def min_cosine(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, int]:
    """The least per-sample cosine similarity between two runs of one output (same shape, finite), and its sample.
    A sample whose vectors are both zero counts as 1 (the same); one zero against a non-zero one as 0."""
    a = _per_sample(np.asarray(reference, dtype=np.float64))
    b = _per_sample(np.asarray(candidate, dtype=np.float64))
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(1) / (na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
    worst = int(np.argmin(cos))
    return float(cos[worst]), worst
