"""Shared pieces of the reliability tests: fast demo configs, one approved calibration set, child processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO, write_config

FAST_TARGETS = [
    {"name": "ort-cpu", "backend": "onnxruntime", "device": "cpu", "precision": "fp32"},
    {"name": "openvino-cpu", "backend": "openvino", "device": "cpu", "precision": "fp32"},
    {"name": "hailo8-declared", "backend": "declared", "profile": "hailo8-example", "precision": "int8",
     "required": False},
]


def fast_config(folder: Path, demo_root: Path, store: Path | str | None = None, targets=None,
                model: dict | None = None, **overrides) -> Path:
    """The demo config tuned for tests: PTQ, 10 latency runs, a given store (shared between tests when asked)."""
    path = write_config(folder, demo_root, **overrides)
    data = yaml.safe_load(path.read_text())
    data["targets"] = targets or FAST_TARGETS
    for key, fast in (("quantization", {"mode": "ptq", "latency_iters": 10}), ("validation", {"latency_iters": 10})):
        data[key] = {**fast, **overrides.get(key, {})}
    if store is not None:
        data["store"] = str(store)
    if model:
        data["model"].update(model)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def seed_store_with_approved_calibration(store_dir: Path, cfg_path: Path) -> str:
    """Build the demo's calibration candidate into the config's store and approve it; returns the version id."""
    from edgeq.calibration.versions import record_decision
    from edgeq.core.store import ArtifactStore
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(cfg_path)
    assert Path(cfg.store_url) == Path(store_dir)
    version = build_calibration_candidate(cfg).version.version
    record_decision(ArtifactStore(cfg.store_url), version, approve=True, reviewer="reliability-tests")
    return version


def copy_store(seed: Path, dest: Path) -> Path:
    """A fresh store holding only the seed's approved calibration version (records + objects)."""
    shutil.copytree(seed, dest)
    return dest


def child_env(results_dir: Path | None = None) -> dict[str, str]:
    """Environment of a child process that talks to this session's Prefect API and result storage."""
    import prefect.settings as ps

    env = dict(os.environ)
    env["PREFECT_API_URL"] = ps.PREFECT_API_URL.value()
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(results_dir or ps.PREFECT_LOCAL_STORAGE_PATH.value())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return env


CONVERT_SCRIPT = """
import json, sys
from edgeq.core.quiet import quiet_environment
quiet_environment()
from edgeq.flows.convert import ConvertParams, convert_model
state = convert_model(ConvertParams(config=sys.argv[1], calibration=sys.argv[2]), return_state=True)
out = {"flow_run_id": str(state.state_details.flow_run_id), "type": state.type.value, "message": state.message}
if state.is_completed():
    m = state.result()
    out.update(bundle_id=m["bundle_id"], uri=m["uri"])
else:
    try:
        state.result()
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out), flush=True)
"""


def start_convert(cfg_path: Path, calibration: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`convert_model` in a child process (a separate "worker") against the session's Prefect API."""
    return subprocess.Popen([sys.executable, "-c", CONVERT_SCRIPT, str(cfg_path), calibration], env=env,
                            cwd=str(REPO), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def convert_result(proc: subprocess.Popen, log: Path, timeout: float = 240) -> dict[str, Any]:
    proc.wait(timeout)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the conversion process exited {proc.returncode} without a result:\n{log.read_text()[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def task_runs(flow_run_id: str) -> dict[str, str]:
    """Task run name -> state name ('Completed', 'Cached', 'Failed', ...) of one flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs if r.state is not None}


def wait_for_task_run(flow_name: str, task_prefix: str, after: float, timeout: float = 180) -> str:
    """Poll the API until a run of `flow_name` started after `after` has a Running task named `task_prefix...`.

    Returns the flow run id.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                         task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=task_prefix)))
            for r in runs:
                if (r.state and r.state.type == StateType.RUNNING and r.start_time
                        and r.start_time.timestamp() >= after and r.flow_run_id):
                    return str(r.flow_run_id)
            time.sleep(0.2)
    raise AssertionError(f"no {task_prefix!r} task of {flow_name!r} started running within {timeout}s")


def verify_store(root: Path) -> dict[str, int]:
    """Every object's bytes match the sha256 in its path; no temp file under a final name; bundles complete.

    Returns counts of what was checked.
    """
    from edgeq.core.store import sha256_file

    objects = bundles = 0
    for p in (root / "objects").rglob("*") if (root / "objects").exists() else []:
        if p.is_file():
            assert ".tmp-" not in p.name, f"partial artifact left in the store: {p}"
            assert sha256_file(p) == p.parent.name, f"{p} does not match its recorded sha256"
            objects += 1
    for b in (root / "bundles").iterdir() if (root / "bundles").exists() else []:
        assert ".tmp-" not in b.name, f"half-placed bundle folder left in the store: {b}"
        manifest = json.loads((b / "manifest.json").read_text())
        assert manifest["bundle_id"] == b.name
        for rel, sha in manifest["files"].items():
            assert sha256_file(b / rel) == sha, f"bundle {b.name}: {rel} does not match its manifest"
        bundles += 1
    for p in (root / "records").rglob("*") if (root / "records").exists() else []:
        if p.is_file():
            assert ".tmp-" not in p.name, f"partial record left in the store: {p}"
            json.loads(p.read_text())
    return {"objects": objects, "bundles": bundles}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under a store (missing store: empty).

    Prefect's task results and cache records (`<store>/prefect-results`) are left out: they are Prefect's
    bookkeeping, not artifacts, and a failed task records its exception there.
    """
    from edgeq.core.store import sha256_file
    from edgeq.tasks.caching import RESULTS_FOLDER

    if not root.exists():
        return {}
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != RESULTS_FOLDER}


_SEED: dict[str, Any] = {}


def seed(demo_root: Path) -> tuple[Path, str]:
    """One store with an approved demo calibration version per test session (built once, copied per test).

    Returns (the seed store folder, the approved version id).
    """
    if "store" not in _SEED:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="edgeq-reliability-seed-"))
        store = folder / "store"
        cfg_path = fast_config(folder / "cfg", demo_root, store=store)
        _SEED.update(store=store, version=seed_store_with_approved_calibration(store, cfg_path))
    return _SEED["store"], _SEED["version"]


def narrow_weights(demo_root: Path, folder: Path, width: int, epochs: int = 6) -> Path:
    """Weights of the demo CNN at another width, trained briefly on the demo's training split (deterministic)."""
    import numpy as np
    import safetensors.torch

    from edgeq.demo import train_digits_net

    out = folder / f"digits-w{width}.safetensors"
    if not out.is_file():
        z = np.load(demo_root / "train.npz")
        model = train_digits_net(z["x"].astype(np.float32) / 255.0, z["y"], epochs=epochs, width=width)
        folder.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(model.state_dict(), out)
    return out


def task_run_objects(flow_run_id: str) -> list:
    """The task runs of one flow run (name, state, run_count), from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def settled_task_runs(flow_run_id: str, settle_s: float = 20.0) -> list:
    """The task runs of a finished flow run, once each has a final state recorded (or after `settle_s`).

    Task runs report their states to the API asynchronously (as events), so right after the flow returns a few may
    still read "Running", or have no state recorded yet (seen in CI): wait, boundedly, until none does.
    """
    deadline = time.monotonic() + settle_s
    while True:
        runs = task_run_objects(flow_run_id)
        if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def settled_task_states(flow_run_id: str, settle_s: float = 20.0) -> list[tuple[str, str]]:
    """(task run name, state name) of every task run of a finished flow run, sorted; "Pending" where the API has
    recorded no state even after `settle_s`."""
    return sorted((r.name, r.state.name if r.state else "Pending") for r in settled_task_runs(flow_run_id, settle_s))
