"""Tiny ONNX models built with onnx.helper, for the backend tests."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def custom_op_model(path: Path, domain: str = "com.acme", op_type: str = "MyCustomOp") -> Path:
    """x -> Relu -> <custom op> -> y; the custom node is named 'custom0'."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu0"),
             helper.make_node(op_type, ["t"], ["y"], name="custom0", domain=domain)]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "custom", [x], [y]), opset_imports=opsets)
    onnx.save(model, str(path))
    return path


def standard_model(path: Path, op_type: str = "Relu", opset: int = 17, batch: int | str = "batch") -> Path:
    """x[batch, 4] -> <one standard op> -> y, named 'op0'."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    model = helper.make_model(helper.make_graph([helper.make_node(op_type, ["x"], ["y"], name="op0")], "std", [x], [y]),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
