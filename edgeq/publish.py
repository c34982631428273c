"""Publish a deploy bundle: only after every gate passed; atomic; same inputs, same bundle id.

Layout in the store: ``bundles/<bundle id>/`` holding the INT8 QDQ ONNX model, each target's
deployable form of it (e.g. OpenVINO IR), and ``manifest.json`` with the lineage. The folder is
assembled under a temporary name and renamed into place (local stores), and the manifest is always
the last file written, so a bundle with a manifest is complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeq import PIPELINE_VERSION, __version__
from edgeq.backends import get_backend
from edgeq.backends.runner import default_threads
from edgeq.core.errors import GateError
from edgeq.core.platform import cpu_isa
from edgeq.core.specs import EdgeqConfig
from edgeq.core.store import ArtifactStore, sha256_file, sha256_json

_TOOLS = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "prefect", "onnxscript", "numpy")


def toolchain_versions() -> dict[str, str]:
    out = {"edgeq": __version__, "pipeline": PIPELINE_VERSION, "python": platform.python_version()}
    for name in _TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def measured_on(cfg: EdgeqConfig) -> dict[str, dict[str, Any]]:
    """Where each target's latencies in this manifest were measured: its runtime, execution provider (ONNX
    Runtime), threads and CPU ISA. Targets timed on this machine get this CPU's ISA flags; a `command` target runs
    on the machine its command reaches, and one that declares `cpu_isa` ships to that CPU (its INT8 scheme says
    so), which is not where it was timed."""
    here = cpu_isa()["isa"]
    out: dict[str, dict[str, Any]] = {}
    for t in cfg.targets:
        backend = get_backend(t.backend)
        if not backend.measures_latency or not backend.availability(t.device)[0]:
            continue
        row: dict[str, Any] = {"backend": t.backend, "version": backend.version(), "device": t.device,
                               "threads": t.threads or default_threads()}
        if t.backend == "onnxruntime":
            row["provider"] = t.provider or "cpu"
        row["cpu_isa"] = "the machine the command runs on" if t.backend == "command" else here
        if t.cpu_isa is not None:
            row["declared_cpu_isa"] = t.cpu_isa
        out[t.name] = row
    return out


def bundle_identity(cfg: EdgeqConfig, int8_sha256: str, forms: dict[str, list[str]], lineage: dict[str, Any],
                    target_models: dict[str, str] | None = None) -> str:
    """Bundle id from what went in (the INT8 model, each target's own INT8 model where it has one, the targets'
    forms, lineage, toolchain), not from measured timings nor from compiled-form bytes: OpenVINO names constants
    from a process-wide counter, so its IR of the same model differs byte-wise between processes."""
    targets = [t.model_dump(mode="json", exclude={"required"}) for t in cfg.targets]
    identity = {"int8": int8_sha256, "forms": forms, "targets": targets, "lineage": lineage,
                "toolchain": toolchain_versions()}
    if target_models:
        identity["target_models"] = target_models
    return "bundle-" + sha256_json(identity)[:20]


def publish_bundle(cfg: EdgeqConfig, int8_onnx: Path, lineage: dict[str, Any], measurements: dict[str, Any],
                   gates_passed: bool) -> dict[str, Any]:
    """Write the bundle; returns the manifest. Refuses unless every gate passed."""
    return place_bundle(cfg, int8_onnx, lineage, measurements, gates_passed)[0]


def place_bundle(cfg: EdgeqConfig, int8_onnx: Path, lineage: dict[str, Any], measurements: dict[str, Any],
                 gates_passed: bool, target_models: dict[str, Path] | None = None,
                 form_records: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, Any], bool]:
    """`publish_bundle`, and whether this call placed the bundle (False: the same bundle was already there).

    `target_models`: targets that get their own INT8 model instead of `int8_onnx` (quantization.target_forms); each
    is shipped as `<model>-int8.<target>.onnx` and its compiled form is prepared from it. `form_records` (per such
    target: attempt, reason, its four-way validation) go into the manifest's `target_models`."""
    if not gates_passed:
        raise GateError("do not ship: a gate failed, nothing was published")
    target_models = target_models or {}
    store = ArtifactStore(cfg.store_url)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "bundle"
        stage.mkdir()
        shared = f"{cfg.model.name}-int8.onnx"
        shutil.copy(int8_onnx, stage / shared)
        forms: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        models: dict[str, dict[str, Any]] = {}
        for t in cfg.targets:
            source, onnx_name = int8_onnx, shared
            if t.name in target_models:
                source, onnx_name = Path(target_models[t.name]), f"{cfg.model.name}-int8.{t.name}.onnx"
                shutil.copy(source, stage / onnx_name)
            models[t.name] = {"onnx": onnx_name, **(form_records or {}).get(t.name, {"shared": True})}
            backend = get_backend(t.backend)
            ok, why = backend.availability(t.device)
            if not ok or not backend.ships_compiled_form:
                skipped[t.name] = why or backend.no_compiled_form_reason(t)
                continue
            prepared = backend.prepare(source, t, stage / t.name)
            forms[t.name] = sorted(str(Path(p).relative_to(stage)) for p in prepared.files.values())
        files = {str(p.relative_to(stage)): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        bundle_id = bundle_identity(cfg, sha256_file(int8_onnx), forms, lineage,
                                    {t: files[m["onnx"]] for t, m in models.items() if t in target_models})
        manifest = {"bundle_id": bundle_id, "model": {"name": cfg.model.name}, "files": files, "target_forms": forms,
                    "targets_without_compiled_form": skipped, **lineage, **measurements,
                    "toolchain": toolchain_versions(), "cpu": cpu_isa(), "measured_on": measured_on(cfg),
                    "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if target_models:  # which INT8 model each target gets; absent when every target gets the shared one
            manifest["target_models"] = models
        existing = read_manifest(store, bundle_id)
        if existing is not None:
            return existing, False  # identical inputs: the same bundle, never a second manifest interleaved
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        placed = _place(store, stage, bundle_id)
    return read_manifest(store, bundle_id) or manifest, placed


def _bundle_dir(store: ArtifactStore, bundle_id: str) -> str:
    return f"{store._base}/bundles/{bundle_id}"


def _place(store: ArtifactStore, stage: Path, bundle_id: str) -> bool:
    """Whether this call placed the bundle (False: a concurrent publisher placed the same one first)."""
    final = _bundle_dir(store, bundle_id)
    if store.is_local:
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        shutil.copytree(stage, tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if a concurrent publisher placed the same bundle first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not Path(final, "manifest.json").is_file():
                raise
            return False
        return True
    for p in sorted(stage.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            store.fs.put_file(str(p), f"{final}/{p.relative_to(stage)}")
    store.fs.put_file(str(stage / "manifest.json"), f"{final}/manifest.json")  # last: marks the bundle complete
    return True


def read_manifest(store: ArtifactStore, bundle_id: str) -> dict[str, Any] | None:
    path = f"{_bundle_dir(store, bundle_id)}/manifest.json"
    if not store.fs.exists(path):
        return None
    return json.loads(store.fs.cat_file(path))


def bundle_path(cfg: EdgeqConfig, bundle_id: str) -> str:
    store = ArtifactStore(cfg.store_url)
    return store.fs.unstrip_protocol(_bundle_dir(store, bundle_id))


def emit_published(manifest: dict[str, Any], uri: str) -> None:
    """A Prefect event for automations: `edgeq.model.published` with the bundle id."""
    from prefect.events import emit_event

    emit_event(event="edgeq.model.published",
               resource={"prefect.resource.id": f"edgeq.bundle.{manifest['bundle_id']}",
                         "prefect.resource.name": manifest["model"]["name"]},
               payload={"bundle_id": manifest["bundle_id"], "model": manifest["model"]["name"], "uri": uri,
                        "calibration_version": manifest.get("calibration", {}).get("version")})
