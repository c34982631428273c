"""The calibration-set steps as Prefect tasks, over plain functions that tests call directly.

Each step reads its input table/arrays from the store and writes its output there, passing
only `PoolState` (artifact references) between tasks; cache keys are the inputs' sha256.

Two kinds of capture pools (`edgeq.calibration.ingest.is_image_model`). A one-input image model's keeps the image
filters: pixel hash, perceptual near-duplicates, flips/crops/jitters of training images. Any other model's captures
(token ids and masks, audio frames, tabular rows, several inputs per sample) are compared by exact content identity
over all of a sample's inputs (`batch_content_ids`) for duplicates and train/test leakage; the perceptual and
flip/crop rules do not apply to them (the report says so); augmentation flags apply to both.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from edgeq.calibration.ingest import (
    array_to_npy,
    ingest_captures,
    ingest_input_captures,
    is_image_model,
    open_npy,
    read_parquet_bytes,
    table_to_parquet,
)
from edgeq.calibration.report import (
    CoverageReport,
    coverage_markdown,
    coverage_report,
    histogram_png,
    inputs_coverage_report,
    inputs_histogram_png,
)
from edgeq.calibration.select import (
    dedupe,
    exclude_leakage,
    read_manifest_hashes,
    reject_augmented,
    stratified_sample,
    usable,
)
from edgeq.calibration.versions import CalibrationVersion, VersionInput, version_id, write_candidate
from edgeq.calibration.versions import now as utc_now
from edgeq.core.data import (
    CONTENT_ID_SCHEME,
    Batch,
    content_ids,
    input_preprocess,
    load_raw,
    load_raw_inputs,
    preprocess,
    preprocess_inputs,
    split_batch_content_ids,
    split_content_ids,
    take,
    to_model_layout,
    to_raw,
)
from edgeq.core.errors import CalibrationError, SpecError
from edgeq.core.specs import CaptureSpec, EdgeqConfig, Preprocess
from edgeq.core.store import ArtifactRef, ArtifactStore, sha256_file, sha256_json
from edgeq.tasks.artifacts import UIProgress, display_rows, image_markdown
from edgeq.tasks.caching import content_key, retry_transient, split_fingerprint


class PoolState(BaseModel):
    """The capture pool after a step: the table (with exclusion reasons) and the usable samples of every input.

    `arrays` maps each model input to its usable raw samples (row ``pixel_index`` of the table); an image pool holds
    one input, its decoded pixels.
    """

    table: ArtifactRef
    arrays: dict[str, ArtifactRef]
    usable: int
    excluded: dict[str, int]

    @property
    def pixels(self) -> ArtifactRef:
        """The samples of a one-input (image) pool."""
        if len(self.arrays) != 1:
            raise ValueError(f"the pool holds inputs {list(self.arrays)}: read .arrays[name]")
        return next(iter(self.arrays.values()))

    def refs(self) -> list[ArtifactRef]:
        return [self.table, *self.arrays.values()]


class Selection(BaseModel):
    rows: list[int]
    target_size: int
    min_size: int
    override_reason: str | None = None
    notes: list[str]


class Candidate(BaseModel):
    version: CalibrationVersion
    markdown: str
    report: CoverageReport
    new: bool


# -- helpers ---------------------------------------------------------------------------------------

def capture_spec(cfg: EdgeqConfig) -> CaptureSpec:
    if cfg.data.captures is None:
        raise SpecError("the config has no data.captures (path, metadata, strata): nothing to calibrate from")
    return cfg.data.captures


def captures_fingerprint(spec: CaptureSpec) -> str:
    """Content hash of the captures and their metadata (what the version's id calls its source)."""
    meta = sha256_file(spec.metadata) if spec.metadata.is_file() else f"missing:{spec.metadata}"
    if spec.path.is_dir():
        files = sorted(p for p in spec.path.rglob("*") if p.is_file())
        data: Any = [(str(p.relative_to(spec.path)), sha256_file(p)) for p in files]
    else:
        data = sha256_file(spec.path) if spec.path.is_file() else f"missing:{spec.path}"
    return sha256_json({"metadata": meta, "data": data})


def _state(store: ArtifactStore, table: pd.DataFrame, arrays: dict[str, ArtifactRef]) -> PoolState:
    ref = store.put_bytes(table_to_parquet(table), "pool.parquet")
    ex = table.loc[table["excluded"] != "", "excluded"].value_counts().to_dict()
    return PoolState(table=ref, arrays=dict(arrays), usable=int(usable(table).sum()),
                     excluded={str(k): int(v) for k, v in ex.items()})


def load_pool(store: ArtifactStore, state: PoolState) -> tuple[pd.DataFrame, Batch]:
    """The pool table and every input's usable samples (memory-mapped)."""
    return (read_parquet_bytes(store.read_bytes(state.table)),
            {name: open_npy(store.local_path(ref)) for name, ref in state.arrays.items()})


def load_state(store: ArtifactStore, state: PoolState) -> tuple[pd.DataFrame, np.ndarray]:
    """The pool table and the pixels of a one-input (image) pool."""
    return read_parquet_bytes(store.read_bytes(state.table)), open_npy(store.local_path(state.pixels))


def image_pool(cfg: EdgeqConfig) -> bool:
    """The model takes one image input: its captures get the image filters (see the module's docstring)."""
    return is_image_model(cfg.model.inputs)


def image_preprocess(cfg: EdgeqConfig) -> Preprocess:
    """The preprocessing of an image pool's input: its own (`inputs[0].preprocess`), else data.preprocess."""
    return input_preprocess(cfg.model.inputs[0], cfg.data.preprocess)


_NOT_IMAGE_NOTE = ("captures are not images (model inputs {names}): duplicates and train/test leakage are found by "
                   "exact content over every input of a sample; perceptual near-duplicates and flips/crops/jitters of "
                   "training samples do not apply and were not checked")


@contextmanager
def rich_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on a terminal; nothing elsewhere (logs, tests)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        tid = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(tid, completed=done, total=total)


def _leakage_notes(cfg: EdgeqConfig, manifest_check: str) -> list[str]:
    """What the training-set leakage filter could not check, for the coverage report: nothing with a training
    split; with only a training manifest, `manifest_check` says what it was checked against."""
    if cfg.data.train is not None:
        return []
    if cfg.data.train_manifest is None:
        return ["no training manifest or split: training-set leakage was not checked"]
    return [f"no training split in the config: training-set leakage was checked against {manifest_check}"]


def _train_raw(cfg: EdgeqConfig) -> np.ndarray | None:
    """The training split's raw values in the model's layout (augmentation filter, report).

    A split stored as the model's input (``preprocessed: true``) is taken back through data.preprocess, so
    flips and crops of training images are still compared with raw captures.
    """
    src = cfg.data.train
    if src is None:
        return None
    raw = to_model_layout(load_raw(src)[0], cfg.model.inputs[0], "data.train")
    return to_raw(raw, image_preprocess(cfg)) if src.preprocessed else raw


def _split_identity(cfg: EdgeqConfig, which: str) -> tuple[set[str], set[str]]:
    """(hashes listed in the split's manifest, content ids of the split's samples when the config names it).

    A manifest lists pixel hashes of samples as they were stored (for captures that are not images: content ids,
    `batch_content_ids`); the split itself is compared by content identity, which does not depend on its dtype,
    scaling or layout, and covers every input of a sample.
    """
    manifest = getattr(cfg.data, f"{which}_manifest")
    hashes = read_manifest_hashes(manifest) if manifest is not None else set()
    src = getattr(cfg.data, which)
    if src is None:
        return hashes, set()
    if image_pool(cfg):
        return hashes, set(split_content_ids(src, image_preprocess(cfg), cfg.model.inputs[0], f"data.{which}"))
    return hashes, set(split_batch_content_ids(src, cfg.model.inputs, cfg.data.preprocess, f"data.{which}"))


def _capture_ids(cfg: EdgeqConfig, table: pd.DataFrame, pixels: np.ndarray | None) -> list[str]:
    """The content id of each pool row ("" for a row without usable samples).

    Image pools: computed from the pixels; other pools hold it already (``sha256``, over every input).
    """
    ok = table["pixel_index"].to_numpy() >= 0
    if not image_pool(cfg):
        return [h if k else "" for h, k in zip(table["sha256"].astype(str), ok)]
    ids = content_ids(pixels, image_preprocess(cfg), cfg.model.inputs[0], what="the capture pool (data.captures)")
    return [ids[i] if i >= 0 else "" for i in table["pixel_index"].to_numpy()]


# -- steps as plain functions --------------------------------------------------------------------------

def ingest_to_store(cfg: EdgeqConfig, store: ArtifactStore, progress=None) -> PoolState:
    """Step 1: read and hash every capture; unreadable and non-finite ones are listed and skipped.

    A capture file that does not fit the model's inputs (a missing input, ragged arrays, float values for an integer
    input, another sample shape) raises SpecError before anything is written to the store.
    """
    spec, inputs = capture_spec(cfg), cfg.model.inputs
    if image_pool(cfg):
        table, pixels = ingest_captures(spec, progress, input_name=inputs[0].name)
        arrays = {inputs[0].name: pixels}
    else:
        table, arrays = ingest_input_captures(spec, inputs, cfg.data.preprocess, progress)
    if not int((table["pixel_index"] >= 0).sum()):
        raise CalibrationError(
            f"none of the {len(table)} captures in {spec.metadata} is usable: "
            + "; ".join(f"{r.capture_id}: {r.detail}" for r in table.head(3).itertuples())
        )
    if image_pool(cfg):
        refs = {inputs[0].name: store.put_bytes(array_to_npy(arrays[inputs[0].name]), "pixels.npy")}
    else:
        refs = {i.name: store.put_bytes(array_to_npy(arrays[i.name]), f"pool-{i.name}.npy") for i in inputs}
    return _state(store, table, refs)


def dedupe_in_store(cfg: EdgeqConfig, store: ArtifactStore, state: PoolState) -> PoolState:
    """Step 2: exact duplicates (image pools: same pixels; others: same content in every input), and near
    duplicates of images."""
    if not image_pool(cfg):
        table, _ = load_pool(store, state)
        return _state(store, dedupe(table, None, near=False), state.arrays)
    table, pixels = load_state(store, state)
    return _state(store, dedupe(table, pixels), state.arrays)


def exclude_leakage_in_store(cfg: EdgeqConfig, store: ArtifactStore, state: PoolState) -> PoolState:
    """Step 3: anything in the training or the test set; a pool left empty by it is an error."""
    table, arrays = load_pool(store, state)
    pixels = next(iter(arrays.values())) if image_pool(cfg) else None
    (train_hashes, train_ids), (test_hashes, test_ids) = _split_identity(cfg, "train"), _split_identity(cfg, "test")
    out = exclude_leakage(table, train_hashes, test_hashes, content_ids=_capture_ids(cfg, table, pixels),
                          train_ids=train_ids, test_ids=test_ids)
    before, after = int(usable(table).sum()), int(usable(out).sum())
    if before and not after:
        n_train = int((out["excluded"] == "in-train").sum())
        n_test = int((out["excluded"] == "in-test").sum())
        raise CalibrationError(
            f"all {before} usable captures in {capture_spec(cfg).metadata} are already in the training set "
            f"({n_train}) or the test set ({n_test}) by content; calibrate on production captures the model "
            f"was not trained or tested on"
        )
    return _state(store, out, state.arrays)


def reject_augmented_in_store(cfg: EdgeqConfig, store: ArtifactStore, state: PoolState) -> PoolState:
    """Step 4: rows flagged augmented, and (image pools) flips/crops/jitters of training images."""
    if not image_pool(cfg):
        table, _ = load_pool(store, state)
        return _state(store, reject_augmented(table, None, None), state.arrays)
    table, pixels = load_state(store, state)
    return _state(store, reject_augmented(table, pixels, _train_raw(cfg)), state.arrays)


def select_sample(cfg: EdgeqConfig, store: ArtifactStore, state: PoolState, target_size: int | None = None,
                  min_size: int | None = None, override_reason: str | None = None) -> Selection:
    """Step 5: stratified sample; fewer than `min_size` usable captures fail unless overridden with a reason."""
    spec = capture_spec(cfg)
    target = target_size or spec.target_size
    minimum = min_size or spec.min_size
    reason = (override_reason if override_reason is not None else spec.min_size_override) or None
    table = read_parquet_bytes(store.read_bytes(state.table))
    n = int(usable(table).sum())
    excluded = ", ".join(f"{v} {k}" for k, v in sorted(state.excluded.items())) or "none"
    if n == 0:
        raise CalibrationError(f"no usable captures left of {len(table)} (excluded: {excluded})")
    if n < minimum and not (reason and reason.strip()):
        raise CalibrationError(
            f"only {n} usable captures (pool {len(table)}; excluded: {excluded}), below the minimum of {minimum}; "
            f"add captures, or accept {n} with a reason: data.captures.min_size_override or --override-reason TEXT"
        )
    rows = stratified_sample(table, spec.strata, target, spec.seed)
    notes = []
    if n <= target:
        notes.append(f"pool smaller than the target: using all {n} usable captures (target {target})")
    if n < minimum:
        notes.append(f"{n} samples, below the minimum {minimum}: accepted by override ({reason.strip()})")
    return Selection(rows=[int(r) for r in rows], target_size=target, min_size=minimum,
                     override_reason=reason.strip() if n < minimum else None, notes=notes)


def build_candidate(cfg: EdgeqConfig, store: ArtifactStore, state: PoolState, selection: Selection) -> Candidate:
    """Steps 6-7: coverage report, then the immutable candidate version (record written last)."""
    if not image_pool(cfg):
        return _build_inputs_candidate(cfg, store, state, selection)
    spec = capture_spec(cfg)
    table, pixels = load_state(store, state)
    rows = np.asarray(selection.rows, dtype=int)
    raw = np.asarray(pixels[table["pixel_index"].to_numpy()[rows]])
    x = preprocess(raw, image_preprocess(cfg))
    if not np.isfinite(x).all():
        raise CalibrationError("preprocessing (data.preprocess) turns selected captures into NaN/Inf; check std/scale")
    inp = cfg.model.inputs[0]
    want = [d for d in inp.shape[1:]]
    if len(want) != x.ndim - 1 or any(isinstance(w, int) and w != g for w, g in zip(want, x.shape[1:])):
        raise CalibrationError(
            f"captures are {list(x.shape[1:])} per sample but model input {inp.name!r} expects {inp.shape[1:]} "
            f"(after the batch axis); resize the captures or fix model.inputs"
        )
    train_raw = _train_raw(cfg)
    train_x = preprocess(train_raw, image_preprocess(cfg)) if train_raw is not None else None
    notes = list(selection.notes)
    if cfg.data.train is None:
        notes.append("no training split in the config: flips/crops/jitters of training images were not checked")
    notes += _leakage_notes(cfg, "the pixel hashes of data.train_manifest only, which miss a copy stored in another "
                                 "dtype or layout")
    report = coverage_report(table, rows, spec.strata, selection.target_size, selection.min_size, x, train_x,
                             spec.expected_strata, notes)

    manifest = table.iloc[rows].drop(columns=["pixel_index", "excluded", "detail", "augmented_flag"])
    manifest.insert(0, "sample", np.arange(len(rows)))
    pp = image_preprocess(cfg).model_dump(mode="json")
    source = {"captures": captures_fingerprint(spec), "model": cfg.model.name, "strata": spec.strata}
    vid = version_id(manifest["sha256"].tolist(), pp, source)
    png = histogram_png(x, train_x)
    artifacts = {
        "samples": store.put_bytes(array_to_npy(x), "samples.npy"),
        "manifest": store.put_bytes(table_to_parquet(manifest.reset_index(drop=True)), "manifest.parquet"),
        "pool_table": state.table,
        "histogram": store.put_bytes(png, "histogram.png"),
    }
    excluded_rows = table[table["excluded"] != ""]
    # The picture itself, not its store path: the report is the review form's description, and no browser opens a
    # file:// path (or an s3:// one) from the Prefect UI.
    md = coverage_markdown(report, vid, excluded_rows) + "\n\n" + image_markdown(
        png, "intensity histogram of the calibration set and the training set")
    artifacts["report"] = store.put_bytes(md.encode(), "report.md")
    version = CalibrationVersion(
        version=vid, created_at=utc_now(), model=cfg.model.name, input_name=inp.name,
        sample_shape=list(x.shape[1:]), size=len(rows),
        source={**source, "captures_path": str(spec.path), "metadata_path": str(spec.metadata)},
        preprocess=pp, strata=spec.strata, target_size=selection.target_size, min_size=selection.min_size,
        override_reason=selection.override_reason, notes=notes, pool_rows=report.pool_rows, usable=report.usable,
        excluded=report.excluded, coverage=report.summary(), artifacts=artifacts,
        inputs=[VersionInput(name=inp.name, dtype=str(x.dtype), shape=list(x.shape[1:]), artifact="samples",
                             preprocess=pp)])
    written, new = write_candidate(store, version)
    return Candidate(version=written, markdown=md, report=report, new=new)


def _train_inputs(cfg: EdgeqConfig) -> Batch | None:
    """The training split as the model takes it, every input (report statistics of captures that are not images)."""
    src = cfg.data.train
    if src is None:
        return None
    raw, _ = load_raw_inputs(src, cfg.model.inputs)
    return preprocess_inputs(raw, cfg.model.inputs, cfg.data.preprocess, preprocessed=src.preprocessed,
                             what="data.train")


def _build_inputs_candidate(cfg: EdgeqConfig, store: ArtifactStore, state: PoolState,
                            selection: Selection) -> Candidate:
    """`build_candidate` for captures that are not one image input: every input is stored, each as the model takes
    it (float inputs preprocessed, integer inputs in their declared dtype), and the record lists them."""
    spec, inputs, pp = capture_spec(cfg), cfg.model.inputs, cfg.data.preprocess
    table, arrays = load_pool(store, state)
    rows = np.asarray(selection.rows, dtype=int)
    raw = take(arrays, table["pixel_index"].to_numpy()[rows])
    x = preprocess_inputs(raw, inputs, pp, what="the capture pool (data.captures)")
    bad = [i.name for i in inputs if i.is_float and not np.isfinite(x[i.name]).all()]
    if bad:
        raise CalibrationError(f"preprocessing turns selected captures of input(s) {bad} into NaN/Inf; check "
                               f"std/scale of data.preprocess or the inputs' own preprocess")
    train_x = _train_inputs(cfg)
    names = [i.name for i in inputs]
    notes = list(selection.notes) + [_NOT_IMAGE_NOTE.format(names=names)]
    notes += _leakage_notes(cfg, "the content ids listed in data.train_manifest only")
    report = inputs_coverage_report(table, rows, spec.strata, selection.target_size, selection.min_size, x, train_x,
                                    inputs, spec.expected_strata, notes)

    manifest = table.iloc[rows].drop(columns=["pixel_index", "excluded", "detail", "augmented_flag"])
    manifest.insert(0, "sample", np.arange(len(rows)))
    pp_json = pp.model_dump(mode="json")
    source = {"captures": captures_fingerprint(spec), "model": cfg.model.name, "strata": spec.strata,
              "inputs": [i.model_dump(mode="json") for i in inputs]}
    vid = version_id(manifest["sha256"].tolist(), pp_json, source)
    one = len(inputs) == 1
    records = []
    artifacts: dict[str, ArtifactRef] = {}
    for i in inputs:
        key = "samples" if one else f"samples:{i.name}"
        artifacts[key] = store.put_bytes(array_to_npy(x[i.name]), f"samples-{i.name}.npy")
        own = input_preprocess(i, pp)
        records.append(VersionInput(name=i.name, dtype=str(x[i.name].dtype), shape=list(x[i.name].shape[1:]),
                                    artifact=key, preprocess=None if own is None else own.model_dump(mode="json")))
    png = inputs_histogram_png(report, x, train_x, inputs)
    artifacts.update({
        "manifest": store.put_bytes(table_to_parquet(manifest.reset_index(drop=True)), "manifest.parquet"),
        "pool_table": state.table,
        "histogram": store.put_bytes(png, "histogram.png"),
    })
    excluded_rows = table[table["excluded"] != ""]
    what = (f"sequence lengths (from {report.length_input}) and values of the calibration set and the training set"
            if report.length_input else "values of the calibration set and the training set")
    md = coverage_markdown(report, vid, excluded_rows) + "\n\n" + image_markdown(png, what)
    artifacts["report"] = store.put_bytes(md.encode(), "report.md")
    version = CalibrationVersion(
        version=vid, created_at=utc_now(), model=cfg.model.name, input_name=inputs[0].name,
        sample_shape=records[0].shape, size=len(rows),
        source={**source, "captures_path": str(spec.path), "metadata_path": str(spec.metadata)},
        preprocess=pp_json, strata=spec.strata, target_size=selection.target_size, min_size=selection.min_size,
        override_reason=selection.override_reason, notes=notes, pool_rows=report.pool_rows, usable=report.usable,
        excluded=report.excluded, coverage=report.summary(), artifacts=artifacts, inputs=records)
    written, new = write_candidate(store, version)
    return Candidate(version=written, markdown=md, report=report, new=new)


def publish_report(candidate: Candidate) -> None:
    """The coverage report as markdown and table artifacts in the Prefect UI."""
    v = candidate.version
    create_markdown_artifact(markdown=candidate.markdown, key="calibration-report",
                             description=f"calibration set {v.version} ({v.status})")
    create_table_artifact(table=display_rows(r.model_dump() for r in candidate.report.rows) or [{"strata": "none"}],
                          key="calibration-strata", description=f"strata coverage of {v.version}: pool vs selection")


# -- Prefect tasks -----------------------------------------------------------------------------------

def _key(stage: str, cfg: EdgeqConfig, *states: PoolState, **extra: Any) -> str:
    # The model's inputs and preprocessing decide how captures are read, identified and filtered.
    return content_key(stage, store=cfg.store_url, inputs=["".join(r.sha256 for r in s.refs()) for s in states],
                       captures=cfg.data.captures.model_dump(mode="json") if cfg.data.captures else None,
                       pool="named-inputs-v1", model_inputs=[i.model_dump(mode="json") for i in cfg.model.inputs],
                       preprocess=cfg.data.preprocess.model_dump(mode="json"), **extra)


_TASK = dict(persist_result=True, retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)


@task(name="calibration-ingest",
      cache_key_fn=lambda ctx, p: _key("calibration-ingest", p["cfg"], source=captures_fingerprint(capture_spec(p["cfg"]))),
      **_TASK)
def ingest_task(cfg: EdgeqConfig) -> PoolState:
    ui = UIProgress("calibration-ingest", "reading and hashing the capture pool")
    with rich_progress("ingest + hash captures") as bar:
        def progress(done: int, total: int) -> None:
            bar(done, total)
            ui.update(100.0 * done / max(total, 1), f"{done} of {total} captures read and hashed", force=done >= total)

        return ingest_to_store(cfg, ArtifactStore(cfg.store_url), progress)


@task(name="calibration-dedupe", cache_key_fn=lambda ctx, p: _key("calibration-dedupe", p["cfg"], p["state"]), **_TASK)
def dedupe_task(cfg: EdgeqConfig, state: PoolState) -> PoolState:
    return dedupe_in_store(cfg, ArtifactStore(cfg.store_url), state)


def _split_key(cfg: EdgeqConfig) -> Any:
    files = [cfg.data.train_manifest, cfg.data.test_manifest]
    # Content ids also depend on the model's input shape and the preprocessing.
    identity = [CONTENT_ID_SCHEME, [i.model_dump(mode="json") for i in cfg.model.inputs],
                cfg.data.preprocess.model_dump(mode="json")]
    return [split_fingerprint(cfg.data.train), split_fingerprint(cfg.data.test),
            [sha256_file(f) if f is not None and Path(f).is_file() else str(f) for f in files], identity]


@task(name="calibration-exclude-leakage",
      cache_key_fn=lambda ctx, p: _key("calibration-leakage", p["cfg"], p["state"], splits=_split_key(p["cfg"])),
      **_TASK)
def leakage_task(cfg: EdgeqConfig, state: PoolState) -> PoolState:
    return exclude_leakage_in_store(cfg, ArtifactStore(cfg.store_url), state)


@task(name="calibration-reject-augmented",
      cache_key_fn=lambda ctx, p: _key("calibration-augmented", p["cfg"], p["state"], splits=_split_key(p["cfg"])),
      **_TASK)
def augmentation_task(cfg: EdgeqConfig, state: PoolState) -> PoolState:
    return reject_augmented_in_store(cfg, ArtifactStore(cfg.store_url), state)


@task(name="calibration-stratified-sample",
      cache_key_fn=lambda ctx, p: _key("calibration-sample", p["cfg"], p["state"], target_size=p["target_size"],
                                       min_size=p["min_size"], override_reason=p["override_reason"]),
      **_TASK)
def sample_task(cfg: EdgeqConfig, state: PoolState, target_size: int | None, min_size: int | None,
                override_reason: str | None) -> Selection:
    return select_sample(cfg, ArtifactStore(cfg.store_url), state, target_size, min_size, override_reason)


# The candidate's coverage report and notes also read the training split and data.train_manifest (`_split_key`).
# A cache hit returns the version as it was built: the flow reloads its record, whose review status may have moved.
@task(name="calibration-candidate-version",
      cache_key_fn=lambda ctx, p: _key("calibration-candidate", p["cfg"], p["state"], splits=_split_key(p["cfg"]),
                                       selection=p["selection"].model_dump(mode="json"), model=p["cfg"].model.name),
      **_TASK)
def candidate_task(cfg: EdgeqConfig, state: PoolState, selection: Selection) -> Candidate:
    candidate = build_candidate(cfg, ArtifactStore(cfg.store_url), state, selection)
    publish_report(candidate)
    return candidate


def build_calibration_candidate(cfg: EdgeqConfig, target_size: int | None = None, min_size: int | None = None,
                                override_reason: str | None = None) -> Candidate:
    """All steps up to the candidate version, without Prefect (tests, scripts)."""
    store = ArtifactStore(cfg.store_url)
    state = ingest_to_store(cfg, store)
    state = dedupe_in_store(cfg, store, state)
    state = exclude_leakage_in_store(cfg, store, state)
    state = reject_augmented_in_store(cfg, store, state)
    selection = select_sample(cfg, store, state, target_size, min_size, override_reason)
    return build_candidate(cfg, store, state, selection)
