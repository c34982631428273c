"""Export gates on named multi-input / multi-output models: real samples for every input, a sequence axis probed
with real data, degenerate samples refused, user output names kept, baked numeric constants refused."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from edgeq.core.errors import ExportError, GateError, SpecError
from edgeq.core.ort import ort_session
from edgeq.core.specs import ModelSpec, TargetSpec, Thresholds
from edgeq.export import check_parity, run_export
from tests.multi_input_models import SEQ, TOKEN_INPUTS, TinyEncoder, TwoHeads, token_samples

ORT = TargetSpec(name="ort-cpu", backend="onnxruntime")
ORT17 = TargetSpec(name="ort-cpu", backend="onnxruntime", max_opset=17)


def token_spec(exporter: str = "auto", outputs=("embedding",)) -> ModelSpec:
    return ModelSpec(name="tiny-encoder", factory="tests.multi_input_models:tiny_encoder", weights="unused",
                     inputs=TOKEN_INPUTS, outputs=list(outputs), example_dims={"batch": 2, "seq": SEQ},
                     metric="cosine", exporter=exporter)


@pytest.fixture(scope="module")
def samples():
    return token_samples(24, seed=3)


@pytest.mark.parametrize("exporter,target", [("dynamo", ORT), ("torchscript", ORT17)])
def test_encoder_with_an_embedding_module_exports_its_output_named_embedding(tmp_path, samples, exporter, target):
    """The exporters name internal values after modules (`embedding`); the user's output name is kept exactly and
    the graph stays valid (the torch.export-based exporter used to write 'embedding' twice)."""
    out = tmp_path / "m.onnx"
    report = run_export(TinyEncoder().eval(), token_spec(exporter), [target], samples, Thresholds(), out)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["embedding"]
    assert [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}] == \
        ["input_ids", "attention_mask"]
    (row,) = report.parity
    assert row.output == "embedding" and row.samples == 24 and row.max_abs_diff <= 1e-5
    # the sequence axis is probed on real data cut shorter, both inputs alike; the batch at 1 and 3
    probed = {(p.dim, p.size) for p in report.probe}
    assert probed == {("batch", 1), ("batch", 3), ("seq", SEQ - 1), ("seq", SEQ // 2)}, probed
    assert all(p.ok for p in report.probe)


def _zero_the_mask(src, dst) -> None:
    """Edit an exported graph so that every use of `attention_mask` sees zeros: the second input's path changed
    after export, the first input's untouched."""
    m = onnx.load(str(src))
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == "attention_mask":
                node.input[i] = "attention_mask_zeroed"
    zero = onnx.helper.make_tensor("zero_i64", onnx.TensorProto.INT64, [], [0])
    m.graph.initializer.append(zero)
    m.graph.node.insert(0, onnx.helper.make_node("Mul", ["attention_mask", "zero_i64"], ["attention_mask_zeroed"]))
    onnx.save(m, str(dst))


def test_parity_fails_when_the_second_inputs_path_is_perturbed_after_export(tmp_path, samples):
    good = tmp_path / "good.onnx"
    model = TinyEncoder().eval()
    spec = token_spec()
    run_export(model, spec, [ORT], samples, Thresholds(), good)
    bad = tmp_path / "bad.onnx"
    _zero_the_mask(good, bad)
    rows = check_parity(model, spec, ort_session(bad), samples, Thresholds())
    assert not rows[0].passed and rows[0].max_abs_diff > 1e-3, rows
    assert check_parity(model, spec, ort_session(good), samples, Thresholds())[0].passed


class ConstantOut(torch.nn.Module):
    """Outputs that do not depend on the inputs' values: every sample gives the same embedding."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 8))

    def forward(self, input_ids, attention_mask):
        return self.w.expand(input_ids.shape[0], 8) + 0 * attention_mask[:, :1].to(torch.float32)


def test_a_model_whose_outputs_are_constant_is_refused_as_degenerate(tmp_path, samples):
    out = tmp_path / "c.onnx"
    with pytest.raises(GateError, match="degenerate") as exc:
        run_export(ConstantOut().eval(), token_spec(), [ORT], samples, Thresholds(), out)
    assert "'embedding' is the same for all 24 samples" in str(exc.value)
    assert not out.exists()


def test_an_all_zero_mask_is_degenerate_samples(tmp_path, samples):
    """The old gate fed zeros to every input but the first: all-zero masks give one embedding for all samples."""
    zeros = {**samples, "attention_mask": np.zeros_like(samples["attention_mask"])}
    with pytest.raises(GateError, match="degenerate"):
        run_export(TinyEncoder().eval(), token_spec(), [ORT], zeros, Thresholds(), tmp_path / "z.onnx")


class BakedLength(TinyEncoder):
    def forward(self, input_ids, attention_mask):
        n = int(attention_mask.sum(1).max())  # a tensor's value as a Python int: traced as a constant
        return super().forward(input_ids[:, :n], attention_mask[:, :n])


class BakedScale(TinyEncoder):
    def forward(self, input_ids, attention_mask):
        scale = attention_mask.sum().item()  # a Python number
        return super().forward(input_ids, attention_mask) / scale


@pytest.mark.parametrize("cls,kind", [(BakedLength, "integer|number|index"), (BakedScale, "number|float")])
def test_a_baked_numeric_constant_from_tracing_is_refused_naming_the_line(tmp_path, samples, cls, kind):
    with pytest.raises(ExportError) as exc:
        run_export(cls().eval(), token_spec("torchscript"), [ORT17], samples, Thresholds(), tmp_path / "b.onnx")
    msg = str(exc.value)
    assert re.search(rf"into a Python ({kind}) at .*test_export_multi_input.py:\d+", msg), msg
    assert "torch.export-based exporter" in msg


def test_every_output_of_a_two_output_model_gets_its_parity_row(tmp_path):
    spec = ModelSpec(name="two-heads", factory="tests.multi_input_models:two_heads", weights="unused",
                     inputs=[{"name": "image", "shape": ["batch", 1, 8, 8]}], outputs=["boxes", "scores"])
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    out = tmp_path / "two.onnx"
    report = run_export(TwoHeads().eval(), spec, [ORT], {"image": x}, Thresholds(), out)
    assert [r.output for r in report.parity] == ["boxes", "scores"]
    assert all(r.passed and r.samples == 16 for r in report.parity)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["boxes", "scores"]


def test_outputs_named_fewer_than_the_model_returns_is_a_clear_error(tmp_path):
    spec = ModelSpec(name="two-heads", factory="tests.multi_input_models:two_heads", weights="unused",
                     inputs=[{"name": "image", "shape": ["batch", 1, 8, 8]}], outputs=["boxes"])
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ExportError, match=r"returns 2 output\(s\) but model.outputs names 1"):
        run_export(TwoHeads().eval(), spec, [ORT], {"image": x}, Thresholds(), tmp_path / "t.onnx")


def test_samples_missing_an_input_are_refused(tmp_path, samples):
    with pytest.raises(SpecError, match=r"no samples for model input\(s\) \['attention_mask'\]"):
        run_export(TinyEncoder().eval(), token_spec(), [ORT], {"input_ids": samples["input_ids"]}, Thresholds(),
                   tmp_path / "m.onnx")
