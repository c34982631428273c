"""Runners: one prepared model behind ``infer(feeds)``, and the batch-1 latency benchmark.

A `Runner` is a small context manager in the style of Polygraphy's runners: the public
``infer(feeds)`` checks input names, dtypes and static shapes once, then calls ``infer_impl``;
a new runtime (or a remote device behind a command or a service) writes only
``activate_impl / infer_impl / deactivate_impl``::

    with backend.runner("model.onnx", target) as r:
        outputs = r.infer({"image": x})          # {output name: np.ndarray}
        print(r.precision, r.threads)            # what actually ran
        latency = benchmark(r, {"image": x})     # LatencyReport(median_ms, p90_ms, ...)
"""

from __future__ import annotations

import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgeq.backends.records import LatencyReport
from edgeq.core.errors import RunnerError
from edgeq.core.onnx_graph import TensorMeta, sample_feeds


class Runner(ABC):
    """A context manager that runs one prepared model on named inputs (Polygraphy-style).

    Subclasses set ``self.inputs`` / ``self.outputs`` / ``self.precision`` / ``self.threads`` in
    ``activate_impl`` and implement ``infer_impl``; ``infer`` checks the feeds first.
    """

    def __init__(self, name: str, target: str = ""):
        self.name = name
        self.target = target
        self.is_active = False
        self.inputs: list[TensorMeta] = []
        self.outputs: list[str] = []
        self.precision = ""
        self.threads = 0
        self.batch = "static1"

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self.deactivate_impl()
            finally:
                self.is_active = False

    # -- inference ---------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on named inputs; returns {output name: array}. Shape/name/dtype mistakes raise RunnerError."""
        if not self.is_active:
            raise RunnerError(f"{self.name}: runner is not active; use it as `with backend.runner(...) as r:`")
        self.check_feeds(feeds)
        return self.infer_impl(feeds)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        want = {m.name: m for m in self.inputs}
        missing = sorted(set(want) - set(feeds))
        extra = sorted(set(feeds) - set(want))
        if missing or extra:
            raise RunnerError(f"{self.name}: feeds must be exactly the inputs {sorted(want)}; "
                              f"missing {missing}, unexpected {extra}")
        for name, meta in want.items():
            arr = np.asarray(feeds[name])
            if arr.dtype.name != meta.dtype:
                raise RunnerError(f"{self.name}: input {name!r} is {arr.dtype.name} but the model takes {meta.dtype}")
            if len(arr.shape) != len(meta.shape) or any(
                    isinstance(d, int) and d != got for d, got in zip(meta.shape, arr.shape)):
                hint = ""
                if (self.batch == "static1" and meta.shape and meta.shape[0] == 1 and arr.ndim == len(meta.shape)
                        and arr.shape[0] != 1):
                    hint = (f" — this is the static batch=1 form: feed one sample at a time, or set `batch: dynamic` "
                            f"on target {self.target!r}")
                raise RunnerError(f"{self.name}: input {name!r} has shape {list(arr.shape)} but the prepared model "
                                  f"takes {list(meta.shape)}{hint}")

    @abstractmethod
    def activate_impl(self) -> None:
        """Build the session/compiled model; set inputs, outputs, precision, threads."""

    @abstractmethod
    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on checked feeds."""

    def deactivate_impl(self) -> None:
        """Release the session."""


class _TempRunner(Runner):
    """Wraps a runner on a form prepared into a temporary folder, removed on deactivate."""

    def __init__(self, inner: Runner, tmp: str):
        super().__init__(inner.name, inner.target)
        self._inner, self._tmp = inner, tmp

    def activate_impl(self) -> None:
        self._inner.activate()
        for attr in ("inputs", "outputs", "precision", "threads", "batch"):
            setattr(self, attr, getattr(self._inner, attr))

    def infer_impl(self, feeds):
        return self._inner.infer_impl(feeds)

    def deactivate_impl(self) -> None:
        try:
            self._inner.deactivate()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def benchmark(runner: Runner, feeds: dict[str, np.ndarray] | None = None, warmup: int = 10,
              iters: int = 100) -> LatencyReport:
    """Batch-1 latency: `warmup` untimed runs, then `iters` timed runs; median and p90 in ms.

    `runner` must be active; feeds default to random inputs of the runner's shapes.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"benchmark needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    feeds = feeds if feeds is not None else sample_feeds(runner.inputs)
    batch = {int(np.asarray(v).shape[0]) for v in feeds.values() if np.asarray(v).ndim}
    if batch and batch != {1}:
        raise RunnerError(f"{runner.name}: the latency benchmark runs batch 1; feeds have batch {sorted(batch)}")
    runner.check_feeds(feeds)
    for _ in range(warmup):
        runner.infer_impl(feeds)
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter_ns()
        runner.infer_impl(feeds)
        times[i] = (time.perf_counter_ns() - t0) / 1e6
    return LatencyReport(median_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)),
                         mean_ms=float(times.mean()), min_ms=float(times.min()), iters=iters, warmup=warmup,
                         threads=runner.threads, precision=runner.precision)


@dataclass
class PairedLatency:
    """Two models timed side by side on one runtime: per round, each one's median ms; `ratios` = a / b per round."""

    a_ms: list[float]
    b_ms: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.a_ms, self.b_ms)]

    @staticmethod
    def _median(v: list[float]) -> float:
        return float(np.median(v))

    @property
    def a_median(self) -> float:
        return self._median(self.a_ms)

    @property
    def b_median(self) -> float:
        return self._median(self.b_ms)

    @property
    def ratio(self) -> float:
        return self._median(self.ratios)


def interleaved_benchmark(runners: list[Runner], feeds: dict[str, np.ndarray], rounds: int = 5,
                          iters: int = 100) -> list[list[float]]:
    """Time active runners side by side: `rounds` rounds of `iters` batch-1 runs each, the order rotating by one
    every round so drift on a shared machine hits all alike; per runner, its median ms in each round."""
    if rounds < 1:
        raise ValueError(f"a side-by-side benchmark needs rounds >= 1, got {rounds}")
    times: list[list[float]] = [[] for _ in runners]
    for r in range(rounds):
        k = r % len(runners)
        for i in list(range(len(runners)))[k:] + list(range(len(runners)))[:k]:
            times[i].append(benchmark(runners[i], feeds, warmup=max(5, iters // 10), iters=iters).median_ms)
    return times


def paired_benchmark(a: Runner, b: Runner, feeds: dict[str, np.ndarray], rounds: int = 5,
                     iters: int = 100) -> PairedLatency:
    """Two active runners in alternating rounds (`interleaved_benchmark`). One result, not one number: the caller
    reports the median of the per-round ratios with their range."""
    a_ms, b_ms = interleaved_benchmark([a, b], feeds, rounds, iters)
    return PairedLatency(a_ms=a_ms, b_ms=b_ms)


def default_threads() -> int:
    """CPUs this process may use (what a pinned thread count defaults to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
