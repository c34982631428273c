"""What every Prefect task of edgeq shares: content cache keys, results kept in the store, and the retry rule."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, TypeVar

from edgeq import PIPELINE_VERSION
from edgeq.core.errors import is_transient
from edgeq.core.specs import SplitSource, load_object
from edgeq.core.store import sha256_bytes, sha256_file, sha256_json

T = TypeVar("T")

# Under the artifact store: Prefect's task results and the cache records that point at them.
RESULTS_FOLDER = "prefect-results"


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
    """Content hash of where a data split comes from, and whether it is stored as the model's input."""
    if src is None:
        return None
    fingerprint = _source_fingerprint(src)
    # The same bytes marked preprocessed feed the model other values.
    return sha256_json(["preprocessed", fingerprint]) if src.preprocessed else fingerprint


def _source_fingerprint(src: SplitSource) -> str:
    if src.kind == "arrays":
        return sha256_file(src.path) if src.path.is_file() else f"missing:{src.path}"
    if src.kind == "image_folder":
        files = sorted(p for p in src.path.rglob("*") if p.is_file()) if src.path.is_dir() else []
        return sha256_json([src.labels and sha256_file(src.labels)] + [(p.name, sha256_file(p)) for p in files])
    return sha256_json([code_fingerprint(src.loader), src.kwargs])


def content_key(stage: str, **parts: Any) -> str:
    """A cache key from a stage name, content hashes and config, and the pipeline version."""
    return f"edgeq-{stage}-" + sha256_json({"pipeline": PIPELINE_VERSION, "stage": stage, **parts})


def result_storage(store_url: str) -> Path | str:
    """Where Prefect keeps edgeq's task results and cache records: in the store, `<store>/prefect-results`.

    Prefect's default is the Prefect home (PREFECT_LOCAL_STORAGE_PATH), one per machine or user, so a worker with
    another home recomputed every task although the cache keys matched. Kept beside the artifacts, every worker on
    the same store URL reads the same records. A local store gives a folder; any other fsspec URL (s3://, memory://,
    ...) a RemoteFileSystem block saved on the Prefect API, because a task's result storage must be a path or a
    saved block.
    """
    import fsspec

    fs, base = fsspec.core.url_to_fs(str(store_url))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if {"file", "local"} & set(protocols):
        return Path(base) / RESULTS_FOLDER
    from prefect.settings import PREFECT_API_URL

    return _saved_remote_storage(f"{str(store_url).rstrip('/')}/{RESULTS_FOLDER}", str(PREFECT_API_URL.value()))


@functools.lru_cache(maxsize=None)
def _saved_remote_storage(url: str, api_url: str) -> str:
    """The slug of a RemoteFileSystem block at `url`, saved once per process and API (the name derives from the URL,
    so every worker saves the same block)."""
    from prefect.filesystems import RemoteFileSystem

    name = "edgeq-results-" + sha256_bytes(url.encode())[:16]
    RemoteFileSystem(basepath=url).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def on_store(task: T, store_url: str) -> T:
    """`task` with its results and cache records kept in the store at `store_url` (see `result_storage`)."""
    return task.with_options(result_storage=result_storage(store_url))


def call_cached(task: Any, *args: Any, gone: Any = None) -> tuple[Any, bool]:
    """Run a cached task inside a flow: (its result, whether it was a cache hit).

    `gone(result)` says when a cached result points at artifacts no longer in the store; the task then runs again
    (refresh_cache). A cache hit re-creates nothing, so its caller skips what a fresh result would publish again
    (the UI artifacts of an unchanged stage keep their latest version under the same key).
    """
    state = task(*args, return_state=True)
    result = state.result()
    if gone is not None and gone(result):
        state = task.with_options(refresh_cache=True)(*args, return_state=True)
        result = state.result()
    return result, state.name == "Cached"


def all_cached(futures: list[Any]) -> bool:
    """Whether every one of a mapped task's runs (resolved futures) was a cache hit."""
    return all(f.state.name == "Cached" for f in futures)
