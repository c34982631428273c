"""Load data splits named by a DataSpec, apply the model's preprocessing, and give samples a content identity."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from edgeq.core.errors import SpecError
from edgeq.core.specs import InputSpec, Preprocess, SplitSource, load_object

# A batch of samples: {model input name: array with the samples along axis 0}, every input of the model.
Batch = dict[str, np.ndarray]


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


# ---------------------------------------------------------------- named inputs
def batch_size(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch (every input holds as many)."""
    return len(next(iter(batch.values()))) if batch else 0


def take(batch: Mapping[str, np.ndarray], index) -> Batch:
    """The same samples (a slice, an index array) of every input."""
    return {k: v[index] for k, v in batch.items()}


def input_preprocess(spec: InputSpec, pp: Preprocess) -> Preprocess | None:
    """One input's preprocessing: its own, else `data.preprocess` for a float input; never for integer/bool inputs."""
    if not spec.is_float:
        return None
    return spec.preprocess if spec.preprocess is not None else pp


def _as_array(v, name: str, what: str) -> np.ndarray:
    try:
        a = np.asarray(v)
    except ValueError as exc:  # numpy refuses ragged nested lists
        raise SpecError(f"{what}: input {name!r} is ragged (its samples differ in shape: {exc}); pad every sample "
                        "to one length (and give the padding in a mask input)") from None
    if a.dtype == object:
        raise SpecError(f"{what}: input {name!r} is ragged or holds Python objects (dtype object); store one "
                        "numeric array with every sample padded to one length")
    if a.ndim == 0:
        raise SpecError(f"{what}: input {name!r} is a scalar, not an array of samples")
    return a


def check_inputs(raw: Mapping[str, object], y, inputs: list[InputSpec], what: str) -> Batch:
    """Raw arrays for every model input, checked against `inputs`; returns them in the model's layout.

    Refused with a SpecError naming the input: a missing input, ragged samples, float values for an integer or
    bool input, a sample shape the declared shape does not take (a channels-last image batch is transposed,
    as `to_model_layout` says), inputs with different sample counts (or a label count that differs), and
    inputs that disagree on the size of a dynamic axis they share (`seq` of input_ids and attention_mask).
    """
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in raw]
    if missing:
        raise SpecError(f"{what} has no data for model input(s) {missing} (it holds {sorted(raw)}); model.inputs "
                        f"names {names}")
    out: Batch = {}
    for spec in inputs:
        a = _as_array(raw[spec.name], spec.name, what)
        if not spec.is_float and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise SpecError(f"{what}: input {spec.name!r} is declared {spec.dtype} but the data holds {a.dtype} "
                            f"values: token ids, masks and other integer inputs must be stored as integers")
        try:
            if len(a.shape) != len(spec.shape) and not spec.is_float:
                raise SpecError("no layout change for integer inputs")
            a = to_model_layout(a, spec, f"{what}, input {spec.name!r}")
        except SpecError:
            raise SpecError(f"input {spec.name!r} expects samples of shape {list(spec.shape[1:])} but the data has "
                            f"{list(a.shape[1:])} ({what}; a channels-last image batch is transposed, nothing else "
                            "is changed): fix the data or model.inputs") from None
        out[spec.name] = a
    counts = {n: len(a) for n, a in out.items()}
    if y is not None:
        counts["y (labels)"] = len(y)
    if len(set(counts.values())) > 1:
        raise SpecError(f"{what}: inputs hold different numbers of samples: {counts}")
    if not batch_size(out):
        raise SpecError(f"{what} is empty")
    shared: dict[str, dict[str, int]] = {}
    for spec in inputs:
        for axis, dim in spec.dynamic_axes.items():
            if axis:
                shared.setdefault(dim, {})[spec.name] = out[spec.name].shape[axis]
    for dim, sizes in shared.items():
        if len(set(sizes.values())) > 1:
            raise SpecError(f"{what}: inputs that share the dynamic axis {dim!r} disagree on its size: {sizes}; "
                            f"every input with {dim!r} in its shape must hold the same length per batch")
    return out


def read_npz_inputs(path: Path, names: list[str], what: str, layout: str) -> tuple[Batch, np.ndarray | None]:
    """One array per model input name from an .npz (a one-input model may name its array ``x``), and ``y`` when
    present. A ragged or object array, an unreadable file or a missing input is a SpecError naming `what`;
    `layout` says how the file should be laid out."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if len(names) == 1 and names[0] not in z and "x" in z:
                raw = {names[0]: z["x"]}
            else:
                raw = {n: z[n] for n in names if n in z}
            y = z["y"] if "y" in z else None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise SpecError(f"{what} holds a ragged or object array, which edgeq does not unpickle: store one "
                            "numeric array per input with every sample padded to one length") from None
        raise SpecError(f"{what} cannot be read: {exc}") from None
    missing = [n for n in names if n not in raw]
    if missing:
        raise SpecError(f"{what} has no array for model input(s) {missing} (it holds {keys}): {layout}")
    return raw, y


def load_raw_inputs(src: SplitSource, inputs: list[InputSpec]) -> tuple[Batch, np.ndarray | None]:
    """Raw (unpreprocessed) samples of every model input, and the labels, of one split, checked (`check_inputs`).

    Sources: an .npz with one array per model input name (a one-input model may name its array ``x``) and an
    optional ``y``; an .npy or an image folder (one-input models); a loader returning ``(x, y)``, where x is a
    dict {input name: array} (or one array for a one-input model) and y labels or None.
    """
    names = [i.name for i in inputs]
    what = f"data split from {src.path or src.loader}"
    if src.kind == "loader":
        out = load_object(src.loader)(**src.kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise SpecError(f"data loader {src.loader} must return (inputs, labels): inputs a dict {{input name: "
                            f"array}} (or one array for a one-input model), labels an array or None; got "
                            f"{type(out).__name__}")
        x, y = out
        if not isinstance(x, Mapping):
            if len(names) > 1:
                raise SpecError(f"data loader {src.loader} returned one array, but the model has inputs {names}: "
                                "return a dict {input name: array}")
            x = {names[0]: x}
        y = None if y is None else _as_array(y, "y", what)
        return check_inputs(x, y, inputs, what), y
    if src.kind == "image_folder" or src.path.suffix == ".npy":
        if len(names) > 1:
            raise SpecError(f"{what}: an {'image folder' if src.kind == 'image_folder' else '.npy file'} holds one "
                            f"input, but the model has inputs {names}: use an .npz with one array per input name")
        x, y = load_raw(src)
        return check_inputs({names[0]: x}, y, inputs, what), y
    path = src.path
    if not path.is_file():
        raise SpecError(f"array file {path} does not exist")
    raw, y = read_npz_inputs(path, names, f"array file {path}",
                             f"an .npz holds one array per model input name ({names}), and optionally 'y'")
    return check_inputs(raw, y, inputs, what), y


def preprocess_inputs(raw: Mapping[str, np.ndarray], inputs: list[InputSpec], pp: Preprocess, *,
                      preprocessed: bool = False, what: str = "samples") -> Batch:
    """The model's input for each raw input: float inputs through their preprocessing (unless ``preprocessed``),
    integer and bool inputs as their declared dtype."""
    out = {}
    for spec in inputs:
        a = raw[spec.name]
        own = input_preprocess(spec, pp)
        if own is None:
            out[spec.name] = a.astype(spec.dtype, copy=False)
        elif preprocessed:
            out[spec.name] = a.astype(np.float32, copy=False)
        else:
            check_raw(a, own, f"{what}, input {spec.name!r}")
            out[spec.name] = preprocess(a, own)
    return out


def load_inputs(src: SplitSource, inputs: list[InputSpec], pp: Preprocess) -> tuple[Batch, np.ndarray | None]:
    """The model's input for every named input of one split, and its labels (None when the split has none)."""
    raw, y = load_raw_inputs(src, inputs)
    return preprocess_inputs(raw, inputs, pp, preprocessed=src.preprocessed,
                             what=f"data split from {src.path or src.loader}"), y


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


def batch_content_ids(batch: Mapping[str, np.ndarray], inputs: list[InputSpec], pp: Preprocess, *,
                      made_with: Preprocess | None = None, what: str = "samples") -> list[str]:
    """One content identity per sample over ALL of its inputs, for any modality.

    A one-input float model keeps `content_ids` exactly (the image rule: the same picture however stored). With
    integer inputs (token ids, masks) or several inputs, a sample's identity is the sha256 of each input's
    canonical form, by input name: float inputs as `content_ids` puts them, integer and bool inputs as their
    exact int64 values. Two samples are the same only when every input is; no perceptual rule applies.
    ``made_with`` is the preprocessing that made float samples that are model input already.
    """
    def own(spec: InputSpec, p: Preprocess | None) -> Preprocess | None:
        return None if p is None else input_preprocess(spec, p)

    if len(inputs) == 1 and inputs[0].is_float:
        spec = inputs[0]
        return content_ids(batch[spec.name], own(spec, pp), spec, made_with=own(spec, made_with), what=what)
    per_input: list[tuple[str, list[str]]] = []
    for spec in inputs:
        a = np.asarray(batch[spec.name])
        if spec.is_float:
            ids = content_ids(a, own(spec, pp), spec, made_with=own(spec, made_with),
                              what=f"{what}, input {spec.name!r}")
        else:
            tag = f"{CONTENT_ID_SCHEME}-int{list(a.shape[1:])}".encode()
            ids = []
            for i in range(0, len(a), _CHUNK):
                for s in np.asarray(a[i:i + _CHUNK], dtype=np.int64):
                    h = hashlib.sha256(tag)
                    h.update(np.ascontiguousarray(s).tobytes())
                    ids.append(h.hexdigest())
        per_input.append((spec.name, ids))
    out = []
    for parts in zip(*(ids for _, ids in per_input)):
        h = hashlib.sha256(f"{CONTENT_ID_SCHEME}-inputs".encode())
        for (name, _), part in zip(per_input, parts):
            h.update(f"|{name}={part}".encode())
        out.append(h.hexdigest())
    return out


def split_batch_content_ids(src: SplitSource, inputs: list[InputSpec], pp: Preprocess, what: str) -> list[str]:
    """`batch_content_ids` of a data split's samples, honouring its ``preprocessed`` flag."""
    raw, _ = load_raw_inputs(src, inputs)
    return batch_content_ids(raw, inputs, pp, made_with=pp if src.preprocessed else None, what=what)
