"""One template suite (NNCF style): every available backend passes the same tests."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import pytest
from tests.backends.backend_models import custom_op_model, demo_samples  # noqa: F401 (fixture)

from edgeq.backends import benchmark, get_backend
from edgeq.backends.base import Backend
from edgeq.core.errors import RunnerError
from edgeq.core.specs import TargetSpec

F32_ATOL = 1e-4  # pinned f32 on two runtimes: only summation order differs


class TemplateBackendTest(ABC):
    @abstractmethod
    def get_backend(self) -> Backend: ...

    device = "cpu"

    def target(self, **kw) -> TargetSpec:
        return TargetSpec(**{"name": f"{self.get_backend().name}-test", "backend": self.get_backend().name,
                             "device": self.device, "precision": "fp32", **kw})

    @pytest.fixture(autouse=True)
    def _available(self):
        ok, why = self.get_backend().availability(self.device)
        if not ok:
            pytest.skip(f"{self.get_backend().name} unavailable here: {why}")

    def test_compiles_the_demo_model_with_f32_and_latency(self, demo_onnx_path):
        report = self.get_backend().check_compiles(demo_onnx_path, self.target(), iters=30)
        assert report.status == "compiled", report.reason
        assert report.precision == "f32"
        assert report.input_shapes == {"image": [1, 1, 8, 8]}
        assert report.compile_s is not None and report.compile_s > 0
        lat = report.latency
        assert lat is not None and 0 < lat.median_ms <= lat.p90_ms < 1000
        assert lat.iters == 30 and lat.batch == 1 and lat.threads >= 1 and lat.precision == "f32"

    def test_matches_onnxruntime_fp32(self, demo_onnx_path, demo_samples):
        ref_backend = get_backend("onnxruntime")
        ref_target = TargetSpec(name="ref", backend="onnxruntime", batch="dynamic")
        with ref_backend.runner(demo_onnx_path, ref_target) as ref, \
                self.get_backend().runner(demo_onnx_path, self.target()) as r:
            assert r.precision == "f32"
            worst = 0.0
            for x in demo_samples:  # the static batch=1 form: one sample at a time
                want = ref.infer({"image": x[None]})["logits"]
                got = r.infer({"image": x[None]})["logits"]
                assert got.shape == want.shape == (1, 10)
                worst = max(worst, float(np.abs(got - want).max()))
        assert worst <= F32_ATOL, f"max abs diff {worst:.3g} vs ONNX Runtime FP32"

    def test_refuses_a_custom_op_naming_it(self, tmp_path):
        path = custom_op_model(tmp_path / "custom.onnx")
        report = self.get_backend().check_compiles(path, self.target())
        assert report.status == "failed"
        assert "MyCustomOp" in report.reason and "custom0" in report.reason
        assert [(u.op_type, u.node) for u in report.unsupported_ops] == [("MyCustomOp", "custom0")]

    def test_static_batch1_form_rejects_batch3(self, demo_onnx_path):
        with self.get_backend().runner(demo_onnx_path, self.target()) as r:
            assert r.inputs[0].shape == [1, 1, 8, 8]
            with pytest.raises(RunnerError, match=r"\[3, 1, 8, 8\].*static batch=1 form"):
                r.infer({"image": np.zeros((3, 1, 8, 8), np.float32)})

    def test_prepared_form_is_written_with_static_batch1(self, demo_onnx_path, tmp_path):
        prepared = self.get_backend().prepare(demo_onnx_path, self.target(), tmp_path)
        assert prepared.inputs[0].shape == [1, 1, 8, 8] and prepared.batch == "static1"
        assert prepared.files and all(p.is_file() and p.stat().st_size > 0 for p in prepared.files.values())

    def test_benchmark_is_batch1(self, demo_onnx_path):
        with self.get_backend().runner(demo_onnx_path, self.target(batch="dynamic")) as r:
            with pytest.raises(RunnerError, match="batch 1"):
                benchmark(r, {"image": np.zeros((2, 1, 8, 8), np.float32)}, warmup=0, iters=1)
            lat = benchmark(r, {"image": np.zeros((1, 1, 8, 8), np.float32)}, warmup=2, iters=20)
        assert lat.iters == 20 and lat.warmup == 2 and lat.median_ms > 0


class TestOnnxRuntime(TemplateBackendTest):
    def get_backend(self):
        return get_backend("onnxruntime")


class TestOpenVino(TemplateBackendTest):
    def get_backend(self):
        return get_backend("openvino")


class TestTensorRt(TemplateBackendTest):
    device = "cuda"

    def get_backend(self):
        return get_backend("tensorrt")
