"""Selection: dedupe, keep out train/test leakage, reject augmentation, stratified sample.

Every filter takes the ingest table (one row per capture, ``excluded`` = "" while usable)
and returns a copy with the rows it removes marked by reason and detail, so the report
can say how many and which. A row keeps the first reason that removed it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Collection, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from edgeq.core.data import read_table
from edgeq.core.errors import CalibrationError, SpecError

# Signatures are small grayscale images: cheap to compare, and a resize or re-encode barely moves them.
_SIG = 16
_HASH = 4


def usable(table: pd.DataFrame) -> np.ndarray:
    return ((table["excluded"] == "") & (table["pixel_index"] >= 0)).to_numpy()


def _mark(table: pd.DataFrame, rows: Iterable[int], reason: str, details: Iterable[str]) -> pd.DataFrame:
    out = table.copy()
    for r, d in zip(rows, details):
        out.at[r, "excluded"] = reason
        out.at[r, "detail"] = d
    return out


def signature(x: np.ndarray) -> np.ndarray:
    """Grayscale float32 image at most 16x16 (block-averaged when larger)."""
    g = np.asarray(x, dtype=np.float32)
    g = g.mean(0) if g.ndim == 3 else g
    if max(g.shape) > _SIG:
        g = np.asarray(Image.fromarray(g, mode="F").resize((_SIG, _SIG), Image.Resampling.BOX))
    return g


def perceptual_hash(sig: np.ndarray) -> int:
    """A 16-bit average hash (4x4 block means above their mean): brightness-shift invariant, a bucket key."""
    small = np.asarray(Image.fromarray(sig, mode="F").resize((_HASH, _HASH), Image.Resampling.BOX))
    bits = (small > small.mean()).ravel()
    return int((bits.astype(np.int64) << np.arange(bits.size)).sum())


def _value_range(dtype: np.dtype) -> tuple[float, float] | None:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return None


def near_identical(a: np.ndarray, b: np.ndarray, span: float, tol: float = 0.01) -> bool:
    """Same picture up to re-encoding noise: mean absolute difference within `tol` of the value span."""
    return a.shape == b.shape and float(np.abs(a - b).mean()) <= tol * span


def intensity_match(cap: np.ndarray, refs: np.ndarray, clip: tuple[float, float] | None, span: float,
                    tol: float) -> np.ndarray:
    """Per reference in `refs` (K, H, W): is `cap` = clip(s * ref + t), s > 0, within `tol` of the value span?

    That is a brightness/contrast jitter of the reference. Least squares on the pixels `cap` does not clip.
    """
    refs = refs.reshape(len(refs), -1).astype(np.float64)
    c = cap.ravel().astype(np.float64)
    if refs.shape[1] != c.size:
        return np.zeros(len(refs), bool)
    lo, hi = clip if clip else (-np.inf, np.inf)
    free = (c > lo) & (c < hi)
    if free.sum() < max(4, 0.25 * c.size):
        return np.zeros(len(refs), bool)
    r, cf = refs[:, free], c[free]
    rm, cm = r.mean(1, keepdims=True), cf.mean()
    var = ((r - rm) ** 2).mean(1)
    s = ((r - rm) * (cf - cm)).mean(1) / np.maximum(var, 1e-12)
    t = cm - s * rm[:, 0]
    pred = s[:, None] * refs + t[:, None]
    rms = np.sqrt(((pred[:, free] - cf) ** 2).mean(1))
    ok = (var > 1e-12) & (s > 0.2) & (rms <= tol * span)
    # Clipped pixels must be where the fitted jitter runs past the range.
    if (c <= lo).any():
        ok &= (pred[:, c <= lo] <= lo + tol * span).all(1)
    if (c >= hi).any():
        ok &= (pred[:, c >= hi] >= hi - tol * span).all(1)
    return ok


def _span(pixels: np.ndarray) -> float:
    vr = _value_range(pixels.dtype)
    if vr:
        return vr[1] - vr[0]
    return float(max(np.ptp(pixels), 1e-6)) if pixels.size else 1.0


def dedupe(table: pd.DataFrame, pixels: np.ndarray | None, near: bool = True) -> pd.DataFrame:
    """Mark exact duplicates (same ``sha256``) and near-duplicates (same perceptual hash, near-identical pixels).

    The earliest capture (by ``captured_at`` when present, else table order) is kept. Image captures: ``sha256`` is
    the pixel hash, and `near` looks for near-duplicates in `pixels`. Any other captures (``near=False``, `pixels`
    not used): ``sha256`` is the exact content identity over all of a sample's inputs, and no perceptual rule applies
    (a perceptual hash of token ids or audio frames would call distinct samples the same).
    """
    ok = np.flatnonzero(usable(table))
    order = ok
    if "captured_at" in table.columns:
        order = ok[np.argsort(table["captured_at"].to_numpy()[ok], kind="stable")]
    ids = table["capture_id"].to_numpy()
    first_of: dict[str, int] = {}
    exact_rows, exact_detail = [], []
    survivors = []
    for r in order:
        h = table.at[r, "sha256"]
        if h in first_of:
            exact_rows.append(r)
            exact_detail.append(f"same {'pixels' if near else 'content (every input)'} as {ids[first_of[h]]}")
        else:
            first_of[h] = r
            survivors.append(r)
    out = _mark(table, exact_rows, "duplicate", exact_detail)
    if not near:
        return out

    span = _span(pixels)
    buckets: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    near_rows, near_detail = [], []
    for r in survivors:
        sig = signature(pixels[table.at[r, "pixel_index"]])
        key = perceptual_hash(sig)
        hit = next((k for k, s in buckets[key] if near_identical(sig, s, span)), None)
        if hit is not None:
            near_rows.append(r)
            near_detail.append(f"near-duplicate of {ids[hit]}")
        else:
            buckets[key].append((r, sig))
    return _mark(out, near_rows, "near-duplicate", near_detail)


def read_manifest_hashes(path) -> set[str]:
    """The ``sha256`` column of a train/test manifest (Parquet or CSV)."""
    t = read_table(path)
    if "sha256" not in t.columns:
        raise SpecError(f"manifest {path} lacks column 'sha256' (has {list(t.columns)})")
    return set(t["sha256"].astype(str))


def exclude_leakage(table: pd.DataFrame, train_hashes: Collection[str], test_hashes: Collection[str],
                    content_ids: Sequence[str] | None = None, train_ids: Collection[str] = frozenset(),
                    test_ids: Collection[str] = frozenset()) -> pd.DataFrame:
    """Mark captures that are in the training set, then those in the test set.

    A capture is in a set when its content id (`content_ids`, one per table row: its model input, which does not
    depend on how a source stores the picture) is one of the split's own samples' (`train_ids`/`test_ids`), or
    when its pixel hash (``sha256``) is listed in the set's manifest (`train_hashes`/`test_hashes`).
    """
    ok = np.flatnonzero(usable(table))
    h = table["sha256"].to_numpy()
    c = list(content_ids) if content_ids is not None else [""] * len(table)

    def why(r: int, hashes: Collection[str], ids: Collection[str], split: str, manifest: str) -> str:
        if c[r] and c[r] in ids:
            return f"same model input as a sample of {split}"
        return f"pixel hash in the {manifest}" if h[r] in hashes else ""

    train = {r: d for r in ok if (d := why(r, train_hashes, train_ids, "data.train", "training manifest"))}
    test = {r: d for r in ok if r not in train and (d := why(r, test_hashes, test_ids, "data.test", "test manifest"))}
    out = _mark(table, train, "in-train", train.values())
    return _mark(out, test, "in-test", test.values())


def _crops(g: np.ndarray) -> list[np.ndarray]:
    """Centre and corner crops (about 10% off a side), resized back: what crop augmentation produces."""
    h, w = g.shape
    m = max(1, round(0.1 * h)), max(1, round(0.1 * w))
    boxes = [(m[1], m[0], w - m[1], h - m[0]), (0, 0, w - m[1], h - m[0]), (m[1], 0, w, h - m[0]),
             (0, m[0], w - m[1], h), (m[1], m[0], w, h)]
    im = Image.fromarray(g, mode="F")
    return [np.asarray(im.crop(b).resize((w, h), Image.Resampling.BILINEAR)) for b in boxes]


def training_variants(train_pixels: np.ndarray) -> dict[int, tuple[list[str], np.ndarray, np.ndarray]]:
    """Perceptual-hash buckets of each training image and its flips and crops: (kinds, train indices, signatures)."""
    lists: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    for i, x in enumerate(train_pixels):
        g = signature(x)
        variants = [("jitter", g), ("flip", g[:, ::-1].copy()), ("flip", g[::-1, :].copy())]
        variants += [("crop", c) for c in _crops(g)]
        for kind, v in variants:
            lists[perceptual_hash(v)].append((kind, i, v))
    return {k: ([e[0] for e in v], np.array([e[1] for e in v]), np.stack([e[2] for e in v])) for k, v in lists.items()}


def reject_augmented(table: pd.DataFrame, pixels: np.ndarray, train_pixels: np.ndarray | None) -> pd.DataFrame:
    """Mark rows flagged augmented in the metadata, then flips, crops and intensity jitters of training images."""
    ok = np.flatnonzero(usable(table))
    flagged = [r for r in ok if bool(table.at[r, "augmented_flag"])]
    out = _mark(table, flagged, "augmented-flag", ["flagged augmented in the metadata"] * len(flagged))
    if train_pixels is None or len(train_pixels) == 0:
        return out
    buckets = training_variants(train_pixels)
    clip = _value_range(pixels.dtype)
    span = _span(pixels)
    found: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
    for r in np.flatnonzero(usable(out)):
        sig = signature(pixels[out.at[r, "pixel_index"]])
        bucket = buckets.get(perceptual_hash(sig))
        if bucket is None:
            continue
        kinds, idx, refs = bucket
        if refs.shape[1:] != sig.shape:
            continue
        tol = np.array([0.03 if k == "crop" else 0.02 for k in kinds])
        mad = np.abs(refs - sig).reshape(len(refs), -1).mean(1)
        hit = (mad <= tol * span) | intensity_match(sig, refs, clip, span, 0.02) | (
            intensity_match(sig, refs, clip, span, 0.03) & (tol > 0.02))
        if hit.any():
            j = int(np.flatnonzero(hit)[0])
            found[f"augmented-{kinds[j]}"][0].append(r)
            found[f"augmented-{kinds[j]}"][1].append(f"{kinds[j]} of training sample #{idx[j]}")
    for reason, (rows, details) in sorted(found.items()):
        out = _mark(out, rows, reason, details)
    return out


def stratum_keys(table: pd.DataFrame, strata: list[str]) -> pd.Series:
    """One label per row: the joint stratum ('lighting=dim|camera=cam-A'), or 'all' without strata."""
    if not strata:
        return pd.Series(["all"] * len(table), index=table.index)
    return table[strata].astype(str).apply(lambda row: "|".join(f"{c}={row[c]}" for c in strata), axis=1)


def stratified_sample(table: pd.DataFrame, strata: list[str], target: int, seed: int = 0) -> np.ndarray:
    """Table rows of a sample of `target` usable captures covering every joint stratum present.

    Shares are proportional to stratum size (largest remainder, so each is within one of its exact share);
    a stratum whose share rounds to zero still gets one sample, taken from the stratum furthest above its
    share. A pool no larger than `target` is taken whole.
    """
    ok = np.flatnonzero(usable(table))
    if len(ok) <= target:
        return ok
    keys = stratum_keys(table.iloc[ok], strata).to_numpy()
    cells, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    if len(cells) > target:
        raise CalibrationError(
            f"{len(cells)} strata of {strata} cannot each be covered by a sample of {target}; "
            f"raise data.captures.target_size to at least {len(cells)} or stratify on fewer columns"
        )
    exact = target * sizes / sizes.sum()  # < sizes, since the pool is larger than the target
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take), kind="stable")[: target - take.sum()]:
        take[j] += 1
    for j in np.flatnonzero(take == 0):
        donor = int(np.argmax(np.where(take > 1, take - exact, -np.inf)))
        take[donor] -= 1
        take[j] = 1
    rng = np.random.default_rng(seed)
    chosen = []
    for j in range(len(cells)):
        members = ok[inverse == j]
        chosen.append(rng.choice(members, take[j], replace=False))
    return np.sort(np.concatenate(chosen))
