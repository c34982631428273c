"""One template suite (NNCF style): every backend passes the same tests, as far as its capabilities reach.

A backend that cannot do something (a declared target compiles nothing here) is asked through its
capability attributes, never by name, so a new backend subclasses the template and gets the right
tests without editing them.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pytest

from edgeq.backends import Backend, benchmark, get_backend
from edgeq.core.errors import EdgeqError, RunnerError
from edgeq.core.specs import TargetSpec
from tests.backends.backend_models import custom_op_model

F32_ATOL = 1e-4  # pinned f32 on two runtimes: only summation order differs
DEVICE_PROGRAM = Path(__file__).resolve().parents[1] / "noisy_device.py"


class TemplateBackendTest(ABC):
    @abstractmethod
    def get_backend(self) -> Backend: ...

    device = "cpu"
    f32 = "f32"  # how the runtime reports pinned fp32 (what ran)
    min_threads = 1  # threads the runner reports it ran with
    iters, warmup = 30, 10  # a remote device pays a round trip per run: its subclass times fewer
    target_fields: dict = {}

    def target(self, **kw) -> TargetSpec:
        return TargetSpec(**{"name": f"{self.get_backend().name}-test", "backend": self.get_backend().name,
                             "device": self.device, "precision": "fp32", **self.target_fields, **kw})

    def requires(self, capability: str, value: bool = True) -> Backend:
        backend = self.get_backend()
        if getattr(backend, capability) is not value:
            pytest.skip(f"{backend.name}: {capability} is {getattr(backend, capability)}")
        return backend

    @pytest.fixture(autouse=True)
    def _available(self):
        ok, why = self.get_backend().availability(self.device)
        if not ok:
            pytest.skip(f"{self.get_backend().name} unavailable here: {why}")

    # -- every backend -----------------------------------------------------
    def test_reads_the_demo_models_opset(self):
        assert self.get_backend().max_opset(self.target()) >= 17

    def test_refuses_a_custom_op_naming_it(self, tmp_path):
        path = custom_op_model(tmp_path / "custom.onnx")
        report = self.get_backend().check_compiles(path, self.target())
        assert report.status == "failed"
        assert "MyCustomOp" in report.reason and "custom0" in report.reason
        assert [(u.op_type, u.node) for u in report.unsupported_ops] == [("MyCustomOp", "custom0")]

    def test_int8_scheme_is_one_the_quantizer_takes_and_says_why(self):
        scheme = self.get_backend().int8_scheme(self.target())
        assert scheme.types in ("u8s8", "s8s8") and scheme.reason

    def test_cache_fingerprint_is_stable_for_the_same_target(self):
        backend = self.get_backend()
        assert backend.cache_fingerprint(self.target()) == backend.cache_fingerprint(self.target())
        assert backend.version() in backend.cache_fingerprint(self.target())

    def test_a_backend_without_a_compiled_form_says_why(self):
        backend = self.requires("ships_compiled_form", False)
        assert backend.no_compiled_form_reason(self.target())

    # -- backends that compile and run here -------------------------------
    def test_compiles_the_demo_model_with_f32_and_latency(self, demo_onnx_path):
        backend = self.requires("compiles")
        report = backend.check_compiles(demo_onnx_path, self.target(), iters=self.iters, warmup=self.warmup)
        assert report.status == "compiled", report.reason
        assert report.precision == self.f32
        assert report.input_shapes == {"image": [1, 1, 8, 8]}
        assert report.compile_s is not None and report.compile_s > 0
        lat = report.latency
        if not backend.measures_latency:
            assert lat is None
            return
        # milliseconds, ordered; no upper bound: a remote device behind a process per call is slow on a busy machine
        assert lat is not None and 0 < lat.median_ms <= lat.p90_ms
        assert lat.iters == self.iters and lat.batch == 1 and lat.threads >= self.min_threads and lat.precision == self.f32

    def test_matches_onnxruntime_fp32(self, demo_onnx_path, demo_samples):
        self.requires("compiles")
        ref_backend = get_backend("onnxruntime")
        ref_target = TargetSpec(name="ref", backend="onnxruntime", batch="dynamic")
        with ref_backend.runner(demo_onnx_path, ref_target) as ref, \
                self.get_backend().runner(demo_onnx_path, self.target()) as r:
            assert r.precision == self.f32
            worst = 0.0
            for x in demo_samples:  # the static batch=1 form: one sample at a time
                want = ref.infer({"image": x[None]})["logits"]
                got = r.infer({"image": x[None]})["logits"]
                assert got.shape == want.shape == (1, 10)
                worst = max(worst, float(np.abs(got - want).max()))
        assert worst <= F32_ATOL, f"max abs diff {worst:.3g} vs ONNX Runtime FP32"

    def test_static_batch1_form_rejects_batch3(self, demo_onnx_path):
        self.requires("compiles")
        with self.get_backend().runner(demo_onnx_path, self.target()) as r:
            assert r.inputs[0].shape == [1, 1, 8, 8]
            with pytest.raises(RunnerError, match=r"\[3, 1, 8, 8\].*static batch=1 form"):
                r.infer({"image": np.zeros((3, 1, 8, 8), np.float32)})

    def test_prepared_form_is_written_with_static_batch1(self, demo_onnx_path, tmp_path):
        self.requires("compiles")
        prepared = self.get_backend().prepare(demo_onnx_path, self.target(), tmp_path)
        assert prepared.inputs[0].shape == [1, 1, 8, 8] and prepared.batch == "static1"
        assert prepared.files and all(p.is_file() and p.stat().st_size > 0 for p in prepared.files.values())

    def test_benchmark_is_batch1(self, demo_onnx_path):
        self.requires("compiles")
        self.requires("measures_latency")
        iters = min(20, self.iters)
        with self.get_backend().runner(demo_onnx_path, self.target(batch="dynamic")) as r:
            with pytest.raises(RunnerError, match="batch 1"):
                benchmark(r, {"image": np.zeros((2, 1, 8, 8), np.float32)}, warmup=0, iters=1)
            lat = benchmark(r, {"image": np.zeros((1, 1, 8, 8), np.float32)}, warmup=2, iters=iters)
        assert lat.iters == iters and lat.warmup == 2 and lat.median_ms > 0

    # -- backends that only check statically ------------------------------
    def test_static_check_passes_the_demo_model_without_compiling(self, demo_onnx_path):
        backend = self.requires("compiles", False)
        report = backend.check_compiles(demo_onnx_path, self.target())
        assert report.status == "declared-ok", report.reason
        assert report.input_shapes == {"image": [1, 1, 8, 8]}
        assert report.compile_s is None and report.latency is None

    def test_preparing_or_running_names_the_target(self, demo_onnx_path, tmp_path):
        backend = self.requires("compiles", False)
        target = self.target()
        with pytest.raises(EdgeqError, match=target.name):
            backend.prepare(demo_onnx_path, target, tmp_path)
        with pytest.raises(EdgeqError, match=target.name):
            backend.runner(demo_onnx_path, target)


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


class TestDeclared(TemplateBackendTest):
    target_fields = {"profile": "hailo8-example"}

    def get_backend(self):
        return get_backend("declared")


class TestCommand(TemplateBackendTest):
    """A stand-in device program (ONNX Runtime in a subprocess) behind the command backend."""

    f32 = "fp32"  # a device program reports the asked precision; nothing else is knowable from outside
    min_threads = 0  # nor how many threads the device ran
    iters, warmup = 3, 1
    target_fields = {"command": [sys.executable, str(DEVICE_PROGRAM)]}

    def get_backend(self):
        return get_backend("command")
