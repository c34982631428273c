"""What every Prefect task of edgeq shares: content cache keys and the retry rule."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from edgeq import PIPELINE_VERSION
from edgeq.core.errors import is_transient
from edgeq.core.specs import SplitSource, load_object
from edgeq.core.store import sha256_file, sha256_json


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry only faults that may pass; a bad model or bad data fails at once."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - inspecting the failure, not handling it
        return is_transient(exc)
    return False


def code_fingerprint(import_path: str) -> str:
    """Hash of the source file that defines an import path (a changed model class must miss the cache)."""
    try:
        obj = load_object(import_path)
        src = inspect.getsourcefile(obj) or ""
        return sha256_file(src) if src and Path(src).is_file() else import_path
    except Exception:  # noqa: BLE001 - an unimportable path fails later with a clear error
        return import_path


def split_fingerprint(src: SplitSource | None) -> str | None:
    """Content hash of where a data split comes from."""
    if src is None:
        return None
    if src.kind == "arrays":
        return sha256_file(src.path) if src.path.is_file() else f"missing:{src.path}"
    if src.kind == "image_folder":
        files = sorted(p for p in src.path.rglob("*") if p.is_file()) if src.path.is_dir() else []
        return sha256_json([src.labels and sha256_file(src.labels)] + [(p.name, sha256_file(p)) for p in files])
    return sha256_json([code_fingerprint(src.loader), src.kwargs])


def content_key(stage: str, **parts: Any) -> str:
    """A cache key from a stage name, content hashes and config, and the pipeline version."""
    return f"edgeq-{stage}-" + sha256_json({"pipeline": PIPELINE_VERSION, "stage": stage, **parts})

