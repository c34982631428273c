"""Immutable calibration versions and their review decision, in the artifact store.

A version's samples, manifest and report are content-addressed objects; its record
(``records/calibration/<version>.json``) is the only mutable part and changes exactly
once: from ``candidate`` to ``approved`` or ``rejected``. A decided version is never
modified again; a new build with other content is a new version.

Records are sealed: a candidate carries the sha256 of its content (``content_sha256``), and
a decision carries the sha256 of the candidate it decides (``candidate_sha256``) and its own
(``sha256``). Every read verifies both, so a record edited by hand (a candidate turned into
"approved", a swapped sample list) is refused, naming the file. A seal is a checksum, not a
signature: it catches edits, not someone who recomputes the hashes.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, Field

from edgeq.core.errors import CalibrationError, IntegrityError, NotApproved, VersionNotFound
from edgeq.core.store import ArtifactRef, ArtifactStore, sha256_json

Status = Literal["candidate", "approved", "rejected"]
_PREFIX = "calibration"


class Decision(BaseModel):
    status: Literal["approved", "rejected"]
    reviewer: str
    comment: str = ""
    decided_at: str
    via: str = Field("", description="where the decision came from: the paused flow run, or the CLI")
    candidate_sha256: str = Field("", description="content_sha256 of the candidate this decision decides")
    sha256: str = Field("", description="sha256 of this decision (every field above)")


class Review(BaseModel):
    flow_run_id: str | None = None
    paused_at: str | None = None
    timeout_s: int | None = None
    poll_interval_s: int | None = None
    timed_out_at: str | None = None


class VersionInput(BaseModel):
    """One model input a version holds: its samples as the model takes them (float inputs preprocessed)."""

    name: str
    dtype: str = Field(description="the dtype the samples are stored and fed as (the model's declared dtype)")
    shape: list[int] = Field(description="per-sample shape (after the batch axis)")
    artifact: str = Field(description="key in the version's `artifacts` of this input's samples (.npy)")
    preprocess: dict[str, Any] | None = Field(
        None, description="the preprocessing that made a float input's samples; None for integer/bool inputs")


class CalibrationVersion(BaseModel):
    version: str
    status: Status = "candidate"
    created_at: str
    model: str
    input_name: str = Field(description="the first (for a one-input version: the only) input; see `inputs`")
    sample_shape: list[int] = Field(description="per-sample shape of `input_name`; see `inputs`")
    size: int
    source: dict[str, Any]
    preprocess: dict[str, Any]
    strata: list[str]
    target_size: int
    min_size: int
    override_reason: str | None = None
    notes: list[str] = Field(default_factory=list)
    pool_rows: int
    usable: int
    excluded: dict[str, int]
    coverage: str
    artifacts: dict[str, ArtifactRef]
    review: Review = Review()
    decision: Decision | None = None
    content_sha256: str = Field("", description="sha256 of the immutable content (all but status/review/decision)")
    inputs: list[VersionInput] | None = Field(
        None, description="every model input the version holds (name, dtype, per-sample shape, artifact); None in "
                          "records of an older edgeq, which hold one float32 input (`input_name`, artifact 'samples')")

    def content_hash(self) -> str:
        # A record written before `inputs` existed is sealed without it: leave it out so its seal still holds.
        exclude = _UNSEALED | ({"inputs"} if self.inputs is None else set())
        return sha256_json(self.model_dump(mode="json", exclude=exclude))

    def input_records(self) -> list[VersionInput]:
        """The inputs this version holds; an older one-input record's as it was written (float32, 'samples')."""
        if self.inputs is not None:
            return list(self.inputs)
        return [VersionInput(name=self.input_name, dtype="float32", shape=list(self.sample_shape), artifact="samples",
                             preprocess=self.preprocess)]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.input_records()]


# The parts of a record that change after it is written; everything else is sealed by content_sha256.
_UNSEALED = {"status", "review", "decision", "content_sha256"}


def _decision_hash(d: Decision) -> str:
    return sha256_json(d.model_dump(mode="json", exclude={"sha256"}))


def _verified(rec: Any, where: str) -> CalibrationVersion:
    """The record at `where`, refused unless its seals match its content."""
    v = CalibrationVersion.model_validate(rec)
    refuse = f"calibration record {where} "
    if not v.content_sha256:
        raise IntegrityError(refuse + "carries no content seal (written by an older edgeq, or by hand); refusing "
                             "it: rebuild the version with `edgeq calibrate CONFIG` and review it again")
    if v.content_hash() != v.content_sha256:
        raise IntegrityError(refuse + f"was changed after it was written: its content hashes to "
                             f"{v.content_hash()[:16]}…, not the sealed {v.content_sha256[:16]}…; refusing it")
    d = v.decision
    if d is None:
        if v.status != "candidate":
            raise IntegrityError(refuse + f"says {v.status!r} but carries no review decision; refusing it")
        return v
    if _decision_hash(d) != d.sha256 or d.candidate_sha256 != v.content_sha256 or d.status != v.status:
        raise IntegrityError(refuse + f"holds a decision ({d.status} by {d.reviewer}) whose seal does not match "
                             f"the record (status {v.status!r}); refusing it: the decision was edited by hand")
    return v


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def version_id(sample_hashes: list[str], preprocess: dict[str, Any], source: dict[str, Any]) -> str:
    """Derived from content: the ordered sample hashes, the preprocessing and the source."""
    return "cal-" + sha256_json({"samples": sample_hashes, "preprocess": preprocess, "source": source})[:16]


def _path(version: str) -> str:
    if not version.replace("-", "").isalnum():
        raise VersionNotFound(f"{version!r} is not a calibration version id (like cal-1a2b3c4d5e6f7a8b)")
    return f"{_PREFIX}/{version}.json"


def load_version(store: ArtifactStore, version: str) -> CalibrationVersion:
    rec = store.read_record(_path(version))
    if rec is None:
        known = [v.version for v in list_versions(store)]
        raise VersionNotFound(
            f"calibration version {version!r} not found in store {store.root}"
            + (f"; known: {', '.join(known[-5:])}" if known else "; it holds none (run `edgeq calibrate CONFIG`)")
        )
    return _verified(rec, store.record_location(_path(version)))


def list_versions(store: ArtifactStore) -> list[CalibrationVersion]:
    out = []
    for rel in store.list_records(_PREFIX):
        if rel.endswith(".json"):
            out.append(_verified(store.read_record(rel), store.record_location(rel)))
    return sorted(out, key=lambda v: v.created_at)


def write_candidate(store: ArtifactStore, version: CalibrationVersion) -> tuple[CalibrationVersion, bool]:
    """Write a new candidate record; an existing version with that id (same content) is returned unchanged.

    Returns:
        (the record, whether it is new).
    """
    existing = store.read_record(_path(version.version))
    # A record without a seal (an older edgeq's) is written anew as a candidate: its approval cannot be trusted.
    if existing is not None and existing.get("content_sha256"):
        return _verified(existing, store.record_location(_path(version.version))), False
    version = version.model_copy(update={"content_sha256": version.content_hash()})
    store.write_record(_path(version.version), version.model_dump(mode="json"))
    return version, True


def set_review(store: ArtifactStore, version: str, review: Review) -> CalibrationVersion:
    """Note where the version waits for review (the paused flow run); only a candidate's review changes."""
    v = load_version(store, version)
    if v.status != "candidate":
        return v
    v = v.model_copy(update={"review": review})
    store.write_record(_path(version), v.model_dump(mode="json"))
    return v


def record_decision(store: ArtifactStore, version: str, approve: bool, reviewer: str, comment: str = "",
                    via: str = "") -> CalibrationVersion:
    """Write the review decision atomically; a decided version refuses any other decision.

    Giving the same decision twice (the CLI and the resumed flow both writing it) returns the record as is.
    """
    if not reviewer.strip():
        raise CalibrationError("a review needs a reviewer name (--reviewer NAME)")
    v = load_version(store, version)
    status = "approved" if approve else "rejected"
    if v.decision is not None:
        d = v.decision
        if d.status == status and d.reviewer == reviewer and d.comment == comment:
            return v
        raise CalibrationError(
            f"calibration version {version} was already {d.status} by {d.reviewer} at {d.decided_at}; "
            f"a decision is final: build a new version (`edgeq calibrate CONFIG`) instead of "
            f"{'approving' if approve else 'rejecting'} this one"
        )
    decision = Decision(status=status, reviewer=reviewer, comment=comment, decided_at=now(), via=via,
                        candidate_sha256=v.content_sha256)
    decision = decision.model_copy(update={"sha256": _decision_hash(decision)})
    v = v.model_copy(update={"status": status, "decision": decision})
    store.write_record(_path(version), v.model_dump(mode="json"))
    return v


def get_approved(store: ArtifactStore, version: str = "latest", model: str | None = None) -> CalibrationVersion:
    """An approved version by id, or the latest approved one (for `model` when given).

    Raises:
        NotApproved: the version is a candidate or was rejected.
        VersionNotFound: no such version, or no approved version for the model.
    """
    if version == "latest":
        approved = [v for v in list_versions(store) if v.status == "approved" and (model is None or v.model == model)]
        if not approved:
            raise VersionNotFound(
                f"no approved calibration version{f' for model {model!r}' if model else ''} in store {store.root}; "
                f"build one (`edgeq calibrate CONFIG`) and approve it (`edgeq calibration review VERSION --approve`)"
            )
        return max(approved, key=lambda v: v.decision.decided_at)
    v = load_version(store, version)
    if v.status != "approved":
        why = (f"was rejected by {v.decision.reviewer} at {v.decision.decided_at}" if v.status == "rejected"
               else "is a candidate awaiting review")
        raise NotApproved(
            f"calibration version {version} {why}; quantization uses approved versions only "
            f"(`edgeq calibration review {version} --approve --reviewer NAME`)"
        )
    if model is not None and v.model != model:
        raise NotApproved(f"calibration version {version} was built for model {v.model!r}, not {model!r}")
    return v
