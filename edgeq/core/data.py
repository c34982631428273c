"""Load data splits named by a DataSpec, apply the model's preprocessing, and give samples a content identity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from edgeq.core.errors import SpecError
from edgeq.core.specs import InputSpec, Preprocess, SplitSource, load_object


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


def check_raw(raw: np.ndarray, pp: Preprocess, what: str) -> None:
    """Refuse float samples that look scaled already where raw pixels are expected.

    A split not marked ``preprocessed`` holds raw values, which ``data.preprocess`` turns into the model's
    input. When that preprocessing scales (``scale`` != 1, e.g. 1/255 for 8-bit pixels), raw values are whole
    numbers; float samples with fractional values there would be scaled twice, and their content identity
    could never equal that of the same picture stored as integers. Non-finite values are left to the
    stages that report them.
    """
    if pp.scale == 1 or not np.issubdtype(raw.dtype, np.floating) or len(raw) == 0:
        return
    frac = 0
    for i in range(0, len(raw), _CHUNK):
        frac += int((~_whole(np.asarray(raw[i:i + _CHUNK], dtype=np.float64))).sum())
    if frac:
        raise SpecError(
            f"{what} holds {raw.dtype} samples with fractional values ({frac} of {len(raw)} samples) but is not "
            f"marked `preprocessed: true`, while data.preprocess scales raw pixel values (scale {pp.scale:g}): "
            f"they look scaled already and cannot be put in one form with raw captures. Mark the split "
            f"`preprocessed: true` if they are the model's input, or store the raw pixel values"
        )


def load_split(src: SplitSource, pp: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's input (float32) and labels of one split; an empty split is an error.

    A split marked ``preprocessed`` is the model's input already and is used as it is; any other split holds
    raw values and goes through `preprocess` (see `check_raw`).
    """
    raw, y = load_raw(src)
    if len(raw) == 0:
        raise SpecError(f"data split from {src.path or src.loader} is empty")
    if src.preprocessed:
        return raw.astype(np.float32), y
    check_raw(raw, pp, f"data split from {src.path or src.loader}")
    return preprocess(raw, pp), y


# ---------------------------------------------------------------- content identity
# The scheme of `content_ids`; change it with the rule. Cache keys of the steps that compare identities
# carry it, so a result cached under an older rule is checked again.
CONTENT_ID_SCHEME = "model-input-v1"
# Model-input values of samples whose raw values are not whole numbers are rounded to this many decimals.
CONTENT_DECIMALS = 4
# Raw values within this of a whole number are that number: float32 noise from scaling and unscaling
# moves 8- and 16-bit pixel values by far less, and the next pixel value is 1 away.
_WHOLE_TOL = 0.01
_CHUNK = 64


def _whole(r: np.ndarray) -> np.ndarray:
    """Per sample of `r` (N, ...): are all its finite values whole numbers (within `_WHOLE_TOL`)?"""
    off = np.abs(r - np.rint(r)).reshape(len(r), -1)
    return ~(off > _WHOLE_TOL).any(1)  # NaN/Inf give NaN offsets, which compare False


def _per_channel(v: float | list[float], ndim: int) -> np.ndarray:
    """A mean/std broadcast over (N, C, ...) as `preprocess` does (per channel on axis 1)."""
    a = np.asarray(v, dtype=np.float64)
    return a.reshape(1, -1, *([1] * (ndim - 2))) if a.ndim else a


def _fits(shape: tuple[int, ...], want: list[int | str]) -> bool:
    return len(shape) == len(want) and all(isinstance(w, str) or w == g for g, w in zip(shape, want))


def to_model_layout(samples: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    """`samples` (N, ...) in the per-sample shape that model input `spec` declares (its shape after the batch axis).

    Samples that fit are taken as they are: that is how the pipeline feeds a split to the model, so a declared
    shape that fits both ways (all three sides equal) keeps the stored layout. Otherwise a channels-last batch
    (N, H, W, C) is transposed to the model's channels-first (N, C, H, W), and 2-D samples (N, H, W) get the
    channel axis of a one-channel model. Anything else raises SpecError naming both shapes.
    """
    want = list(spec.shape[1:])
    got = tuple(samples.shape[1:])
    if _fits(got, want):
        return samples
    if len(got) == 3 and _fits((got[2], got[0], got[1]), want):
        return samples.transpose(0, 3, 1, 2)
    if len(got) == 2 and _fits((1, *got), want):
        return samples[:, None]
    raise SpecError(
        f"{what} holds samples of shape {list(got)} but model input {spec.name!r} takes {want} per sample (after "
        f"the batch axis), and no layout change (channels-last to channels-first) turns one into the other: "
        f"these samples and the model's other data cannot be put in one form to compare; fix the data or "
        f"model.inputs"
    )


def to_raw(x: np.ndarray, pp: Preprocess) -> np.ndarray:
    """The raw values (float64) that preprocessing `pp` turned into `x` (N, C, ...): (x * std + mean) / scale."""
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (x64 * _per_channel(pp.std, x64.ndim) + _per_channel(pp.mean, x64.ndim)) / pp.scale


def _canonical(chunk: np.ndarray, pp: Preprocess, made_with: Preprocess | None) -> np.ndarray:
    """The model input of each sample of `chunk` (model layout), on the fixed grid `content_ids` describes."""
    if made_with is None and not np.issubdtype(chunk.dtype, np.floating):
        x = preprocess(chunk, pp)  # whole raw values: exactly what the pipeline feeds the model
    else:
        r = np.asarray(chunk, dtype=np.float64) if made_with is None else to_raw(chunk, made_with)
        whole = _whole(r)
        r[whole] = np.rint(r[whole])
        with np.errstate(invalid="ignore", over="ignore"):
            x = preprocess(r, pp)
            if not whole.all():
                x[~whole] = np.round(x[~whole].astype(np.float64), CONTENT_DECIMALS)
    x += np.float32(0)  # -0.0 becomes 0.0
    x[np.isnan(x)] = np.nan  # one NaN bit pattern
    return x


def content_ids(samples: np.ndarray, pp: Preprocess, spec: InputSpec, *, made_with: Preprocess | None = None,
                what: str = "samples") -> list[str]:
    """One canonical content identity per sample: the same picture gives the same id however it is stored.

    The identity is the sha256 of the model's input for the sample, as float32 in the model's declared
    layout, on a fixed grid:

    - layout: `to_model_layout` (as stored when it fits `spec`, else channels-last transposed, else SpecError);
    - values: raw samples (``made_with`` None) go through `pp` (``data.preprocess``). Samples stored as the
      model's input already (a split marked ``preprocessed: true``, a calibration version's samples) are taken
      back to raw values through the preprocessing that made them, ``made_with``;
    - grid: a sample whose raw values are all whole numbers (8- or 16-bit pixels, however stored) becomes
      exactly ``preprocess(raw)``, so uint8 captures and a float32 split scaled from them match bit for bit;
      any other sample's model input is rounded to `CONTENT_DECIMALS` decimals (two copies of such a sample
      can still differ where float noise straddles a rounding boundary).

    Raw float samples with fractional values under a scaling `pp` are refused (`check_raw`): whether they are
    raw or already scaled is not for this function to guess.
    """
    x = to_model_layout(np.asarray(samples), spec, what)  # no copy: a memory map is read chunk by chunk
    if made_with is None:
        check_raw(x, pp, what)
    tag = f"{CONTENT_ID_SCHEME}{list(x.shape[1:])}".encode()
    out = []
    for i in range(0, len(x), _CHUNK):
        for s in _canonical(np.asarray(x[i:i + _CHUNK]), pp, made_with):
            h = hashlib.sha256(tag)
            h.update(np.ascontiguousarray(s).tobytes())
            out.append(h.hexdigest())
    return out


def content_id(sample: np.ndarray, pp: Preprocess, spec: InputSpec, *, made_with: Preprocess | None = None,
               what: str = "sample") -> str:
    """`content_ids` of one sample (without the batch axis)."""
    return content_ids(np.asarray(sample)[None], pp, spec, made_with=made_with, what=what)[0]


def split_content_ids(src: SplitSource, pp: Preprocess, spec: InputSpec, what: str) -> list[str]:
    """`content_ids` of a data split's samples, honouring its ``preprocessed`` flag."""
    raw, _ = load_raw(src)
    return content_ids(raw, pp, spec, made_with=pp if src.preprocessed else None, what=what)
