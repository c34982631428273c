"""Which layers cost the most accuracy when quantized: per-tensor SQNR between FP32 and QDQ activations.

Uses ONNX Runtime's QDQ debugging tools (`onnxruntime.quantization.qdq_loss_debug`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel

from edgeq.calibration.readers import CalibrationReader
from edgeq.core.quiet import muted_output


class SensitivityRow(BaseModel):
    node: str
    op_type: str
    tensor: str
    qdq_sqnr_db: float  # error of quantizing this tensor alone (lower = more sensitive)
    xmodel_sqnr_db: float  # INT8 model vs FP32 model at this tensor (accumulated)


def sensitivity_table(fp32_pre: Path, qdq: Path, data: CalibrationReader, op_types: list[str]) -> list[SensitivityRow]:
    """Rows for the outputs of quantizable nodes, most sensitive first, measured on the first 32 samples of `data`."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    reader = data.head(32)
    with tempfile.TemporaryDirectory() as tmp, muted_output():
        f_aug, q_aug = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(fp32_pre), str(f_aug))
        modify_model_output_intermediate_tensors(str(qdq), str(q_aug))
        f_act = collect_activations(str(f_aug), reader)
        q_act = collect_activations(str(q_aug), reader)
        errors = compute_activation_error(create_activation_matching(q_act, f_act))
    producers = {o: n for n in onnx.load(str(fp32_pre), load_external_data=False).graph.node for o in n.output}
    rows = []
    for tensor, err in errors.items():
        node = producers.get(tensor)
        if node is None or node.op_type not in op_types:
            continue
        rows.append(SensitivityRow(node=node.name, op_type=node.op_type, tensor=tensor,
                                   qdq_sqnr_db=float(err.get("qdq_err", np.nan)),
                                   xmodel_sqnr_db=float(err.get("xmodel_err", np.nan))))
    return sorted(rows, key=lambda r: (np.nan_to_num(r.qdq_sqnr_db, nan=np.inf), r.xmodel_sqnr_db))
