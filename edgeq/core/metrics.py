"""Task metrics: top-1, cosine similarity to the FP32 outputs, retrieval agreement, or a user function; with a
confidence interval.

For an embedder (`cosine`), the reference is the FP32 model's output on the same samples, never the labels: a
class id is no embedding. `retrieval` is the agreement of the k nearest neighbours (cosine) between the FP32
embeddings and the candidate's over the whole split; a cosine model reports it next to its metric.
"""

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
    """Per-sample cosine similarity to the reference embeddings (the FP32 model's outputs), or to label embeddings
    of the outputs' shape (never to class ids)."""
    ref = reference if reference is not None else labels
    if ref is None:
        raise SpecError("metric 'cosine' needs reference embeddings (the FP32 model's outputs)")
    if reference is None and np.shape(ref) != np.shape(outputs):
        raise SpecError(f"metric 'cosine' scores against the FP32 model's outputs: labels of shape {np.shape(ref)} "
                        f"are no embeddings of shape {np.shape(outputs)}")
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = np.asarray(ref).reshape(len(ref), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


RETRIEVAL_K = 10


def retrieval(outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None = None,
              k: int = RETRIEVAL_K) -> np.ndarray:
    """Per query, the overlap of its k nearest neighbours (cosine, itself excluded) among the split's samples in the
    reference embeddings (FP32) and in `outputs`: |NN_k(reference) ∩ NN_k(outputs)| / k. Ties are broken by
    index, so identical embeddings give 1.0. k is cut to the split's size - 1."""
    if reference is None:
        raise SpecError("metric 'retrieval' compares against the FP32 model's embeddings (the reference)")
    a = _unit(outputs)
    b = _unit(reference)
    if a.shape != b.shape:
        raise SpecError(f"retrieval: outputs {a.shape} and reference {b.shape} differ in shape")
    n = len(a)
    k = min(k, n - 1)
    if k < 1:
        raise SpecError("metric 'retrieval' needs at least two samples")
    out = np.empty(n)
    for start in range(0, n, 512):
        sa, sb = a[start:start + 512] @ a.T, b[start:start + 512] @ b.T
        rows = np.arange(len(sa))
        sa[rows, start + rows] = -np.inf
        sb[rows, start + rows] = -np.inf
        na = np.argsort(-sa, axis=1, kind="stable")[:, :k]
        nb = np.argsort(-sb, axis=1, kind="stable")[:, :k]
        out[start:start + len(sa)] = [len(np.intersect1d(x, y, assume_unique=True)) / k for x, y in zip(na, nb)]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


def extra_metrics(name: str, outputs: np.ndarray, reference: np.ndarray | None) -> dict[str, float]:
    """Metrics reported next to the model's own: for an embedder (`cosine`), retrieval agreement (overlap@k of the
    nearest neighbours) with the FP32 reference."""
    if name != "cosine" or reference is None or len(outputs) < 2:
        return {}
    k = min(RETRIEVAL_K, len(outputs) - 1)
    return {f"retrieval overlap@{k}": float(retrieval(outputs, None, reference).mean())}


def resolve_metric(name: str) -> Callable[..., np.ndarray]:
    if name == "top1":
        return top1
    if name == "cosine":
        return cosine
    if name == "retrieval":
        return retrieval
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
