"""PTQ on the demo from an approved calibration version: within the SLA, runnable by both runtimes."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from edgeq.calibration.versions import record_decision
from edgeq.core.data import load_split
from edgeq.core.errors import EdgeqError, SpecError
from edgeq.core.store import ArtifactStore
from edgeq.tasks.calibration import build_calibration_candidate
from edgeq.tasks.config import load_prepared
from edgeq.tasks.quantize import quantize_to_store
from tests.conftest import write_config


@pytest.fixture(scope="module")
def quant_cfg(tmp_path_factory, demo_root):
    folder = tmp_path_factory.mktemp("quant")
    path = write_config(folder, demo_root)
    data = yaml.safe_load(path.read_text())
    data["quantization"] = {"mode": "ptq", "latency_iters": 20}
    path.write_text(yaml.safe_dump(data))
    return load_prepared(path)


@pytest.fixture(scope="module")
def candidate(quant_cfg):
    return build_calibration_candidate(quant_cfg).version


@pytest.fixture(scope="module")
def exported(quant_cfg):
    from edgeq.tasks.export import export_to_store

    return export_to_store(quant_cfg)


def test_candidate_version_is_refused(quant_cfg, candidate, exported):
    with pytest.raises(EdgeqError, match=f"calibration version {candidate.version} is a candidate awaiting review"):
        quantize_to_store(quant_cfg, exported.onnx, candidate.version, exported.report.opset)


@pytest.fixture(scope="module")
def quantized(quant_cfg, candidate, exported):
    store = ArtifactStore(quant_cfg.store_url)
    record_decision(store, candidate.version, approve=True, reviewer="test-reviewer", comment="ok")
    return quantize_to_store(quant_cfg, exported.onnx, "latest", exported.report.opset)


def test_ptq_meets_the_sla_and_both_runtimes_run_it(quant_cfg, quantized):
    import onnxruntime as ort
    import openvino as ov

    rep = quantized.report
    chosen = rep.chosen_attempt
    assert chosen.kind == "ptq" and chosen.meets_sla and chosen.drop <= 0.01
    assert rep.types == "u8s8" and "VNNI" in rep.types_reason
    assert "mobile-style" in rep.policy.reasons[0]
    assert rep.calibration_samples >= 256
    path = ArtifactStore(quant_cfg.store_url).local_path(quantized.int8)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    x, y = load_split(quant_cfg.data.test, quant_cfg.data.preprocess)
    ort_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_out = np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))])
    assert (ort_out.argmax(1) == y).mean() >= 0.94
    assert (ort_out.argmax(1) == ov_out.argmax(1)).mean() >= 0.98
    # Latency recorded per target for the chosen attempt.
    assert {lat.target for lat in chosen.latency} == {"ort-cpu", "openvino-cpu"}
    assert all(lat.int8_ms and lat.fp32_ms for lat in chosen.latency)
    assert "faster" in rep.speed_note or "SLOWER" in rep.speed_note


def test_unknown_layer_to_keep_in_fp32_is_named(quant_cfg, quantized, exported, tmp_path, demo_root):
    path = write_config(tmp_path, demo_root)
    data = yaml.safe_load(path.read_text())
    data["store"] = quant_cfg.store  # reuse the approved version
    data["quantization"] = {"mode": "ptq", "keep_fp32_nodes": ["no_such_conv"], "latency_iters": 10}
    path.write_text(yaml.safe_dump(data))
    cfg = load_prepared(path)
    with pytest.raises(SpecError, match="layer\\(s\\) to keep in FP32 not found in the model: no_such_conv"):
        quantize_to_store(cfg, exported.onnx, "latest", exported.report.opset)


def test_calibration_samples_of_the_wrong_shape(exported, quant_cfg):
    from edgeq.calibration.readers import CalibrationReader
    from edgeq.quantization.ptq import check_calibration_shapes

    path = ArtifactStore(quant_cfg.store_url).local_path(exported.onnx)
    with pytest.raises(SpecError, match=r"calibration samples have shape \[3, 8, 8\] per sample but model input 'image' expects \[1, 8, 8\]"):
        check_calibration_shapes(Path(path), CalibrationReader({"image": np.zeros((4, 3, 8, 8), np.float32)}))
    with pytest.raises(SpecError, match="model has no input 'pixels' for calibration data"):
        check_calibration_shapes(Path(path), CalibrationReader({"pixels": np.zeros((4, 1, 8, 8), np.float32)}))
