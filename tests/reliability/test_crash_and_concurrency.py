"""Real processes against the session's Prefect API: a SIGKILL mid-quantization, two conversions at once."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.reliability.rel_helpers import (
    child_env,
    convert_result,
    copy_store,
    fast_config,
    narrow_weights,
    seed,
    start_convert,
    task_runs,
    verify_store,
    wait_for_task_run,
)


def _by_prefix(runs: dict[str, str], prefix: str) -> list[str]:
    return [state for name, state in runs.items() if name.startswith(prefix)]


def test_sigkill_during_quantization_then_rerun_resumes_from_cache(prefect_server, demo_root, tmp_path):
    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, tmp_path / "store")
    cfg = fast_config(tmp_path / "cfg", demo_root, store=store)
    env = child_env()

    t0 = time.time() - 1
    proc = start_convert(cfg, version, env, tmp_path / "first.log")
    try:
        run_id = wait_for_task_run("convert-model", "quantize", after=t0)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    killed = task_runs(run_id)
    assert _by_prefix(killed, "quantize") == ["Running"], killed  # killed mid-quantization, never finished
    assert not (store / "bundles").exists() or not any((store / "bundles").iterdir())
    verify_store(store)  # nothing half-written under a final name

    second = start_convert(cfg, version, env, tmp_path / "second.log")
    out = convert_result(second, tmp_path / "second.log")
    assert out["type"] == "COMPLETED", out
    runs = task_runs(out["flow_run_id"])
    assert _by_prefix(runs, "export") == ["Cached"], runs
    assert sorted(_by_prefix(runs, "compile-check")) == ["Cached"] * 3, runs
    assert _by_prefix(runs, "quantize") == ["Completed"], runs  # the killed stage runs again, from scratch
    assert _by_prefix(runs, "publish") == ["Completed"], runs
    checked = verify_store(store)
    assert checked["bundles"] == 1 and (store / "bundles" / out["bundle_id"] / "manifest.json").is_file()


def test_two_conversions_of_the_same_model_at_once_publish_one_consistent_bundle(prefect_server, demo_root,
                                                                                  tmp_path):
    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, tmp_path / "store")
    cfg = fast_config(tmp_path / "cfg", demo_root, store=store)
    env = child_env()
    procs = [start_convert(cfg, version, env, tmp_path / f"same-{i}.log") for i in range(2)]
    outs = [convert_result(p, tmp_path / f"same-{i}.log") for i, p in enumerate(procs)]
    assert [o["type"] for o in outs] == ["COMPLETED"] * 2, outs
    assert outs[0]["bundle_id"] == outs[1]["bundle_id"]
    bundles = sorted(p.name for p in (store / "bundles").iterdir())
    assert bundles == [outs[0]["bundle_id"]], bundles  # one bundle, no leftover temp folder
    manifest = json.loads((store / "bundles" / bundles[0] / "manifest.json").read_text())
    assert manifest["bundle_id"] == bundles[0] and manifest["calibration"]["version"] == version
    assert verify_store(store)["bundles"] == 1


def test_two_different_models_side_by_side_do_not_interfere(prefect_server, demo_root, tmp_path):
    """The demo CNN and a half-width one (its own weights) converted at once into one shared store."""
    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, tmp_path / "store")
    weights = narrow_weights(demo_root, tmp_path, width=8)
    cfgs = [fast_config(tmp_path / "a", demo_root, store=store),
            fast_config(tmp_path / "b", demo_root, store=store,
                        model={"kwargs": {"width": 8, "num_classes": 10}, "weights": str(weights)})]
    env = child_env()
    procs = [start_convert(c, version, env, tmp_path / f"pair-{i}.log") for i, c in enumerate(cfgs)]
    outs = [convert_result(p, tmp_path / f"pair-{i}.log") for i, p in enumerate(procs)]
    assert [o["type"] for o in outs] == ["COMPLETED"] * 2, outs
    assert outs[0]["bundle_id"] != outs[1]["bundle_id"]
    manifests = [json.loads((store / "bundles" / o["bundle_id"] / "manifest.json").read_text()) for o in outs]
    assert manifests[0]["model"]["kwargs"]["width"] == 16 and manifests[1]["model"]["kwargs"]["width"] == 8
    assert manifests[0]["model"]["int8_onnx_sha256"] != manifests[1]["model"]["int8_onnx_sha256"]
    assert verify_store(store)["bundles"] == 2
