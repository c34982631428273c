"""A `transformers` BertModel (small config, random weights, no download) through edgeq's export gates: the
torch.export-based exporter takes it with real ids and masks on every input; the TorchScript exporter is refused,
naming the line in transformers where tracing would bake a branch."""

from __future__ import annotations

import onnx
import pytest

from edgeq.core.errors import ExportError
from edgeq.core.specs import ModelSpec, TargetSpec, Thresholds
from edgeq.export import run_export
from tests.multi_input_models import SEQ, TOKEN_INPUTS, token_samples

pytest.importorskip("transformers")  # in the test extra; a plain install may lack it

from tests.hf_models import BertSentenceEncoder  # noqa: E402


def spec(exporter: str) -> ModelSpec:
    return ModelSpec(name="bert-tiny", factory="tests.hf_models:bert_sentence_encoder", weights="unused",
                     inputs=TOKEN_INPUTS, outputs=["embedding"], example_dims={"batch": 2, "seq": SEQ},
                     metric="cosine", exporter=exporter)


def test_a_bert_model_exports_with_every_gate_on_real_ids_and_masks(tmp_path):
    out = tmp_path / "bert.onnx"
    report = run_export(BertSentenceEncoder().eval(), spec("auto"), [TargetSpec(name="ort", backend="onnxruntime")],
                        token_samples(24, seed=5), Thresholds(), out)
    assert report.exporter == "dynamo"
    (row,) = report.parity
    assert row.output == "embedding" and row.passed and row.max_abs_diff <= 1e-5 and row.samples == 24
    assert {(p.dim, p.size) for p in report.probe} == {("batch", 1), ("batch", 3), ("seq", SEQ - 1), ("seq", SEQ // 2)}
    assert all(p.ok for p in report.probe)
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["embedding"]


def test_the_torchscript_exporter_on_bert_is_refused_naming_the_traced_branch(tmp_path):
    with pytest.raises(ExportError, match=r"tensor-dependent Python control flow: .*transformers/.*\.py:\d+"):
        run_export(BertSentenceEncoder().eval(), spec("torchscript"),
                   [TargetSpec(name="ort", backend="onnxruntime", max_opset=17)], token_samples(24, seed=5),
                   Thresholds(), tmp_path / "bert.onnx")
