"""Calibration records are sealed: a hand edit of a candidate or its decision is refused, naming the file."""

from __future__ import annotations

import json

import pytest

from edgeq.calibration.versions import (
    CalibrationVersion,
    get_approved,
    list_versions,
    load_version,
    now,
    record_decision,
    write_candidate,
)
from edgeq.core.store import ArtifactStore, IntegrityError


def _candidate(store: ArtifactStore, vid: str = "cal-00000000000000aa") -> CalibrationVersion:
    v = CalibrationVersion(version=vid, created_at=now(), model="m", input_name="image", sample_shape=[1, 8, 8],
                           size=300, source={"pool": "p"}, preprocess={}, strata=["camera"], target_size=1024,
                           min_size=256, pool_rows=300, usable=300, excluded={}, coverage="ok", artifacts={})
    return write_candidate(store, v)[0]


def _edit(store: ArtifactStore, vid: str, change) -> str:
    path = store.record_location(f"calibration/{vid}.json")
    rec = json.loads(open(path).read())
    change(rec)
    open(path, "w").write(json.dumps(rec))
    return path


def test_an_untouched_decision_verifies_and_is_chained_to_its_candidate(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    cand = _candidate(store)
    approved = record_decision(store, cand.version, approve=True, reviewer="ann")
    assert approved.decision.candidate_sha256 == cand.content_sha256 != ""
    assert get_approved(store, "latest").decision.sha256 == approved.decision.sha256


def test_a_candidate_turned_into_approved_by_hand_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    cand = _candidate(store)
    path = _edit(store, cand.version, lambda r: r.update(status="approved"))
    with pytest.raises(IntegrityError, match=rf"calibration record {path} says 'approved' but carries no review"):
        get_approved(store, cand.version)


def test_a_forged_decision_copied_from_another_version_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    other = _candidate(store, "cal-00000000000000bb")
    decided = record_decision(store, other.version, approve=True, reviewer="ann").model_dump(mode="json")
    cand = _candidate(store)
    path = _edit(store, cand.version, lambda r: r.update(status="approved", decision=decided["decision"]))
    with pytest.raises(IntegrityError, match=rf"calibration record {path} holds a decision \(approved by ann\)"):
        load_version(store, cand.version)
    with pytest.raises(IntegrityError):  # "latest" reads every record: the forged one is not skipped silently
        get_approved(store, "latest")


def test_an_edited_reviewer_or_content_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    cand = _candidate(store)
    record_decision(store, cand.version, approve=True, reviewer="ann")
    _edit(store, cand.version, lambda r: r["decision"].update(reviewer="bob"))
    with pytest.raises(IntegrityError, match="whose seal does not match"):
        load_version(store, cand.version)
    store2 = ArtifactStore(tmp_path / "store2")
    cand2 = _candidate(store2)
    _edit(store2, cand2.version, lambda r: r.update(size=1024))
    with pytest.raises(IntegrityError, match="was changed after it was written"):
        list_versions(store2)


def test_an_unsealed_record_is_refused_and_a_rebuild_replaces_it(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    cand = _candidate(store)
    _edit(store, cand.version, lambda r: (r.pop("content_sha256"), r.update(status="approved")))
    with pytest.raises(IntegrityError, match="carries no content seal .* rebuild the version with `edgeq calibrate"):
        get_approved(store, cand.version)
    rebuilt = _candidate(store)  # what `edgeq calibrate` does with the same content
    assert rebuilt.status == "candidate" and load_version(store, cand.version).content_sha256
