import json
import os

import pytest

from edgeq.core.errors import IntegrityError
from edgeq.core.store import ArtifactStore, sha256_bytes


def test_content_addressed_and_idempotent(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    a = store.put_bytes(b"hello", "greeting.txt")
    b = store.put_bytes(b"hello", "greeting.txt")
    assert a == b and a.sha256 == sha256_bytes(b"hello")
    assert store.read_bytes(a) == b"hello"
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert len(files) == 1 and ".tmp-" not in files[0].name


def test_tampered_artifact_is_refused_naming_the_file(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    ref = store.put_bytes(b"weights", "model.onnx")
    path = store.local_path(ref)
    os.chmod(path, 0o644)
    path.write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match="model.onnx .* changed after it was written"):
        store.read_bytes(ref)
    with pytest.raises(IntegrityError, match="model.onnx"):
        store.local_path(ref)


def test_writing_the_same_bytes_again_repairs_a_damaged_copy(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    ref = store.put_bytes(b"weights", "model.onnx")
    path = store.local_path(ref)
    path.write_bytes(b"weightz")  # same size, other bytes
    assert store.put_bytes(b"weights", "model.onnx") == ref
    assert store.read_bytes(ref) == b"weights"


def test_fsspec_memory_store_roundtrip():
    store = ArtifactStore("memory://edgeq-test-store")
    ref = store.put_json({"a": 1}, "r.json")
    assert ref.uri.startswith("memory://")
    assert store.read_json(ref) == {"a": 1}
    assert json.loads(store.local_path(ref).read_text()) == {"a": 1}


def test_records_are_replaced_atomically(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.write_record("calibration/v1.json", {"status": "candidate"})
    store.write_record("calibration/v1.json", {"status": "approved"})
    assert store.read_record("calibration/v1.json") == {"status": "approved"}
    assert store.list_records("calibration") == ["calibration/v1.json"]
    assert not [p for p in (tmp_path / "s").rglob("*.tmp-*")]


def test_artifact_names_cannot_escape(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        ArtifactStore(tmp_path / "s").put_bytes(b"x", "../evil")
