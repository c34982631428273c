"""Samples fed to a model one at a time: an ONNX Runtime `CalibrationDataReader` that is also an `nncf.Dataset` source.

One reader type serves quantization (ORT's `quantize_static`, NNCF), the sensitivity table and validation's
localization. It wraps an approved calibration version (`open_calibration`: every input's samples memory-mapped
from the verified store objects, so the data is never held twice) or plain arrays (validation data, a training split,
a test's stand-in).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
from numpy.typing import DTypeLike
from onnxruntime.quantization import CalibrationDataReader

from edgeq.calibration.ingest import open_npy
from edgeq.calibration.versions import CalibrationVersion, get_approved
from edgeq.core.data import batch_content_ids
from edgeq.core.errors import CalibrationError
from edgeq.core.quiet import import_nncf
from edgeq.core.specs import InputSpec, Preprocess
from edgeq.core.store import ArtifactStore

# What an input is fed as when the caller declares nothing: calibration versions store preprocessed float32 samples.
DEFAULT_DTYPE = np.float32


class CalibrationReader(CalibrationDataReader):
    """Named model inputs, one sample per batch: `{input name: array[1, ...]}`, each input cast to its declared dtype.

    `inputs` maps each model input to its samples (first axis: the sample; every input the same count). `dtypes`
    declares the dtype each input is fed as (the model's `inputs[].dtype`); undeclared inputs are fed as float32.

    `get_next()` walks the samples once (ONNX Runtime's contract: `None` at the end; `rewind()` restarts it);
    iterating (`for feed in reader`) starts afresh every time and leaves `get_next()`'s position alone, as NNCF's
    passes and ONNX Runtime's `qdq_loss_debug` need.
    """

    def __init__(self, inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, DTypeLike] | None = None,
                 version: CalibrationVersion | None = None):
        if not inputs:
            raise ValueError("a calibration reader needs at least one named input")
        counts = {name: len(a) for name, a in inputs.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"every input needs one sample per item, got {counts}")
        self.inputs: dict[str, np.ndarray] = dict(inputs)
        self.dtypes: dict[str, np.dtype] = {name: np.dtype((dtypes or {}).get(name, DEFAULT_DTYPE)) for name in inputs}
        self.version = version
        self._start, self._end = 0, next(iter(counts.values()))
        self._pos = 0

    @property
    def names(self) -> list[str]:
        return list(self.inputs)

    @property
    def samples(self) -> np.ndarray:
        """The samples of a single-input reader (as stored: an approved version's are a read-only memory map)."""
        if len(self.inputs) != 1:
            raise ValueError(f"reader has {len(self.inputs)} inputs ({', '.join(self.inputs)}): read .inputs[name]")
        return next(iter(self.inputs.values()))

    def feed(self, i: int) -> dict[str, np.ndarray]:
        """Sample `i` as a model feed (batch of 1); no copy where the stored dtype is the declared one."""
        return {name: np.ascontiguousarray(a[i : i + 1], dtype=self.dtypes[name]) for name, a in self.inputs.items()}

    def head(self, n: int) -> CalibrationReader:
        """A reader over the first `n` samples of this one's range (views, not copies)."""
        end = min(self._end, self._start + n)
        return CalibrationReader({name: a[self._start : end] for name, a in self.inputs.items()}, self.dtypes,
                                 self.version)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        self._pos += 1
        return self.feed(self._pos - 1)

    def rewind(self) -> None:
        self._pos = self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        n = len(next(iter(self.inputs.values())))
        self._start, self._end = max(0, start_index), min(n, end_index)
        self._pos = self._start

    def __len__(self) -> int:
        return self._end - self._start

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.feed(i) for i in range(self._start, self._end))

    def as_nncf_dataset(self, transform_fn: Callable[[dict[str, np.ndarray]], Any] | None = None):
        """This reader as an `nncf.Dataset` (items are the same feed dicts unless `transform_fn` maps them)."""
        nncf = import_nncf()  # seconds to import, and only NNCF's paths need it

        return nncf.Dataset(self, transform_fn)


def version_inputs(store: ArtifactStore, record: CalibrationVersion) -> dict[str, np.ndarray]:
    """Every input a version holds, `{name: samples}`, memory-mapped from the verified store objects (not copied).

    An older one-input record (no `inputs`) gives its one array under `input_name`.
    """
    out = {}
    for rec in record.input_records():
        ref = record.artifacts.get(rec.artifact)
        if ref is None:
            raise CalibrationError(f"calibration version {record.version} lists input {rec.name!r} but holds no "
                                   f"artifact {rec.artifact!r} (it holds {sorted(record.artifacts)})")
        out[rec.name] = open_npy(store.local_path(ref))
    return out


def version_content_ids(store: ArtifactStore, record: CalibrationVersion, inputs: list[InputSpec],
                        pp: Preprocess) -> list[str]:
    """The content identity of each sample of a version, over all of its inputs (`batch_content_ids`), as the model
    with `inputs` and `data.preprocess` `pp` sees it: what validation compares with the test split's.

    Raises:
        CalibrationError: the version holds other inputs than the model takes.
    """
    held = record.input_names
    names = [i.name for i in inputs]
    if sorted(held) != sorted(names):
        raise CalibrationError(f"calibration version {record.version} holds inputs {held}, but the model takes {names}: "
                               f"it was built for another model; rebuild it (`edgeq calibrate CONFIG`)")
    return batch_content_ids(version_inputs(store, record), inputs, pp, made_with=Preprocess(**record.preprocess),
                             what=f"calibration version {record.version}")


def open_calibration(store: ArtifactStore | str, version: str = "latest", model: str | None = None,
                     input_name: str | None = None, dtype: DTypeLike | None = None) -> CalibrationReader:
    """The approved calibration version `version` (an id, or "latest" approved for `model`) as a reader.

    The reader yields EVERY input the version holds, `{name: array[1, ...]}` per item, each as the dtype its record
    declares (the model's `inputs[].dtype`: int64 token ids and masks stay int64). For a one-input version,
    `input_name` renames its input and `dtype` overrides its dtype (the defaults: the version's own). For a version
    of several inputs, `input_name`, when given, must be one of them (every input is fed either way) and `dtype` is
    not used: each input keeps its declared dtype.

    Raises:
        NotApproved / VersionNotFound (both `CalibrationError`): a candidate, rejected or unknown version.
        CalibrationError: `input_name` is not an input of a version of several inputs.
    """
    store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
    record = get_approved(store, version, model=model)
    recs = record.input_records()
    arrays = version_inputs(store, record)
    if len(recs) == 1:
        name = input_name or recs[0].name
        return CalibrationReader({name: arrays[recs[0].name]}, {name: dtype or recs[0].dtype}, record)
    if input_name is not None and input_name not in arrays:
        raise CalibrationError(f"calibration version {record.version} holds inputs {list(arrays)}, not "
                               f"{input_name!r}: it was built for another model's inputs; rebuild it "
                               f"(`edgeq calibrate CONFIG`)")
    return CalibrationReader(arrays, {r.name: r.dtype for r in recs}, record)
