"""The export stage on the real demo model, and every bad input it must refuse clearly."""

import os
import pickle
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from edgeq.core.errors import ExportError, GateError, SpecError
from edgeq.core.store import ArtifactStore
from edgeq.tasks.config import load_prepared
from edgeq.tasks.export import export_to_store
from tests.conftest import write_config

# Runtimes that read opset 18+, so the torch.export-based exporter is used (the demo's declared target caps at 17).
MODERN = [{"name": "ort-cpu", "backend": "onnxruntime"}, {"name": "openvino-cpu", "backend": "openvino"}]


def _cfg(tmp_path, demo_root, model=None, **top):
    path = write_config(tmp_path, demo_root, **top)
    if model:
        data = yaml.safe_load(path.read_text())
        data["model"].update(model)
        path.write_text(yaml.safe_dump(data))
    return load_prepared(path)


def _store_files(cfg):
    root = Path(cfg.store_url)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_demo_export_passes_parity_and_probe(demo_cfg, demo_export, demo_onnx_path):
    rep = demo_export.report
    assert rep.parity and all(r.max_abs_diff <= 1e-5 and r.samples == 32 for r in rep.parity)
    assert {(p.dim, p.size) for p in rep.probe} == {("batch", 1), ("batch", 3)} and all(p.ok for p in rep.probe)
    model = onnx.load(str(demo_onnx_path))
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset == rep.opset
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in model.graph.output] == ["logits"]


def test_opset_is_the_lowest_target_maximum(tmp_path, demo_root, demo_cfg):
    targets = [{"name": "ort", "backend": "onnxruntime"}, {"name": "old-npu", "backend": "onnxruntime", "max_opset": 17}]
    cfg = _cfg(tmp_path, demo_root, targets=targets)
    res = export_to_store(cfg)
    assert res.report.opset == 17 and "old-npu" in res.report.opset_reason
    assert res.report.exporter == "torchscript"  # the torch.export exporter cannot write below 18
    model = onnx.load(str(ArtifactStore(cfg.store_url).local_path(res.onnx)))
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert all(r.passed for r in res.report.parity)


def test_missing_weights(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"weights": str(tmp_path / "nope.safetensors")})
    with pytest.raises(SpecError, match="weights file .*nope.safetensors does not exist"):
        export_to_store(cfg)
    assert _store_files(cfg) == []


def test_weights_that_do_not_match_the_factory(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"kwargs": {"width": 8, "num_classes": 10}})
    with pytest.raises(SpecError, match=r"do not match the model .*shape mismatch.*stem.0.weight: file \(16, 1, 3, 3\) vs model \(8, 1, 3, 3\)"):
        export_to_store(cfg)
    assert _store_files(cfg) == []


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, demo_root):
    _Evil.marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    with open(weights, "wb") as f:
        pickle.dump({"stem.0.weight": _Evil()}, f)
    cfg = _cfg(tmp_path, demo_root, model={"weights": str(weights)})
    with pytest.raises(SpecError, match="refusing weights file .*evil.pt.*pickle that carries code"):
        export_to_store(cfg)
    assert not _Evil.marker.exists()


def test_plain_state_dict_pt_is_accepted(tmp_path, demo_root, demo_cfg):
    from edgeq.core.modeling import build_model

    weights = tmp_path / "sd.pt"
    torch.save(build_model(demo_cfg.model).state_dict(), weights)
    cfg = _cfg(tmp_path, demo_root, model={"weights": str(weights)})
    assert build_model(cfg.model).head.weight.shape == (10, 64)


def test_input_shape_the_data_does_not_fit(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"inputs": [{"name": "image", "shape": ["batch", 1, 16, 16]}]})
    with pytest.raises(SpecError, match=r"input 'image' expects samples of shape \[1, 16, 16\] but the data has \[1, 8, 8\]"):
        export_to_store(cfg)


def test_input_shape_the_model_rejects(tmp_path, demo_root):
    data = {"kind": "loader", "loader": "tests.edgeq_testmodels:three_channel_digits",
            "kwargs": {"path": str(demo_root / "test.npz")}}
    path = write_config(tmp_path, demo_root)
    d = yaml.safe_load(path.read_text())
    d["data"]["test"] = data
    d["model"]["inputs"] = [{"name": "image", "shape": ["batch", 3, 8, 8]}]
    path.write_text(yaml.safe_dump(d))
    cfg = load_prepared(path)
    with pytest.raises(SpecError, match=r"the model rejects inputs of the spec's shapes \{'image': \[2, 3, 8, 8\]\}"):
        export_to_store(cfg)


def test_tensor_dependent_control_flow_is_named(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:tensor_if"}, targets=MODERN)
    with pytest.raises(ExportError, match="tensor-dependent Python control flow.*torch.cond"):
        export_to_store(cfg)
    assert _store_files(cfg) == []


def test_tensor_dependent_control_flow_traced_is_refused(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:tensor_if", "exporter": "torchscript"})
    with pytest.raises(ExportError, match="tracing recorded only the branch.*edgeq_testmodels.py"):
        export_to_store(cfg)


def test_torch_cond_exports_an_if_reported_per_target(tmp_path, demo_root):
    # torch.cond needs the torch.export exporter (opset >= 18).
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:cond_net"}, targets=MODERN)
    res = export_to_store(cfg)
    ifs = [f for f in res.report.findings if f.op_type == "If"]
    assert len(ifs) == 1 and ifs[0].kind == "control-flow" and ifs[0].node
    rows = {r.target: r for r in res.report.target_support if r.node == ifs[0].node}
    assert set(rows) == {t.name for t in cfg.targets}
    assert rows["ort-cpu"].supported and "real branch" in rows["ort-cpu"].note


def test_op_without_onnx_symbolic_is_named(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:no_symbolic"}, targets=MODERN)
    with pytest.raises(ExportError, match="op aten.special_airy_ai.* has no ONNX translation"):
        export_to_store(cfg)
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:no_symbolic", "exporter": "torchscript"},
               targets=[{"name": "old", "backend": "onnxruntime", "max_opset": 17}])
    with pytest.raises(ExportError, match="op aten::special_airy_ai has no ONNX symbolic at opset 17.*custom symbolic"):
        export_to_store(cfg)


def test_a_batch_read_as_a_python_int_is_refused_naming_the_line(tmp_path, demo_root):
    """`int(x.shape[0])` while tracing: the trace holds the example's batch as a constant (a TracerWarning)."""
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:baked_batch", "exporter": "torchscript"},
               targets=[{"name": "old", "backend": "onnxruntime", "max_opset": 17}])
    with pytest.raises(ExportError, match=r"turns a tensor's value into a Python integer at .*edgeq_testmodels.py:\d+"):
        export_to_store(cfg)
    assert _store_files(cfg) == []


def test_a_literal_batch_fails_the_probe_naming_the_axis(tmp_path, demo_root):
    """A literal size leaves no TracerWarning: the dynamic-shape probe is what finds it."""
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:literal_batch", "exporter": "torchscript"},
               targets=[{"name": "old", "backend": "onnxruntime", "max_opset": 17}])
    with pytest.raises(GateError, match=r"dynamic-shape probe: input 'image' axis 0 \('batch'\) at size 1"):
        export_to_store(cfg)
    assert _store_files(cfg) == []


def test_baked_batch_under_torch_export_names_the_axis(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:literal_batch"}, targets=MODERN)
    with pytest.raises(ExportError, match=r"input 'image' axis 0 \('batch'\) is declared dynamic but the model code fixes it to 2"):
        export_to_store(cfg)


def test_parity_gate_reports_numbers(tmp_path, demo_root):
    cfg = _cfg(tmp_path, demo_root, thresholds={"export_atol": 1e-12, "export_rtol": 0})
    with pytest.raises(GateError, match=r"parity gate: output 'logits' max abs diff .* > tolerance 1e-12 .*worst sample #\d+ of 32"):
        export_to_store(cfg)
    assert _store_files(cfg) == []


def test_the_parity_tolerance_grows_with_the_outputs_scale(tmp_path, demo_root):
    """A correct export of logits 1000x the demo's: its float rounding differences are 1000x larger too. An absolute
    1e-5 refuses it; export_rtol's part of the tolerance (1e-5 x the largest |output|) passes it."""
    scaled = {"factory": "tests.edgeq_testmodels:scaled_logits", "kwargs": {"width": 16, "num_classes": 10,
                                                                          "hidden": 0, "scale": 1000.0}}
    absolute = _cfg(tmp_path / "absolute", demo_root, model=scaled, thresholds={"export_rtol": 0})
    # absolute tolerances alone: the probe (1e-4) takes this float noise for a baked-in shape
    with pytest.raises(GateError, match=r"at size 1: outputs differ from PyTorch by logits: \S+ > 0.0001 — a shape"):
        export_to_store(absolute)
    absolute = _cfg(tmp_path / "parity", demo_root, model=scaled, thresholds={"export_rtol": 0, "probe_atol": 1.0})
    with pytest.raises(GateError, match=r"parity gate: output 'logits' max abs diff \S+ > tolerance 1e-05 "):
        export_to_store(absolute)
    assert _store_files(absolute) == []

    cfg = _cfg(tmp_path / "relative", demo_root, model=scaled)
    report = export_to_store(cfg).report
    row = report.parity[0]
    assert cfg.thresholds.export_atol == cfg.thresholds.export_rtol == 1e-5
    assert row.passed and row.output_scale > 1000 and 1e-5 < row.max_abs_diff <= row.tolerance
    assert row.tolerance == pytest.approx(1e-5 + 1e-5 * row.output_scale)
    assert [p.ok for p in report.probe] == [True, True]


def test_a_nan_in_one_output_fails_the_probe_naming_that_output(tmp_path, demo_root):
    # 'aux' comes second: a max over the outputs' differences would have dropped its NaN (max([0.1, nan]) is 0.1).
    cfg = _cfg(tmp_path, demo_root, model={"factory": "tests.edgeq_testmodels:nan_aux", "outputs": ["logits", "aux"]})
    with pytest.raises(GateError, match=r"dynamic-shape probe: input 'image' axis 0 \('batch'\) at size 1: "
                                        r"output 'aux': PyTorch has 1 non-finite value\(s\) \(NaN/Inf\).*"
                                        r"computes NaN/Inf") as err:
        export_to_store(cfg)
    assert "baked in" not in str(err.value)  # a NaN is not blamed on a shape
    assert _store_files(cfg) == []
