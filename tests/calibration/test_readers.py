"""One reader type over named inputs: ONNX Runtime's and NNCF's contracts, each input fed in its declared dtype."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.calibration.readers import CalibrationReader


def _two_input_model(path):
    """y = (image * float(mask)) @ W: a float input and an integer one, as a token model's ids and mask."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.random.default_rng(0).normal(size=12).tolist())
    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["image", "maskf"], ["masked"], name="mul"),
         helper.make_node("MatMul", ["masked", "w"], ["y"], name="matmul")],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def reader():
    rng = np.random.default_rng(1)
    # Stored in other dtypes than the model declares: the reader casts each input.
    image = rng.normal(size=(10, 4))  # float64
    mask = (rng.random((10, 4)) > 0.3).astype(np.int32)
    return CalibrationReader({"image": image, "mask": mask}, dtypes={"mask": "int64"})


def test_feeds_every_named_input_one_sample_at_a_time_in_its_dtype(reader):
    from onnxruntime.quantization import CalibrationDataReader

    assert isinstance(reader, CalibrationDataReader) and len(reader) == 10 and reader.names == ["image", "mask"]
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == 10 and reader.get_next() is None
    assert {k: (v.shape, v.dtype) for k, v in feeds[3].items()} == {"image": ((1, 4), np.float32),
                                                                      "mask": ((1, 4), np.int64)}
    np.testing.assert_array_equal(feeds[3]["mask"][0], reader.inputs["mask"][3])
    reader.rewind()
    assert reader.get_next()["image"].tolist() == feeds[0]["image"].tolist()

    # Iterating starts afresh and leaves get_next()'s position alone.
    assert len(list(reader)) == 10 and len(list(reader)) == 10
    assert reader.get_next()["image"].tolist() == feeds[1]["image"].tolist()

    head = reader.head(4)
    assert len(head) == 4 and [f["mask"].tolist() for f in head] == [f["mask"].tolist() for f in feeds[:4]]
    with pytest.raises(ValueError, match="read .inputs"):
        reader.samples


def test_inputs_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one sample per item"):
        CalibrationReader({"image": np.zeros((3, 4)), "mask": np.zeros((2, 4))})


def test_onnxruntime_quantizes_and_debugs_a_two_input_model_with_it(reader, tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    src = _two_input_model(tmp_path / "m.onnx")
    quantize_static(str(src), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"])
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}

    modify_model_output_intermediate_tensors(str(src), str(tmp_path / "aug.onnx"))
    acts = collect_activations(str(tmp_path / "aug.onnx"), reader)
    assert len(acts["masked"]) == 10


def test_as_an_nncf_dataset(reader):
    ds = reader.as_nncf_dataset()
    items = list(ds.get_inference_data())
    assert len(items) == 10 and set(items[0]) == {"image", "mask"} and items[0]["mask"].dtype == np.int64
    assert len(list(ds.get_inference_data())) == 10  # iterable again, as NNCF's passes need
