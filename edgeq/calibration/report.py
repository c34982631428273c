"""Coverage report: strata in pool vs selection, exclusions, and statistics of the data vs the training set.

Image captures: preprocessed intensity statistics and histogram (`coverage_report`). Any other captures
(`inputs_coverage_report`): per-input statistics (value range, distinct values: the tokens of an id input) and the
sequence lengths read from a mask input, each beside the training set's.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from edgeq.calibration.select import stratum_keys, usable
from edgeq.core.specs import InputSpec


class StratumRow(BaseModel):
    column: str
    value: str
    pool: int
    usable: int
    selected: int
    pool_share: float
    selected_share: float


class CoverageReport(BaseModel):
    pool_rows: int
    usable: int
    selected: int
    target_size: int
    min_size: int
    excluded: dict[str, int]
    strata: list[str]
    rows: list[StratumRow]
    joint_strata_usable: int
    joint_strata_covered: int
    missing: list[str]
    notes: list[str]
    stats: list[dict[str, Any]]
    histogram: list[dict[str, Any]]
    kind: str = "image"  # "image": intensity statistics; "inputs": per-input statistics and sequence lengths
    lengths: list[dict[str, Any]] = []  # "inputs": sequence-length statistics per set, from `length_input`
    length_input: str | None = None  # the mask input the lengths are read from

    @property
    def covered_all(self) -> bool:
        return self.joint_strata_covered == self.joint_strata_usable and not self.missing

    def summary(self) -> str:
        return (f"{self.joint_strata_covered}/{self.joint_strata_usable} strata covered"
                + (f", {len(self.missing)} missing" if self.missing else ""))


def _stats(name: str, x: np.ndarray | None) -> dict[str, Any]:
    if x is None or x.size == 0:
        return {"set": name, "samples": 0}
    v = np.asarray(x, dtype=np.float64).ravel()
    p = np.percentile(v, [1, 50, 99])
    per_sample = np.asarray(x, dtype=np.float64).reshape(len(x), -1).mean(1)
    return {"set": name, "samples": int(len(x)), "mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4),
            "min": round(float(v.min()), 4), "p1": round(float(p[0]), 4), "median": round(float(p[1]), 4),
            "p99": round(float(p[2]), 4), "max": round(float(v.max()), 4),
            "sample_mean_std": round(float(per_sample.std()), 4)}


def _strata(table: pd.DataFrame, selected_rows: np.ndarray, strata: list[str],
             expected: dict[str, list[str]] | None) -> dict[str, Any]:
    """Coverage of each stratum value and joint stratum, and the exclusions: the CoverageReport fields they fill."""
    ok = usable(table)
    sel = np.zeros(len(table), bool)
    sel[selected_rows] = True
    rows: list[StratumRow] = []
    missing: list[str] = []
    for col in strata:
        values = sorted(set(table[col].astype(str)) | set((expected or {}).get(col, [])))
        for v in values:
            m = (table[col].astype(str) == v).to_numpy()
            rows.append(StratumRow(column=col, value=v, pool=int(m.sum()), usable=int((m & ok).sum()),
                                   selected=int((m & sel).sum()),
                                   pool_share=round(float((m & ok).sum() / max(ok.sum(), 1)), 4),
                                   selected_share=round(float((m & sel).sum() / max(sel.sum(), 1)), 4)))
            if not (m & ok).any():
                missing.append(f"{col}={v}" + (" (no capture)" if not m.any() else " (all captures excluded)"))
    keys = stratum_keys(table, strata).to_numpy()
    joint_usable = set(keys[ok])
    joint_covered = set(keys[sel]) & joint_usable
    excluded = table.loc[table["excluded"] != "", "excluded"].value_counts().to_dict()
    return dict(pool_rows=len(table), usable=int(ok.sum()), selected=int(sel.sum()),
                excluded={str(k): int(v) for k, v in excluded.items()}, strata=list(strata), rows=rows,
                joint_strata_usable=len(joint_usable), joint_strata_covered=len(joint_covered), missing=missing)


def coverage_report(table: pd.DataFrame, selected_rows: np.ndarray, strata: list[str], target_size: int,
                    min_size: int, selected_x: np.ndarray, train_x: np.ndarray | None,
                    expected: dict[str, list[str]] | None = None, notes: list[str] | None = None,
                    bins: int = 10) -> CoverageReport:
    """Coverage of each stratum value and joint stratum, and preprocessed-intensity statistics (image captures).

    Args:
        table: the filtered ingest table; selected_rows: its rows in the sample.
        selected_x / train_x: preprocessed arrays (what the model sees); train_x may be None.
    """
    edges = np.linspace(min(_lo(selected_x), _lo(train_x)), max(_hi(selected_x), _hi(train_x)), bins + 1)
    hist = []
    hs = np.histogram(selected_x, edges)[0] if selected_x.size else np.zeros(bins)
    ht = np.histogram(train_x, edges)[0] if train_x is not None and train_x.size else None
    for i in range(bins):
        row = {"bin": f"[{edges[i]:.3g}, {edges[i + 1]:.3g})",
               "calibration": round(float(hs[i] / max(hs.sum(), 1)), 4)}
        if ht is not None:
            row["train"] = round(float(ht[i] / max(ht.sum(), 1)), 4)
        hist.append(row)
    return CoverageReport(
        **_strata(table, selected_rows, strata, expected), target_size=target_size, min_size=min_size,
        notes=list(notes or []),
        stats=[_stats("calibration", selected_x)] + ([_stats("train", train_x)] if train_x is not None else []),
        histogram=hist)


def mask_input(inputs: list[InputSpec]) -> str | None:
    """The input sequence lengths are read from: the first integer/bool input whose name contains "mask"."""
    return next((i.name for i in inputs if not i.is_float and "mask" in i.name.lower()), None)


def sequence_lengths(mask: np.ndarray) -> np.ndarray:
    """Per sample: the positions its mask marks (non-zero), i.e. mask.sum(1) for a 0/1 [batch, seq] mask."""
    m = np.asarray(mask)
    return (m.reshape(len(m), -1) != 0).sum(1)


def _input_stats(name: str, spec: InputSpec, x: np.ndarray | None) -> dict[str, Any]:
    if x is None or len(x) == 0:
        return {"input": spec.name, "set": name, "samples": 0}
    a = np.asarray(x)
    row: dict[str, Any] = {"input": spec.name, "set": name, "samples": int(len(a)), "dtype": str(a.dtype),
                           "sample_shape": list(a.shape[1:])}
    if spec.is_float:
        v = a.astype(np.float64).ravel()
        p = np.percentile(v, [1, 50, 99])
        row.update(min=round(float(v.min()), 4), p1=round(float(p[0]), 4), median=round(float(p[1]), 4),
                   p99=round(float(p[2]), 4), max=round(float(v.max()), 4), mean=round(float(v.mean()), 4),
                   std=round(float(v.std()), 4))
    else:
        v = a.astype(np.int64).ravel()
        row.update(min=int(v.min()), max=int(v.max()), distinct=int(len(np.unique(v))))
    return row


def _length_stats(name: str, lengths: np.ndarray) -> dict[str, Any]:
    if len(lengths) == 0:
        return {"set": name, "samples": 0}
    return {"set": name, "samples": int(len(lengths)), "min": int(lengths.min()),
            "median": float(np.median(lengths)), "mean": round(float(lengths.mean()), 2), "max": int(lengths.max())}


def inputs_coverage_report(table: pd.DataFrame, selected_rows: np.ndarray, strata: list[str], target_size: int,
                           min_size: int, selected: dict[str, np.ndarray], train: dict[str, np.ndarray] | None,
                           inputs: list[InputSpec], expected: dict[str, list[str]] | None = None,
                           notes: list[str] | None = None, bins: int = 10) -> CoverageReport:
    """The coverage report of captures that are not one image input: strata as `coverage_report` gives them, per-input
    statistics of the selection and the training set (float inputs: value range and percentiles of what the model
    sees; integer inputs: value range and distinct values, i.e. the tokens an id input uses), and the sequence lengths
    read from a mask input (`mask_input`), with their histogram.

    Args:
        selected / train: {input name: samples} as the model takes them (train may be None).
    """
    stats = []
    for spec in inputs:
        stats.append(_input_stats("calibration", spec, selected[spec.name]))
        if train is not None:
            stats.append(_input_stats("train", spec, train[spec.name]))
    mask = mask_input(inputs)
    lengths, hist = [], []
    if mask is not None:
        ls = sequence_lengths(selected[mask])
        lt = sequence_lengths(train[mask]) if train is not None else None
        lengths = [_length_stats("calibration", ls)] + ([_length_stats("train", lt)] if lt is not None else [])
        every = np.concatenate([ls, lt]) if lt is not None else ls
        lo, hi = (int(every.min()), int(every.max())) if len(every) else (0, 1)
        # Whole-number bins: one per length when there are few lengths.
        edges = np.unique(np.linspace(lo, hi + 1, min(bins, hi + 1 - lo) + 1).round().astype(int))
        hs = np.histogram(ls, edges)[0]
        ht = np.histogram(lt, edges)[0] if lt is not None else None
        for i in range(len(edges) - 1):
            a, b = int(edges[i]), int(edges[i + 1]) - 1
            row = {"length": f"{a}" if a == b else f"{a}-{b}", "calibration": round(float(hs[i] / max(hs.sum(), 1)), 4)}
            if ht is not None:
                row["train"] = round(float(ht[i] / max(ht.sum(), 1)), 4)
            hist.append(row)
    return CoverageReport(
        **_strata(table, selected_rows, strata, expected), target_size=target_size, min_size=min_size,
        notes=list(notes or []), stats=stats, histogram=hist, kind="inputs", lengths=lengths, length_input=mask)


def _lo(x: np.ndarray | None) -> float:
    return float(np.min(x)) if x is not None and x.size else 0.0


def _hi(x: np.ndarray | None) -> float:
    return float(np.max(x)) if x is not None and x.size else 1.0


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def coverage_markdown(rep: CoverageReport, version: str = "", excluded_rows: pd.DataFrame | None = None,
                      histogram_uri: str = "") -> str:
    """The report as markdown (the Prefect artifact and the review form's description)."""
    title = f"# Calibration set {version}".rstrip()
    lines = [title, "",
             f"- pool: **{rep.pool_rows}** captures, **{rep.usable}** usable after filtering",
             f"- selected: **{rep.selected}** (target {rep.target_size}, minimum {rep.min_size})",
             f"- strata {rep.strata or '(none)'}: {rep.summary()}"]
    lines += [f"- **note:** {n}" for n in rep.notes]
    lines += ["", "## Excluded", ""]
    lines += _table([{"reason": k, "captures": v} for k, v in sorted(rep.excluded.items())]) or ["Nothing excluded."]
    if excluded_rows is not None and len(excluded_rows):
        shown = excluded_rows.head(50)
        lines += ["", "<details><summary>which captures</summary>", ""]
        lines += _table([{"capture": r.capture_id, "reason": r.excluded, "detail": r.detail} for r in shown.itertuples()])
        if len(excluded_rows) > len(shown):
            lines.append(f"... and {len(excluded_rows) - len(shown)} more (pool table in the version)")
        lines += ["", "</details>"]
    lines += ["", "## Strata: pool vs selection", ""]
    lines += _table([r.model_dump() for r in rep.rows]) or ["No strata named (data.captures.strata)."]
    if rep.missing:
        lines += ["", "## Strata missing from the pool", ""] + [f"- {m}" for m in rep.missing]
    if rep.kind == "image":
        lines += ["", "## Preprocessed intensity vs the training set", ""] + _table(rep.stats)
        lines += ["", "Histogram (fraction of values per bin):", ""] + _table(rep.histogram)
    else:
        lines += ["", "## Inputs vs the training set", "",
                  "What the model takes, per input (integer inputs: value range and distinct values, e.g. the "
                  "tokens used):", ""] + _table(rep.stats)
        if rep.length_input:
            lines += ["", f"## Sequence lengths (from `{rep.length_input}`)", ""] + _table(rep.lengths)
            lines += ["", "Histogram (fraction of samples per length):", ""] + _table(rep.histogram)
        else:
            lines += ["", "No mask input (an integer input named like `attention_mask`): sequence lengths not "
                          "reported."]
    if histogram_uri:
        lines += ["", f"Histogram picture: `{histogram_uri}`"]
    return "\n".join(lines)


def inputs_histogram_png(rep: CoverageReport, selected: dict[str, np.ndarray], train: dict[str, np.ndarray] | None,
                         inputs: list[InputSpec], bins: int = 30) -> bytes:
    """Captures that are not images: the sequence-length histogram (from the mask input) when there is one, and the
    value histogram of the first other input (token ids, frames), calibration vs training set, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([rep.length_input] if rep.length_input else []) + [
        next((i.name for i in inputs if i.name != rep.length_input), inputs[0].name)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        is_len = name == rep.length_input

        def values(d: dict[str, np.ndarray], name: str = name, is_len: bool = is_len) -> np.ndarray:
            return np.asarray(sequence_lengths(d[name]) if is_len else np.ravel(d[name]), dtype=np.float64)

        cal = values(selected)
        tr = values(train) if train is not None else None
        every = np.concatenate([cal, tr]) if tr is not None else cal
        lo, hi = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        ax.hist(cal, edges, density=True, alpha=0.6, label="calibration")
        if tr is not None:
            ax.hist(tr, edges, density=True, alpha=0.6, label="train")
        ax.set_title(f"sequence length ({name})" if is_len else f"values of {name}")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def histogram_png(selected_x: np.ndarray, train_x: np.ndarray | None, bins: int = 30) -> bytes:
    """Intensity histograms of the calibration set and the training set, overlaid, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    lo, hi = min(_lo(selected_x), _lo(train_x)), max(_hi(selected_x), _hi(train_x))
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    axes[0].hist(np.ravel(selected_x), edges, density=True, alpha=0.6, label="calibration")
    if train_x is not None:
        axes[0].hist(np.ravel(train_x), edges, density=True, alpha=0.6, label="train")
    axes[0].set_title("pixel values (preprocessed)")
    axes[0].legend()
    axes[1].hist(np.asarray(selected_x).reshape(len(selected_x), -1).mean(1), bins, density=True, alpha=0.6,
                 label="calibration")
    if train_x is not None:
        axes[1].hist(np.asarray(train_x).reshape(len(train_x), -1).mean(1), bins, density=True, alpha=0.6,
                     label="train")
    axes[1].set_title("per-sample mean")
    axes[1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
