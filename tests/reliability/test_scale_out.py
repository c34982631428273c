"""Fan-out over models x targets on Prefect's own runners (threads, Dask), and caches shared by workers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.reliability.rel_helpers import (
    FAST_TARGETS,
    child_env,
    copy_store,
    fast_config,
    narrow_weights,
    seed,
    settled_task_states,
)

FANOUT_SCRIPT = """
import json, sys
from edgeq.core.quiet import quiet_environment
quiet_environment()
from edgeq.flows.fanout import FanoutParams, run_fanout
state = run_fanout(FanoutParams.model_validate_json(sys.argv[1]), return_state=True)
print("RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "type": state.type.value,
                              "rows": state.result() if state.is_completed() else None}), flush=True)
"""


def _configs(tmp_path, demo_root, store):
    weights = narrow_weights(demo_root, tmp_path / "weights", width=8)
    return [str(fast_config(tmp_path / f"{store.name}-w16", demo_root, store=store)),
            str(fast_config(tmp_path / f"{store.name}-w8", demo_root, store=store,
                            model={"kwargs": {"width": 8, "num_classes": 10}, "weights": str(weights)}))]


def _states(flow_run_id: str) -> list[str]:
    """Every task run's final state name (task run names repeat across models, so a list, not a dict)."""
    return sorted(state for _, state in settled_task_states(flow_run_id))


def _comparable(rows):
    return [{k: v for k, v in r.items() if k != "config"} for r in rows]


def test_dask_fanout_with_two_workers_matches_the_thread_runner(prefect_server, demo_root, tmp_path):
    from edgeq.flows.fanout import FanoutParams, run_fanout

    results = {}
    for runner in ("thread", "dask"):
        store = tmp_path / f"store-{runner}"  # a store of its own: the cache key holds the store, so both compute
        state = run_fanout(FanoutParams(configs=_configs(tmp_path, demo_root, store), runner=runner, workers=2),
                           return_state=True)
        assert state.is_completed(), state.message
        results[runner] = state.result()
        runs = _states(str(state.state_details.flow_run_id))
        assert runs == ["Completed"] * (2 + 2 * len(FAST_TARGETS)), runs
    assert _comparable(results["dask"]) == _comparable(results["thread"])
    assert [r["kwargs"]["width"] for r in results["dask"]] == [16, 8]
    assert all(r["targets"] == {"ort-cpu": "compiled", "openvino-cpu": "compiled", "hailo8-declared": "declared-ok"}
               for r in results["dask"]), results["dask"]


def test_second_worker_with_its_own_prefect_home_gets_cache_hits_from_the_store(prefect_server, demo_root, tmp_path):
    """Two processes ("workers on two machines") sharing one store, each with its own Prefect home and so its own
    local result storage: the second one's exports, compile checks and quantizations are cache hits, because edgeq
    keeps task results and their cache records in the store (`<store>/prefect-results`), not in the Prefect home."""
    from edgeq.flows.fanout import FanoutParams

    seed_store, version = seed(demo_root)
    store = copy_store(seed_store, tmp_path / "shared-store")
    params = FanoutParams(configs=_configs(tmp_path, demo_root, store), stage="quantize", calibration=version)
    outs, homes = [], []
    for worker in ("a", "b"):
        home = tmp_path / f"prefect-home-{worker}"
        homes.append(home)
        env = child_env(results_dir=home / "storage")
        env["PREFECT_HOME"] = str(home)
        proc = subprocess.run([sys.executable, "-c", FANOUT_SCRIPT, params.model_dump_json()], env=env,
                              capture_output=True, text=True, timeout=240)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert line, f"worker {worker} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outs.append(json.loads(line[-1][len("RESULT "):]))
    assert [o["type"] for o in outs] == ["COMPLETED", "COMPLETED"], outs
    first, second = (_states(o["flow_run_id"]) for o in outs)
    n = 2 + 2 * len(FAST_TARGETS) + 2  # exports, compile checks, quantizations
    assert first == ["Completed"] * n, first
    assert second == ["Cached"] * n, second
    assert outs[1]["rows"] == outs[0]["rows"]
    assert len([p for p in (store / "prefect-results").iterdir() if p.is_file()]) >= n  # one record per task run
    assert not [p for h in homes for p in (h / "storage").rglob("*") if p.is_file()]  # nothing in either home
