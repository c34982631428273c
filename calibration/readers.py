"""An approved calibration version as an ONNX Runtime `CalibrationDataReader` and an `nncf.Dataset`.

The samples (preprocessed float32, N x C x H x W) are memory-mapped from the verified store
object; each item is a batch-of-1 view into that map, so the data is never held twice.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgeq.calibration.ingest import open_npy
from edgeq.calibration.versions import CalibrationVersion, get_approved
from edgeq.core.store import ArtifactStore


class CalibrationSet(CalibrationDataReader):
    """An approved version's samples, one `{input_name: array[1, ...]}` at a time.

    `get_next()` walks the set once (ONNX Runtime's contract, `None` at the end; `rewind()` restarts it);
    iterating (`for feed in cal`) starts afresh each time, as NNCF needs.
    """

    def __init__(self, store: ArtifactStore, version: CalibrationVersion, input_name: str | None = None):
        self.version = version
        self.input_name = input_name or version.input_name
        self.samples = open_npy(store.local_path(version.artifacts["samples"]))
        self._start, self._end = 0, len(self.samples)
        self._pos = 0

    def _item(self, i: int) -> dict[str, np.ndarray]:
        return {self.input_name: np.asarray(self.samples[i : i + 1])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        self._pos += 1
        return self._item(self._pos - 1)

    def rewind(self) -> None:
        self._pos = self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = max(0, start_index), min(len(self.samples), end_index)
        self._pos = self._start

    def __len__(self) -> int:
        return self._end - self._start

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self._item(i) for i in range(self._start, self._end))

    def as_nncf_dataset(self, transform_fn: Callable[[dict[str, np.ndarray]], Any] | None = None):
        """This set as an `nncf.Dataset` (items are the same feed dicts unless `transform_fn` maps them)."""
        import nncf

        return nncf.Dataset(self, transform_fn)


def open_calibration(store: ArtifactStore | str, version: str = "latest", model: str | None = None,
                     input_name: str | None = None) -> CalibrationSet:
    """The approved calibration version `version` (an id, or "latest" approved for `model`) as a reader.

    Raises:
        NotApproved / VersionNotFound (both `CalibrationError`): a candidate, rejected or unknown version.
    """
    store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
    return CalibrationSet(store, get_approved(store, version, model=model), input_name=input_name)
