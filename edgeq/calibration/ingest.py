"""Capture ingestion: read every capture named by the metadata table, hash its decoded pixels.

Two kinds of captures (`is_image_model`): a one-input image model's (an image folder, or an array file of images),
ingested by `ingest_captures` and hashed by their decoded pixels; and any other model's (token ids and masks, audio
frames, tabular rows, several inputs per sample), ingested by `ingest_input_captures` from an .npz holding one array per
model input name, checked as data splits are (`check_inputs`), and identified by exact content over all of a sample's
inputs (`batch_content_ids`).

Unreadable and non-finite samples are kept in the table with a reason (``excluded``)
and never reach the pixel array, so they are listed in the report and never used.
A metadata table that does not match the captures (a missing column, a missing
file, an array index out of range) is the user's to fix and fails at once.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from edgeq.core.data import (
    Batch,
    batch_content_ids,
    check_inputs,
    pixel_hash,
    read_image,
    read_npz_inputs,
    read_table,
    resolve_inside,
    take,
)
from edgeq.core.errors import SpecError
from edgeq.core.specs import CaptureSpec, InputSpec, Preprocess

Progress = Callable[[int, int], None]


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def is_image_model(inputs: list[InputSpec]) -> bool:
    """Captures of this model are images: one float input of rank 4 ([batch, C, H, W]).

    Their filters are the image ones (pixel hash, perceptual near-duplicates, flips and crops of training images);
    any other model's captures are compared by exact content over all of their inputs.
    """
    return len(inputs) == 1 and inputs[0].is_float and len(inputs[0].shape) == 4


def read_metadata(spec: CaptureSpec) -> pd.DataFrame:
    """The metadata table, checked for the columns the spec names."""
    table = read_table(spec.metadata)
    if len(table) == 0:
        raise SpecError(f"capture metadata {spec.metadata} has no rows")
    is_folder = spec.path.is_dir()
    needed = list(spec.strata) + ([spec.path_column] if is_folder else [])
    missing = [c for c in needed if c not in table.columns]
    if missing:
        what = "strata column" if missing[0] in spec.strata else "path column"
        raise SpecError(
            f"capture metadata {spec.metadata} lacks {what} {missing[0]!r} (has {list(table.columns)}); "
            f"fix data.captures.strata / data.captures.path_column or the table"
        )
    if spec.augmented_column and spec.augmented_column not in table.columns:
        raise SpecError(
            f"capture metadata {spec.metadata} lacks the augmentation flag column {spec.augmented_column!r} "
            f"(has {list(table.columns)}); set data.captures.augmented_column to the right name, or null"
        )
    for col in spec.strata:
        if table[col].isna().any():
            rows = [str(i) for i in np.flatnonzero(table[col].isna().to_numpy())]
            raise SpecError(f"capture metadata {spec.metadata}: strata column {col!r} is empty in rows {_first(rows)}")
    return table


def _ids(table: pd.DataFrame, spec: CaptureSpec, is_folder: bool) -> list[str]:
    if spec.id_column in table.columns:
        ids = table[spec.id_column].astype(str).tolist()
    elif is_folder:
        ids = table[spec.path_column].astype(str).tolist()
    else:
        ids = [f"row{i}" for i in range(len(table))]
    dup = [k for k, n in Counter(ids).items() if n > 1]
    if dup:
        raise SpecError(f"capture metadata {spec.metadata}: capture ids repeat ({_first(dup)}); ids must be unique")
    return ids


def _load_samples(spec: CaptureSpec, table: pd.DataFrame, progress: Progress | None,
                  input_name: str | None = None) -> list[np.ndarray | str]:
    """One decoded array per metadata row, or the reason it could not be read."""
    out: list[np.ndarray | str] = []
    if spec.path.is_dir():
        paths = table[spec.path_column].astype(str).tolist()
        resolved = [resolve_inside(spec.path, p) for p in paths]
        missing = [f"row {i} ({p})" for i, (p, r) in enumerate(zip(paths, resolved)) if not r.is_file()]
        if missing:
            raise SpecError(
                f"capture metadata {spec.metadata}: {len(missing)} row(s) point to files missing from {spec.path}: "
                f"{_first(missing)}; remove those rows or restore the files"
            )
        for i, p in enumerate(resolved):
            try:
                out.append(read_image(p))
            except SpecError as exc:
                out.append(f"unreadable: {exc}")
            if progress:
                progress(i + 1, len(resolved))
        return out
    if not spec.path.is_file():
        raise SpecError(f"captures {spec.path} is neither a folder of images nor an array file")
    if spec.path.suffix == ".npy":
        arr = np.load(spec.path, mmap_mode="r", allow_pickle=False)
    elif spec.path.suffix == ".npz":
        with np.load(spec.path, allow_pickle=False) as z:
            key = "x" if "x" in z else input_name if input_name in z else None
            if key is None:
                named = f" or {input_name!r}" if input_name else ""
                raise SpecError(f"capture array file {spec.path} has no array 'x'{named} (found {list(z.keys())})")
            arr = z[key]
    else:
        raise SpecError(f"captures {spec.path} must be a folder of images or a .npy/.npz file")
    index = _array_index(spec, table, len(arr))
    for i, j in enumerate(index):
        out.append(np.asarray(arr[j]))
        if progress:
            progress(i + 1, len(index))
    return out


def ingest_captures(spec: CaptureSpec, progress: Progress | None = None,
                    input_name: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Read and hash every capture of a one-input image model (an .npz names its array ``x`` or `input_name`).

    Returns:
        (table, pixels): one table row per metadata row with columns ``capture_id``, ``source_row``,
        ``sha256`` (pixel hash), ``pixel_index`` (row in `pixels`, -1 when unusable), ``excluded``
        (reason, "" when usable), ``detail``, the strata columns and the augmentation flag (as
        ``augmented_flag``); `pixels` stacks the usable samples (N, C, H, W) in their original dtype.
    """
    table = read_metadata(spec)
    is_folder = spec.path.is_dir()
    ids = _ids(table, spec, is_folder)
    samples = [s[None] if isinstance(s, np.ndarray) and s.ndim == 2 else s
               for s in _load_samples(spec, table, progress, input_name)]

    shapes = Counter(s.shape for s in samples if isinstance(s, np.ndarray))
    shape = shapes.most_common(1)[0][0] if shapes else None
    excluded, detail, hashes, keep = [], [], [], []
    for s in samples:
        reason, why, h = "", "", ""
        if isinstance(s, str):
            reason, why = "unreadable", s.removeprefix("unreadable: ")
        else:
            h = pixel_hash(s)
            if s.shape != shape:
                reason, why = "shape", f"shape {s.shape} differs from the pool's {shape}"
            elif np.issubdtype(s.dtype, np.floating) and not np.isfinite(s).all():
                n = int((~np.isfinite(s)).sum())
                reason, why = "non-finite", f"{n} NaN/Inf value(s)"
            elif not (np.issubdtype(s.dtype, np.number) or s.dtype == bool):
                reason, why = "unreadable", f"dtype {s.dtype} is not numeric"
        excluded.append(reason)
        detail.append(why)
        hashes.append(h)
        keep.append(s if not reason else None)

    pixel_index, kept = [], []
    for s in keep:
        pixel_index.append(len(kept) if s is not None else -1)
        if s is not None:
            kept.append(s)
    pixels = np.stack(kept) if kept else np.zeros((0, 0, 0, 0), dtype=np.uint8)

    out = pd.DataFrame({"capture_id": ids, "source_row": np.arange(len(table)), "sha256": hashes,
                        "pixel_index": pixel_index, "excluded": excluded, "detail": detail})
    if is_folder:
        out["path"] = table[spec.path_column].astype(str).to_numpy()
    return _with_metadata(out, table, spec), pixels


def _with_metadata(out: pd.DataFrame, table: pd.DataFrame, spec: CaptureSpec) -> pd.DataFrame:
    """The strata columns, the augmentation flag (``augmented_flag``) and the capture time of the metadata."""
    for col in spec.strata:
        out[col] = table[col].astype(str).to_numpy()
    if spec.augmented_column:
        out["augmented_flag"] = table[spec.augmented_column].map(_truthy).to_numpy()
    else:
        out["augmented_flag"] = False
    for col in ("captured_at", "capture_time", "timestamp"):
        if col in table.columns:
            out["captured_at"] = table[col].astype(str).to_numpy()
            break
    return out


def _array_index(spec: CaptureSpec, table: pd.DataFrame, n: int) -> np.ndarray:
    """The array index of each metadata row (the index column, else row i is sample i), checked against `n` samples."""
    if spec.index_column in table.columns:
        index = table[spec.index_column].astype(int).to_numpy()
    elif len(table) == n:
        index = np.arange(n)
    else:
        raise SpecError(
            f"capture metadata {spec.metadata} has {len(table)} rows but {spec.path} holds {n} samples; "
            f"add an {spec.index_column!r} column mapping rows to array indices"
        )
    bad = [f"row {i} (index {j})" for i, j in enumerate(index) if not 0 <= j < n]
    if bad:
        raise SpecError(f"capture metadata {spec.metadata}: rows point past the {n} samples of {spec.path}: {_first(bad)}")
    return index


def read_capture_arrays(spec: CaptureSpec, inputs: list[InputSpec]) -> Batch:
    """The capture file's raw samples of every model input, checked as a data split's are (`check_inputs`).

    An .npz holds one array per model input name (a one-input model may name it ``x``, or use an .npy). Refused with
    a SpecError naming what to change: an image folder (it holds one image input), a missing input, ragged or object
    arrays, float values for an integer input, a per-sample shape the model does not take, inputs with different
    sample counts or disagreeing on a shared dynamic axis.
    """
    names = [i.name for i in inputs]
    path = spec.path
    if path.is_dir():
        raise SpecError(f"captures {path} is a folder of images, but model inputs {names} are not one image input "
                        f"([batch, C, H, W] float): store the captures as an .npz with one array per input name "
                        f"({', '.join(names)}) and a metadata table with an {spec.index_column!r} column")
    if not path.is_file():
        raise SpecError(f"captures {path} is neither a folder of images nor an array file")
    what = f"capture array file {path}"
    if path.suffix == ".npy":
        if len(names) > 1:
            raise SpecError(f"{what} holds one array, but the model has inputs {names}: use an .npz with one array "
                            f"per input name")
        return check_inputs({names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}, None, inputs, what)
    if path.suffix != ".npz":
        raise SpecError(f"captures {path} must be a folder of images or a .npy/.npz file")
    raw, _ = read_npz_inputs(path, names, what, f"captures hold one array per model input name "
                             f"({', '.join(names)}), rows addressed by the metadata's {spec.index_column!r} column")
    return check_inputs(raw, None, inputs, what)


def ingest_input_captures(spec: CaptureSpec, inputs: list[InputSpec], pp: Preprocess,
                          progress: Progress | None = None) -> tuple[pd.DataFrame, Batch]:
    """Read and identify every capture of a model that is not one image input (`is_image_model`).

    Returns:
        (table, arrays): the table as `ingest_captures` gives it, with ``sha256`` the sample's exact content identity
        over all of its inputs (`batch_content_ids`: int inputs by their int64 values, float inputs on the content
        grid); `arrays` holds the usable samples of every input, {name: (N, ...)} raw, in the model's layout and the
        stored dtype, row ``pixel_index`` of the table. A sample with a NaN/Inf value in a float input is excluded
        (``non-finite``).
    """
    arrays = read_capture_arrays(spec, inputs)
    table = read_metadata(spec)
    ids = _ids(table, spec, False)
    index = _array_index(spec, table, len(next(iter(arrays.values()))))
    rows = take(arrays, index)
    if progress:
        progress(len(index), len(index))
    bad = np.zeros(len(index), int)
    detail = [""] * len(index)
    for i in inputs:
        a = rows[i.name]
        if np.issubdtype(a.dtype, np.floating):
            n_bad = (~np.isfinite(a)).reshape(len(a), -1).sum(1)
            for r in np.flatnonzero(n_bad):
                detail[r] += ("; " if detail[r] else "") + f"{int(n_bad[r])} NaN/Inf value(s) in input {i.name!r}"
            bad += n_bad
    hashes = batch_content_ids(rows, inputs, pp, what="the capture pool (data.captures)")
    keep = np.flatnonzero(bad == 0)
    pixel_index = np.full(len(index), -1)
    pixel_index[keep] = np.arange(len(keep))
    out = pd.DataFrame({"capture_id": ids, "source_row": np.arange(len(table)), "sha256": hashes,
                        "pixel_index": pixel_index, "excluded": np.where(bad > 0, "non-finite", ""),
                        "detail": detail})
    out["array_index"] = index
    return _with_metadata(out, table, spec), take(rows, keep)


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes", "y", "t")
    try:
        return bool(v) and not pd.isna(v)
    except (TypeError, ValueError):
        return bool(v)


def array_to_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def table_to_parquet(t: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    t.to_parquet(buf, index=False)
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))


def open_npy(path: str | Path) -> np.ndarray:
    """A read-only memory map of an .npy file: the data is not copied into memory."""
    return np.load(path, mmap_mode="r", allow_pickle=False)
