"""Load data splits named by a DataSpec and apply the model's preprocessing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from edgeq.core.errors import SpecError
from edgeq.core.specs import Preprocess, SplitSource, load_object


def pixel_hash(raw: np.ndarray) -> str:
    """Content hash of decoded pixels (dtype, shape and values), so a re-encoded copy hashes the same."""
    a = np.ascontiguousarray(raw)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SpecError(f"table {path} does not exist")
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix in (".csv", ".txt"):
        return pd.read_csv(path)
    raise SpecError(f"table {path} must be .csv or .parquet")


def read_image(path: Path) -> np.ndarray:
    """Decoded pixels as uint8 CHW."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise SpecError(f"image {path} cannot be decoded: {exc}") from exc
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def resolve_inside(root: Path, rel: str) -> Path:
    """`root/rel`, refusing paths that escape root (../, absolute paths, links out)."""
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise SpecError(f"path {rel!r} escapes its folder {root}")
    return p


def load_raw(src: SplitSource) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw (unpreprocessed) samples and labels of one split."""
    if src.kind == "arrays":
        path = src.path
        if not path.is_file():
            raise SpecError(f"array file {path} does not exist")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise SpecError(f"array file {path} has no array 'x' (found {list(z.keys())})")
            return z["x"], (z["y"] if "y" in z else None)
    if src.kind == "image_folder":
        table = read_table(src.labels)
        for col in ("path", "label"):
            if col not in table.columns:
                raise SpecError(f"labels table {src.labels} lacks column {col!r} (has {list(table.columns)})")
        xs = [read_image(resolve_inside(src.path, p)) for p in table["path"]]
        return np.stack(xs), table["label"].to_numpy()
    fn = load_object(src.loader)
    out = fn(**src.kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise SpecError(f"data loader {src.loader} must return (x, y) arrays, got {type(out).__name__}")
    x, y = out
    return np.asarray(x), (None if y is None else np.asarray(y))


def preprocess(raw: np.ndarray, pp: Preprocess) -> np.ndarray:
    x = raw.astype(np.float32) * np.float32(pp.scale)
    mean = np.asarray(pp.mean, dtype=np.float32)
    std = np.asarray(pp.std, dtype=np.float32)
    if mean.ndim:  # per channel, NCHW
        mean = mean.reshape(1, -1, *([1] * (x.ndim - 2)))
    if std.ndim:
        std = std.reshape(1, -1, *([1] * (x.ndim - 2)))
    return ((x - mean) / std).astype(np.float32)


def load_split(src: SplitSource, pp: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed samples (float32) and labels of one split; an empty split is an error."""
    raw, y = load_raw(src)
    if len(raw) == 0:
        raise SpecError(f"data split from {src.path or src.loader} is empty")
    return preprocess(raw, pp), y
