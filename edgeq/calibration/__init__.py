"""Calibration-set construction: ingest captures, select, version, review, read.

Quantization uses::

    from edgeq.calibration import open_calibration
    reader = open_calibration(cfg.store_url, "latest", model=cfg.model.name)  # or a version id
    quantize_static(..., calibration_data_reader=reader)    # ONNX Runtime
    nncf.quantize(model, reader.as_nncf_dataset())          # NNCF

The reader yields every input the version holds, `{input name: array[1, ...]}` per item, each in the dtype its
record declares (`CalibrationVersion.inputs`: names, dtypes, per-sample shapes): a token model's `input_ids` and
`attention_mask` as int64, an image model's preprocessed float32 pixels. Records of an older edgeq (one input, no
`inputs`) read as before.

A candidate or rejected version raises `NotApproved`; an unknown one `VersionNotFound`.
"""

from edgeq.calibration.versions import CalibrationVersion, get_approved, list_versions, load_version
from edgeq.core.errors import CalibrationError, NotApproved, VersionNotFound


def open_calibration(*args, **kwargs):
    """See `edgeq.calibration.readers.open_calibration` (imported on use: it loads ONNX Runtime)."""
    from edgeq.calibration.readers import open_calibration as _open

    return _open(*args, **kwargs)


__all__ = ["CalibrationError", "CalibrationVersion", "NotApproved", "VersionNotFound", "get_approved",
           "list_versions", "load_version", "open_calibration"]
