"""Samples fed to a model one at a time: an ONNX Runtime `CalibrationDataReader` that is also an `nncf.Dataset` source.

One reader type serves quantization (ORT's `quantize_static`, NNCF), the sensitivity table and validation's
localization. It wraps an approved calibration version (`open_calibration`: the preprocessed samples memory-mapped
from the verified store object, so the data is never held twice) or plain arrays (validation data, a training split,
a test's stand-in).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
from numpy.typing import DTypeLike
from onnxruntime.quantization import CalibrationDataReader

from edgeq.calibration.ingest import open_npy
from edgeq.calibration.versions import CalibrationVersion, get_approved
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
        import nncf  # seconds to import, and only NNCF's paths need it

        return nncf.Dataset(self, transform_fn)


def open_calibration(store: ArtifactStore | str, version: str = "latest", model: str | None = None,
                     input_name: str | None = None, dtype: DTypeLike = DEFAULT_DTYPE) -> CalibrationReader:
    """The approved calibration version `version` (an id, or "latest" approved for `model`) as a reader.

    Its samples feed `input_name` (default: the input the version was built for) as `dtype`.

    Raises:
        NotApproved / VersionNotFound (both `CalibrationError`): a candidate, rejected or unknown version.
    """
    store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
    record = get_approved(store, version, model=model)
    name = input_name or record.input_name
    return CalibrationReader({name: open_npy(store.local_path(record.artifacts["samples"]))}, {name: dtype}, record)
