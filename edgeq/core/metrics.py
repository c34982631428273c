"""Task metrics: top-1, cosine similarity, or a user function; with a confidence interval."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from edgeq.core.errors import SpecError
from edgeq.core.specs import load_object


def top1(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None = None) -> np.ndarray:
    """Per-sample correctness (1/0) against labels."""
    if labels is None:
        raise SpecError("metric 'top1' needs labels (y) in the data split")
    return (outputs.reshape(len(outputs), -1).argmax(1) == labels).astype(np.float64)


def cosine(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None = None) -> np.ndarray:
    """Per-sample cosine similarity to the reference embeddings (FP32 PyTorch), or to label embeddings."""
    ref = reference if reference is not None else labels
    if ref is None:
        raise SpecError("metric 'cosine' needs reference embeddings")
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = np.asarray(ref).reshape(len(ref), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def resolve_metric(name: str) -> Callable[..., np.ndarray]:
    if name == "top1":
        return top1
    if name == "cosine":
        return cosine
    fn = load_object(name)
    if not callable(fn):
        raise SpecError(f"metric {name} is not callable")
    return fn


def score(name: str, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None = None) -> tuple[float, float]:
    """(metric value, 95 % confidence half-width) over the samples."""
    per = np.asarray(resolve_metric(name)(outputs, labels, reference), dtype=np.float64).reshape(-1)
    if per.size == 0:
        raise SpecError("metric computed over zero samples")
    mean = float(per.mean())
    half = 1.96 * float(per.std(ddof=1)) / math.sqrt(per.size) if per.size > 1 else float("nan")
    return mean, half
