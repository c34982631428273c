"""Calibration-set construction: ingest captures, select, version, review, read.

Quantization uses::

    from edgeq.calibration import open_calibration
    reader = open_calibration(cfg.store_url, "latest", model=cfg.model.name)  # or a version id
    quantize_static(..., calibration_data_reader=reader)    # ONNX Runtime
    nncf.quantize(model, reader.as_nncf_dataset())          # NNCF

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
