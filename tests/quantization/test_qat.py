"""QAT on the demo with the real libraries (NNCF, torch, onnxruntime, OpenVINO): what a user gets."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeq.core.errors import GateError, SpecError
from edgeq.core.specs import Thresholds
from edgeq.quantization.qat import (
    COMPILED_KERNELS_MIN_STEPS,
    ENGINE,
    QATResult,
    check_export_parity,
    choose_fake_quantize_kernels,
    qat_finetune,
)
from tests.conftest import SMALL_WEIGHTS

INPUT, OUTPUT = "input", "logits"


def _split(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(root / f"{name}.npz") as z:
        return z["x"].astype(np.float32) / 255.0, z["y"]


def _fp32(root: Path) -> torch.nn.Module:
    from edgeq.core.modeling import load_state_dict
    from edgeq.demo import digits_net

    model = digits_net(width=16, num_classes=10)
    model.load_state_dict(load_state_dict(root / SMALL_WEIGHTS))
    return model.eval()


def _ort(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _calibration(root: Path, n: int) -> list[np.ndarray]:
    """Real production-pool images (the planted faults have label -1), one (1, C, H, W) sample per item."""
    x, y = _split(root, "pool")
    return list(x[y >= 0][:n][:, None])


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Batch-1 calibration of an 8x8 CNN is all overhead: on the shared 2-core machine, two OpenMP threads
    per process under load made nncf.quantize 10x slower (30 s vs 3 s for 128 samples). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qat_run(demo_root: Path, tmp_path_factory):
    model = _fp32(demo_root)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xtr, ytr = _split(demo_root, "train")
    xva, _ = _split(demo_root, "validation")
    logged: list[dict] = []
    out = tmp_path_factory.mktemp("qat") / "digits_qat_int8.onnx"
    result = qat_finetune(model, _calibration(demo_root, 128), xtr, ytr, INPUT, OUTPUT, 17, out,
                          epochs=2, check_samples=xva[:64], on_epoch=logged.append, seed=0)
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return result, logged, model, unchanged


def test_qat_int8_onnx_accuracy_within_1pp_of_fp32(qat_run, demo_root):
    result, _, model, _ = qat_run
    xte, yte = _split(demo_root, "test")
    with torch.no_grad():
        fp32_top1 = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    int8_top1 = float((_ort(result.onnx_path).run(None, {INPUT: xte})[0].argmax(1) == yte).mean())
    assert fp32_top1 > 0.9
    # measured on this machine: FP32 0.9630, QAT INT8 ONNX 0.9663 (2 epochs, ORT; OpenVINO 0.9630)
    assert int8_top1 >= fp32_top1 - 0.01, f"QAT INT8 top-1 {int8_top1:.4f} vs FP32 {fp32_top1:.4f}"


def test_result_records_epochs_parity_and_leaves_the_fp32_model_alone(qat_run):
    result, logged, _, unchanged = qat_run
    assert isinstance(result, QATResult) and result.engine == ENGINE == "nncf-torch-qat"
    assert result.onnx_path.is_file()
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert logged == result.epochs  # what the Prefect task logs is what the result records
    for e in result.epochs:
        assert set(e) == {"epoch", "loss", "train_top1", "seconds"}
        assert np.isfinite(e["loss"]) and 0.9 <= e["train_top1"] <= 1.0 and e["seconds"] > 0
    # within the documented tolerance: a few output quantization steps, top-1 agreement >= 0.99
    assert result.parity_top1_agreement >= 0.99
    # measured 0.03-0.05; the output step read from the graph (the head's input scale x its largest sum of |INT8
    # weights|) is ~0.11, the tolerance ~0.34
    assert 0.0 < result.parity_max_abs < 0.1
    assert any("export parity" in n for n in result.notes)
    assert not any(n.startswith("weak export parity") for n in result.notes), result.notes  # 0.34 vs logits' range
    # a short QAT builds no C++ extension: NNCF's fake-quantize ops ran as PyTorch code
    assert any(n.startswith("fake-quantize ops: NNCF's PyTorch reference functions, eager") for n in result.notes)
    assert unchanged, "qat_finetune modified the caller's FP32 model"


def test_a_long_qat_lets_nncf_build_its_extension_and_a_short_one_runs_its_reference_functions():
    from nncf.torch.quantization.extensions import QuantizedFunctionsCPU

    before = QuantizedFunctionsCPU._loaded_namespace
    try:
        note = choose_fake_quantize_kernels(COMPILED_KERNELS_MIN_STEPS)
        assert "C++ extension" in note and QuantizedFunctionsCPU._loaded_namespace is None  # NNCF loads it on use
        note = choose_fake_quantize_kernels(COMPILED_KERNELS_MIN_STEPS - 1)
        assert "reference functions, eager" in note and f"{COMPILED_KERNELS_MIN_STEPS - 1} steps" in note
        x, low, rng = torch.linspace(-2, 2, 101), torch.tensor([-1.0]), torch.tensor([2.0])
        y = QuantizedFunctionsCPU.get("Quantize_forward")(x, low, rng, 256).numpy()  # what NNCF's ops call
        step = 2.0 / 255  # 256 levels over [-1, 1] (NNCF shifts the grid by < 1 step so that 0 is on it)
        levels = np.round(y / step)
        np.testing.assert_allclose(y, levels * step, atol=1e-5)  # on the grid
        inside = np.abs(x.numpy()) <= 1
        assert np.abs(y - x.numpy())[inside].max() <= step and np.abs(y).max() <= 1 + step  # rounded, clamped
        assert 0 in levels and len(np.unique(levels)) == inside.sum()  # one level per input inside
    finally:
        QuantizedFunctionsCPU._loaded_namespace = before


def test_onnx_is_qdq_int8_with_dynamic_batch_and_runs_in_openvino(qat_run, demo_root):
    import openvino as ov

    result, _, _, _ = qat_run
    proto = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 10
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}  # no custom (OpenVINO-only) FakeQuantize
    (inp,) = proto.graph.input
    assert inp.name == INPUT and inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in proto.graph.output] == [OUTPUT]

    xte, yte = _split(demo_root, "test")
    batch = xte[:37]  # not the export example's batch size
    ref = _ort(result.onnx_path).run(None, {INPUT: batch})[0]
    compiled = ov.Core().compile_model(str(result.onnx_path), "CPU")
    got = compiled(batch)[compiled.output(0)]
    assert got.shape == (37, 10)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert (got.argmax(1) == yte[:37]).mean() >= 0.9


def test_onnxruntime_runs_the_convs_as_integer_kernels(qat_run, tmp_path):
    """BN folded + per-tensor activations: ONNX Runtime fuses every DQ->Conv->Q into QLinearConv."""
    import onnxruntime as ort

    result, _, _, _ = qat_run
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(result.onnx_path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 5 and "Conv" not in ops and "FusedConv" not in ops, ops
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(result.onnx_path)).graph.node]
    assert any("folded 5 Conv+BatchNorm" in n for n in result.notes)


def test_parity_gate_fails_on_a_model_that_is_not_the_export(qat_run, demo_root):
    result, _, model, _ = qat_run
    xva, _ = _split(demo_root, "validation")
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.head.weight.mul_(1.5)  # what a misplaced scale in the export would look like
    with pytest.raises(GateError, match=r"QAT export parity failed.*max abs diff .*tolerance"):
        check_export_parity(result.onnx_path, wrong, xva[:64], INPUT)
    # the same check passes when the outputs do match (here: the ONNX model against itself)
    session = _ort(result.onnx_path)
    check = check_export_parity(result.onnx_path, lambda x: torch.from_numpy(session.run(None, {INPUT: x.numpy()})[0]),
                                xva[:64], INPUT)
    assert check.max_abs == 0.0 and check.top1_agreement == 1.0
    # the step comes from the graph, not from the outputs it judges: the head runs in float on INT8 weights
    assert check.tolerance == pytest.approx(Thresholds().qat_parity_steps * check.output_step)
    assert "Gemm" in check.step_source and "sum of |weights|" in check.step_source
    assert check.confident_samples > 0 and check.confident_top1_agreement == 1.0


@pytest.mark.parametrize("train", [None, (np.zeros((0, 1, 8, 8), np.float32), np.zeros((0,), np.int64))],
                         ids=["none", "empty"])
def test_qat_without_training_data_is_a_spec_error(demo_root, tmp_path, train):
    x, y = train if train is not None else (None, None)
    out = tmp_path / "never.onnx"
    with pytest.raises(SpecError, match=r"QAT needs training data: set data.train"):
        qat_finetune(_fp32(demo_root), _calibration(demo_root, 8), x, y, INPUT, OUTPUT, 17, out)
    assert not out.exists()


def test_calibration_that_does_not_match_the_inputs_is_a_spec_error(demo_root, tmp_path):
    xtr, ytr = _split(demo_root, "train")
    wrong = [np.zeros((1, 3, 8, 8), np.float32)] * 4
    with pytest.raises(SpecError, match=r"calibration sample 0 has shape \(1, 3, 8, 8\)"):
        qat_finetune(_fp32(demo_root), wrong, xtr, ytr, INPUT, OUTPUT, 17, tmp_path / "x.onnx")
    with pytest.raises(SpecError, match=r"opset >= 13"):
        qat_finetune(_fp32(demo_root), _calibration(demo_root, 4), xtr, ytr, INPUT, OUTPUT, 11, tmp_path / "x.onnx")


def test_opset_above_the_torchscript_exporter_is_reached_by_conversion(demo_root, tmp_path):
    import openvino as ov

    xtr, ytr = _split(demo_root, "train")
    result = qat_finetune(_fp32(demo_root), _calibration(demo_root, 32), xtr[:128], ytr[:128], INPUT, OUTPUT, 21,
                          tmp_path / "q21.onnx", epochs=1)
    proto = onnx.load(str(result.onnx_path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
    assert any("version_converter" in n for n in result.notes)
    ov.Core().compile_model(str(result.onnx_path), "CPU")


def test_same_seed_same_model(demo_root, tmp_path):
    xtr, ytr = _split(demo_root, "train")
    xte, _ = _split(demo_root, "test")
    runs = [qat_finetune(_fp32(demo_root), _calibration(demo_root, 32), xtr[:192], ytr[:192], INPUT, OUTPUT, 17,
                         tmp_path / f"s{seed}_{i}.onnx", epochs=1, seed=seed) for i, seed in enumerate((0, 0, 1))]
    outs = [_ort(r.onnx_path).run(None, {INPUT: xte[:64]})[0] for r in runs]
    assert runs[0].epochs[0]["loss"] == runs[1].epochs[0]["loss"]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert runs[0].epochs[0]["loss"] != runs[2].epochs[0]["loss"]  # the seed does drive the batch order
