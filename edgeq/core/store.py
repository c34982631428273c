"""Content-addressed artifact store on any fsspec filesystem, written atomically.

Objects live at ``objects/<sha[:2]>/<sha>/<name>``: the same bytes always land at
the same place, so two runs of the same work agree and a re-write is a no-op.
Every write goes to a temporary name first and is renamed into place, so a
crash never leaves a half-written object under its final name. Every read
re-hashes the bytes and refuses a file that no longer matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from edgeq.core.errors import IntegrityError

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of JSON-able data (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def build_once(root: str | Path, version: int, build: Callable[[Path], dict], stamp: str = "demo.json") -> Path:
    """Build a folder with `build(root)` unless `root/stamp` already says `version` (then a no-op). The stamp,
    `build`'s returned dict plus the version, is written last and atomically: an interrupted build is redone."""
    root = Path(root)
    path = root / stamp
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("version") == version:
                return root
        except json.JSONDecodeError:
            pass
    info = build(root)
    tmp = path.with_name(stamp + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)
    return root


class ArtifactRef(BaseModel):
    """What tasks pass around instead of models or tensors."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    size: int
    name: str
    meta: dict[str, Any] = Field(default_factory=dict)


class ArtifactStore:
    """A content-addressed store rooted at a local folder or an fsspec URL."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self._base, exist_ok=True)

    # -- paths -------------------------------------------------------------
    def _key(self, sha: str, name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"artifact name must be a plain file name, got {name!r}")
        return f"{self._base}/objects/{sha[:2]}/{sha}/{name}"

    def _uri(self, key: str) -> str:
        return self.fs.unstrip_protocol(key)

    def _strip(self, uri: str) -> str:
        return self.fs._strip_protocol(uri)

    # -- writing -----------------------------------------------------------
    def _atomic_put(self, src_local: str | None, data: bytes | None, key: str) -> None:
        parent = key.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        try:
            if data is not None:
                with self.fs.open(tmp, "wb") as f:
                    f.write(data)
            else:
                self.fs.put_file(src_local, tmp)
            if self.is_local:
                os.replace(tmp, key)  # atomic on POSIX; concurrent writers of the same bytes agree
            else:
                self.fs.mv(tmp, key)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def put_bytes(self, data: bytes, name: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        sha = sha256_bytes(data)
        key = self._key(sha, name)
        if not self._intact(key, sha, len(data)):
            self._atomic_put(None, data, key)
        return ArtifactRef(uri=self._uri(key), sha256=sha, size=len(data), name=name, meta=meta or {})

    def put_file(self, path: str | Path, name: str | None = None, meta: dict[str, Any] | None = None) -> ArtifactRef:
        path = Path(path)
        sha = sha256_file(path)
        size = path.stat().st_size
        key = self._key(sha, name or path.name)
        if not self._intact(key, sha, size):
            self._atomic_put(str(path), None, key)
        return ArtifactRef(uri=self._uri(key), sha256=sha, size=size, name=name or path.name, meta=meta or {})

    def put_json(self, obj: Any, name: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        data = json.dumps(obj, sort_keys=True, indent=2, default=str).encode()
        return self.put_bytes(data, name, meta)

    def _intact(self, key: str, sha: str, size: int) -> bool:
        """True when the object is already there with the right bytes; a damaged copy gets rewritten."""
        try:
            if not (self.fs.exists(key) and self.fs.size(key) == size):
                return False
            h = hashlib.sha256()
            with self.fs.open(key, "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    h.update(chunk)
            return h.hexdigest() == sha
        except FileNotFoundError:
            return False

    # -- reading -----------------------------------------------------------
    def exists(self, ref: ArtifactRef) -> bool:
        return self.fs.exists(self._strip(ref.uri))

    def read_bytes(self, ref: ArtifactRef) -> bytes:
        key = self._strip(ref.uri)
        if not self.fs.exists(key):
            raise IntegrityError(f"artifact {ref.name} ({ref.uri}) is missing from the store")
        data = self.fs.cat_file(key)
        got = sha256_bytes(data)
        if got != ref.sha256:
            raise IntegrityError(
                f"artifact {ref.name} at {ref.uri} was changed after it was written: "
                f"sha256 {got[:12]}… != recorded {ref.sha256[:12]}…; refusing to use it"
            )
        return data

    def read_json(self, ref: ArtifactRef) -> Any:
        return json.loads(self.read_bytes(ref))

    def local_path(self, ref: ArtifactRef, cache_dir: str | Path | None = None) -> Path:
        """A verified local file with the artifact's bytes (downloaded when the store is remote)."""
        key = self._strip(ref.uri)
        if self.is_local:
            if not os.path.exists(key):
                raise IntegrityError(f"artifact {ref.name} ({ref.uri}) is missing from the store")
            got = sha256_file(key)
            if got != ref.sha256:
                raise IntegrityError(
                    f"artifact {ref.name} at {key} was changed after it was written: "
                    f"sha256 {got[:12]}… != recorded {ref.sha256[:12]}…; refusing to use it"
                )
            return Path(key)
        cache = Path(cache_dir or Path.home() / ".cache" / "edgeq" / "artifacts") / ref.sha256
        target = cache / ref.name
        if not (target.exists() and sha256_file(target) == ref.sha256):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{ref.name}.tmp-{uuid.uuid4().hex}")
            tmp.write_bytes(self.read_bytes(ref))
            os.replace(tmp, target)
        return target

    # -- mutable records (small JSON documents addressed by name) ------------
    def write_record(self, relpath: str, obj: Any) -> str:
        """Atomically replace a small JSON record at ``records/<relpath>``."""
        key = f"{self._base}/records/{relpath}"
        data = json.dumps(obj, sort_keys=True, indent=2, default=str).encode()
        self._atomic_put(None, data, key)
        return self._uri(key)

    def record_location(self, relpath: str) -> str:
        """Where a record lives (a path or URL), for messages that name the file."""
        return f"{self.root}/records/{relpath}"

    def read_record(self, relpath: str) -> Any | None:
        key = f"{self._base}/records/{relpath}"
        if not self.fs.exists(key):
            return None
        return json.loads(self.fs.cat_file(key))

    def list_records(self, prefix: str) -> list[str]:
        base = f"{self._base}/records/{prefix}".rstrip("/")
        if not self.fs.exists(base):
            return []
        return sorted(p[len(f"{self._base}/records/"):] for p in self.fs.find(base) if ".tmp-" not in p)

    def open(self, ref: ArtifactRef) -> BinaryIO:
        import io

        return io.BytesIO(self.read_bytes(ref))
