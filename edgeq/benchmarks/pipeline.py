"""The demo pipeline as Prefect flows, cold and warm, against the same work as plain function calls.

    python -m edgeq.benchmarks.pipeline [--repeats 1]

The demo pipeline is what `edgeq demo` runs: build the calibration set, approve it, convert (export, compile
check, quantize, four-way validation, publish). The demo data and weights are built once beforehand and not
timed, nor is the Prefect server's start (an ephemeral one unless PREFECT_API_URL names a server).

- cold: the flows on a fresh artifact store and fresh Prefect result storage;
- warm: the same flows again, nothing changed (every cached step a cache hit, no UI artifact made again, no bundle
  announced again); target < 10 % of cold. Beside it, an empty flow run: Prefect's own cost per flow run, twice of
  which any warm run pays. Most of it is the stop of the flow-run heartbeat thread (Prefect's default, every 180 s),
  which sleeps in 1 s steps: the end of each run waits up to 1 s for it. (Turned off, an empty run took 0.18 s
  instead of 1.15 s, but on the temporary SQLite server the next flow run's creation then met the server still
  recording the last run's events: HTTP 503 (SQLITE_BUSY), and the client's 2 s back-off made warm runs slower.)
- plain: the same stages called as plain functions (no Prefect) on another fresh store; Prefect's overhead is
  (cold - plain) / plain, target < 15 %.
Process-wide one-time costs (first ONNX export, first OpenVINO compile) are paid by an untimed plain run first,
so cold and plain meet the same warm process. With --repeats N the runs alternate and the medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from edgeq.core.quiet import quiet_environment

REPO = Path(__file__).resolve().parents[2]


def demo_config(folder: Path, demo_root: Path, source: str = "digits-demo.yaml", **overrides) -> Path:
    """A copy of one of the repository's demo configs (`source`) in `folder`, with its own store, pointing at an
    already built demo in `demo_root` (its paths under the demo's `prepare_kwargs.root` rewritten); top-level keys
    replaced by `overrides`."""
    import yaml

    text = (REPO / source).read_text()
    built = yaml.safe_load(text)["prepare_kwargs"]["root"]
    data = yaml.safe_load(text.replace(built, str(demo_root)))
    data["store"] = str(folder / "store")
    data["prepare_kwargs"] = {"root": str(demo_root)}
    data.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prefect_pipeline(config: Path) -> str:
    """What `edgeq demo` does, as flows: the published bundle id."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.specs import load_config
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.calibration import CalibrationParams, build_calibration_set
    from edgeq.flows.convert import ConvertParams, convert_model

    built = build_calibration_set(CalibrationParams(config=str(config), wait_for_review=False))
    if built.record.status == "candidate":
        record_decision(ArtifactStore(load_config(config).store_url), built.version, True, "benchmark")
    return convert_model(ConvertParams(config=str(config), calibration=built.version))["bundle_id"]


def plain_pipeline(config: Path) -> str:
    """The same stages as plain functions, in the flows' order, no Prefect."""
    from edgeq.calibration.versions import load_version, record_decision
    from edgeq.core.store import ArtifactStore
    from edgeq.flows.convert import lineage
    from edgeq.publish import publish_bundle
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.compile_check import CompileMatrix, check_target, gate_required_targets
    from edgeq.tasks.config import load_prepared
    from edgeq.tasks.export import export_to_store
    from edgeq.tasks.quantize import quantize_to_store
    from edgeq.tasks.validate import validate_to_store

    cfg = load_prepared(config)
    store = ArtifactStore(cfg.store_url)
    cand = build_calibration_candidate(cfg)
    version = cand.version.version
    if cand.version.status == "candidate":
        record_decision(store, version, True, "benchmark")
    exported = export_to_store(cfg)
    matrix = CompileMatrix(model=cfg.model.name, onnx_sha256=exported.onnx.sha256,
                           reports=[check_target(exported.onnx, t, cfg.store_url) for t in cfg.targets])
    gate_required_targets(matrix)
    quantized = quantize_to_store(cfg, exported.onnx, version, exported.report.opset, log=lambda *a: None)
    gate_required_targets(CompileMatrix(model=cfg.model.name, onnx_sha256=quantized.int8.sha256, graph="INT8",
                                        reports=[check_target(quantized.int8, t, cfg.store_url) for t in cfg.targets]))
    validated = validate_to_store(cfg, exported.onnx, quantized.int8, version, exported.report.opset)
    measurements = {"four_way": validated.report.model_dump(mode="json"),
                    "four_way_report": validated.report_json.uri,
                    "quantization_attempts": quantized.report.attempts_table(), "speed": quantized.report.speed_note}
    manifest = publish_bundle(cfg, store.local_path(quantized.int8),
                              lineage(cfg, exported, quantized, load_version(store, version)), measurements,
                              validated.report.passed)
    return manifest["bundle_id"]


def timed(fn, *args) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="alternate cold/warm/plain this many times; medians")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeq-bench-"))
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(work / "prefect-results")  # fresh results: a true cold run
    quiet_environment()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from edgeq.demo import ensure_demo

    t0 = time.perf_counter()
    demo_root = ensure_demo(REPO / ".edgeq" / "demo").resolve()
    print(f"demo ready in {time.perf_counter() - t0:.1f}s (one-time, not timed below)")

    from prefect import flow

    @flow(name="benchmark-server-start")
    def _noop() -> None:
        return None

    t0 = time.perf_counter()
    _noop()
    print(f"Prefect API ready in {time.perf_counter() - t0:.1f}s (server start, not timed below)")
    t0 = time.perf_counter()
    plain_pipeline(demo_config(work / "untimed", demo_root))
    print(f"untimed plain run (process warm-up: first export, first compiles) {time.perf_counter() - t0:.1f}s")

    cold, warm, plain, empty = [], [], [], []
    for i in range(args.repeats):
        cfg = demo_config(work / f"prefect-{i}", demo_root)
        os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(work / f"prefect-results-{i}")
        from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: work / f"prefect-results-{i}"}):
            c, bundle_cold = timed(prefect_pipeline, cfg)
            w, bundle_warm = timed(prefect_pipeline, cfg)
        p, bundle_plain = timed(plain_pipeline, demo_config(work / f"plain-{i}", demo_root))
        empty.append(timed(_noop)[0])
        assert bundle_cold == bundle_warm, f"warm re-run published {bundle_warm}, cold {bundle_cold}"
        cold.append(c), warm.append(w), plain.append(p)
        print(f"run {i + 1}: cold {c:.2f}s  warm {w:.2f}s  plain {p:.2f}s  (bundle {bundle_cold})")

    c, w, p = statistics.median(cold), statistics.median(warm), statistics.median(plain)
    print("\ndemo pipeline (calibration build + approval + convert), medians of", args.repeats)
    print(f"  cold with Prefect       {c:7.2f} s")
    print(f"  warm re-run             {w:7.2f} s   warm/cold = {w / c:6.1%}   (target < 10%)")
    from prefect.settings import get_current_settings

    beat = get_current_settings().flows.heartbeat_frequency
    beats = f"heartbeats every {beat} s: each run's end waits up to 1 s for their thread" if beat else "no heartbeats"
    print(f"    an empty flow run     {statistics.median(empty):7.2f} s   (Prefect's fixed cost of one flow run, "
          f"{beats}; the pipeline is 2 flow runs)")
    print(f"  plain functions         {p:7.2f} s   Prefect overhead (cold - plain)/plain = {(c - p) / p:+6.1%}"
          f"   (target < 15%)")


if __name__ == "__main__":
    main()
