"""Calibration for a model that is not one image input: token ids + attention mask, and tabular rows.

Real files, the real steps (`build_calibration_candidate`, and the flow once): captures are compared by exact content
over every input of a sample, no perceptual rule, and the approved version stores and feeds every input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.calibration.cal_helpers import load_cfg, records
from tests.multi_input_models import SEQ, TinyEncoder, save_weights, token_config, write_token_splits

NAMES = ["input_ids", "attention_mask"]


def _write_config(folder: Path, paths: dict[str, Path], captures: Path, metadata: Path, **captures_kw) -> Path:
    weights = folder / "weights.safetensors"
    if not weights.is_file():
        save_weights(TinyEncoder(), weights)
    cfg = token_config(folder, weights, paths)
    cfg["data"]["captures"] = {"path": str(captures), "metadata": str(metadata), "strata": ["source", "length"],
                               "min_size": 10, **captures_kw}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pool(paths: dict[str, Path]) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    with np.load(paths["captures"]) as z:
        arrays = {k: z[k] for k in z.keys()}
    return arrays, pd.read_csv(paths["metadata"])


def _write_pool(folder: Path, arrays: dict[str, np.ndarray], meta: pd.DataFrame) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "captures.npz", **arrays)
    meta.to_csv(folder / "metadata.csv", index=False)
    return folder / "captures.npz", folder / "metadata.csv"


def _build(cfg, **kw):
    from edgeq.tasks.calibration import build_calibration_candidate

    return build_calibration_candidate(cfg, **kw)


def _manifest(cfg, version) -> pd.DataFrame:
    from edgeq.calibration.ingest import read_parquet_bytes
    from edgeq.core.store import ArtifactStore

    return read_parquet_bytes(ArtifactStore(cfg.store_url).read_bytes(version.artifacts["manifest"]))


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, Path]:
    return write_token_splits(tmp_path_factory.mktemp("tokens") / "data")


@pytest.fixture(scope="module")
def distinct(tmp_path_factory, splits):
    """The candidate built from the pool of 80 distinct sequences as written (augmented_column: null)."""
    folder = tmp_path_factory.mktemp("distinct")
    cfg = load_cfg(_write_config(folder, splits, splits["captures"], splits["metadata"], augmented_column=None))
    return cfg, _build(cfg)


def test_a_pool_of_distinct_token_sequences_keeps_all_of_them(distinct, splits):
    cfg, cand = distinct
    n = len(_pool(splits)[1])
    v = cand.version
    assert (v.pool_rows, v.usable, v.size) == (n, n, n) == (80, 80, 80)
    assert v.excluded == {}  # no "near-duplicate": no perceptual hash on token arrays
    assert any("perceptual near-duplicates and flips/crops/jitters of training samples do not apply" in note
               for note in v.notes)
    assert "do not apply" in cand.markdown


def test_the_report_fits_token_data(distinct, splits):
    cfg, cand = distinct
    rep = cand.report
    assert rep.kind == "inputs" and rep.length_input == "attention_mask"
    arrays, meta = _pool(splits)
    lengths = arrays["attention_mask"].sum(1)
    cal = next(r for r in rep.lengths if r["set"] == "calibration")
    assert (cal["min"], cal["max"], cal["samples"]) == (int(lengths.min()), int(lengths.max()), 80)
    assert {r["set"] for r in rep.lengths} == {"calibration", "train"}
    assert abs(sum(r["calibration"] for r in rep.histogram) - 1) < 1e-3
    ids = next(r for r in rep.stats if r["input"] == "input_ids" and r["set"] == "calibration")
    assert ids["distinct"] == len(np.unique(arrays["input_ids"])) and ids["dtype"] == "int64"
    assert "## Sequence lengths (from `attention_mask`)" in cand.markdown
    assert "Preprocessed intensity" not in cand.markdown
    assert rep.joint_strata_covered == rep.joint_strata_usable == len(meta.groupby(["source", "length"]))


def test_planted_duplicates_and_train_test_copies_are_removed(tmp_path, splits):
    arrays, meta = _pool(splits)
    with np.load(splits["train"]) as z:
        train = {k: z[k] for k in NAMES}
    with np.load(splits["test"]) as z:
        test = {k: z[k] for k in NAMES}
    n = len(meta)
    # Row n: the same ids AND mask as capture 0 (a duplicate). Row n+1: capture 1's ids with another mask (its last
    # real token masked out): not the same sample. Rows n+2, n+3: copies of training sample 5 and test sample 9.
    # Row n+4: a distinct new sequence flagged augmented in the metadata.
    other_mask = arrays["attention_mask"][1].copy()
    other_mask[other_mask.sum() - 1] = 0
    new_ids = np.zeros(SEQ, np.int64)
    new_ids[:4] = [3, 3, 3, 3]
    new_mask = (new_ids > 0).astype(np.int64)
    planted = {
        "input_ids": [arrays["input_ids"][0], arrays["input_ids"][1], train["input_ids"][5], test["input_ids"][9],
                      new_ids],
        "attention_mask": [arrays["attention_mask"][0], other_mask, train["attention_mask"][5],
                           test["attention_mask"][9], new_mask],
    }
    # Stored as int32: identity is by value (int64), so copies still match the int64 splits.
    pool = {k: np.concatenate([arrays[k], np.stack(planted[k])]).astype(np.int32) for k in NAMES}
    rows = pd.DataFrame({"capture_id": [f"p{i}" for i in range(5)], "index": np.arange(n, n + 5),
                         "source": "s0", "length": "short"})
    meta = pd.concat([meta, rows], ignore_index=True)
    meta["augmented"] = [False] * (n + 4) + [True]
    cap, md = _write_pool(tmp_path / "captures", pool, meta)
    cfg = load_cfg(_write_config(tmp_path, splits, cap, md))
    cand = _build(cfg)
    v = cand.version
    assert v.excluded == {"duplicate": 1, "in-train": 1, "in-test": 1, "augmented-flag": 1}
    assert v.size == n + 1  # every distinct capture, and the one equal on input_ids only
    table = pd.DataFrame(_manifest(cfg, v))
    assert "p1" in set(table["capture_id"]) and "p0" not in set(table["capture_id"])
    assert not {"p2", "p3", "p4"} & set(table["capture_id"])
    assert "| p0 | duplicate | same content (every input) as c0000 |" in cand.markdown
    assert "| p2 | in-train | same model input as a sample of data.train |" in cand.markdown
    assert "| p3 | in-test | same model input as a sample of data.test |" in cand.markdown
    assert "| p4 | augmented-flag |" in cand.markdown


def _approve(cfg, vid):
    from edgeq.calibration.versions import record_decision
    from edgeq.core.store import ArtifactStore

    return record_decision(ArtifactStore(cfg.store_url), vid, True, "tester", "token pool")


def _two_input_onnx(path: Path) -> Path:
    """emb = (float(ids) * float(mask)) @ W: quantized through a reader that must feed both int64 inputs."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [SEQ, 4], np.random.default_rng(0).normal(size=SEQ * 4).tolist())
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["idsf"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["idsf", "maskf"], ["masked"]),
         helper.make_node("MatMul", ["masked", "w"], ["embedding"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, SEQ]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, SEQ])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_the_approved_version_stores_and_feeds_every_input(distinct, splits, tmp_path):
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgeq.calibration import open_calibration
    from edgeq.calibration.versions import load_version
    from edgeq.core.store import ArtifactStore

    cfg, cand = distinct
    vid = cand.version.version
    rec = load_version(ArtifactStore(cfg.store_url), vid)
    assert [(i.name, i.dtype, i.shape, i.preprocess) for i in rec.inputs] == [
        ("input_ids", "int64", [SEQ], None), ("attention_mask", "int64", [SEQ], None)]
    assert rec.input_names == NAMES and "samples" not in rec.artifacts
    _approve(cfg, vid)

    reader = open_calibration(cfg.store_url, "latest", model=cfg.model.name)
    assert reader.names == NAMES and len(reader) == 80
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == 80
    assert {k: (v.shape, v.dtype) for k, v in feeds[0].items()} == {"input_ids": ((1, SEQ), np.int64),
                                                                      "attention_mask": ((1, SEQ), np.int64)}
    # Sample i is the manifest's row i: the captured ids and mask, unchanged.
    arrays, meta = _pool(splits)
    index = dict(zip(meta["capture_id"], meta["index"]))
    order = [index[c] for c in _manifest(cfg, rec)["capture_id"]]
    for k in NAMES:
        np.testing.assert_array_equal(np.concatenate([f[k] for f in feeds]), arrays[k][order])
    # The stored samples have the captures' identities (what validation compares with the test split).
    from edgeq.calibration.readers import version_content_ids

    ids = version_content_ids(ArtifactStore(cfg.store_url), rec, cfg.model.inputs, cfg.data.preprocess)
    assert ids == _manifest(cfg, rec)["sha256"].tolist()
    # What quantization asks for (tasks/quantize: the first input's name and dtype) still feeds both inputs.
    again = open_calibration(cfg.store_url, vid, input_name="input_ids", dtype="int64")
    assert again.names == NAMES and set(next(iter(again))) == set(NAMES)

    src = _two_input_onnx(tmp_path / "m.onnx")
    reader.rewind()
    quantize_static(str(src), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"])
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}


def _store_files(cfg) -> list[Path]:
    root = Path(cfg.store_url)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_captures_lacking_an_input_are_refused_and_the_store_is_unchanged(tmp_path, splits):
    from edgeq.core.errors import SpecError

    arrays, meta = _pool(splits)
    cap, md = _write_pool(tmp_path / "captures", {"input_ids": arrays["input_ids"]}, meta)
    cfg = load_cfg(_write_config(tmp_path, splits, cap, md, augmented_column=None))
    before = _store_files(cfg)
    with pytest.raises(SpecError, match=r"has no array for model input\(s\) \['attention_mask'\] \(it holds "
                                        r"\['input_ids'\]\)"):
        _build(cfg)
    assert records(cfg) == [] and _store_files(cfg) == before


@pytest.mark.parametrize("fault, message", [
    ("float ids", r"input 'input_ids' is declared int64 but the data holds float32 values"),
    ("short mask", r"inputs that share the dynamic axis 'seq' disagree on its size: "
                   r"\{'input_ids': 12, 'attention_mask': 10\}"),
    ("image folder", r"is a folder of images, but model inputs \['input_ids', 'attention_mask'\] are not one "
                     r"image input"),
])
def test_captures_that_do_not_fit_the_inputs_are_refused(tmp_path, splits, fault, message):
    from edgeq.core.errors import SpecError

    arrays, meta = _pool(splits)
    if fault == "float ids":
        arrays["input_ids"] = arrays["input_ids"].astype(np.float32)
    elif fault == "short mask":
        arrays["attention_mask"] = arrays["attention_mask"][:, :10]
    cap, md = _write_pool(tmp_path / "captures", arrays, meta)
    if fault == "image folder":
        cap = tmp_path / "captures"
    cfg = load_cfg(_write_config(tmp_path, splits, cap, md, augmented_column=None))
    with pytest.raises(SpecError, match=message):
        _build(cfg)
    assert records(cfg) == [] and _store_files(cfg) == []


def _tabular(folder: Path) -> Path:
    """A one-input float model of tabular rows [batch, 6]: splits, and a pool with a duplicate and a train copy."""
    rng = np.random.default_rng(3)
    rows = np.round(rng.normal(size=(90, 6)), 3).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", rows[:30]), ("validation", rows[30:40]), ("test", rows[40:50])):
        np.savez(folder / f"{name}.npz", features=part, y=np.zeros(len(part), np.int64))
        paths[name] = folder / f"{name}.npz"
    # Near-identical rows (one value 0.001 apart) are distinct samples; an exact copy and a training row are not.
    pool = np.concatenate([rows[50:90], rows[50:51], rows[3:4], rows[60:61] + np.float32(0.001) * np.eye(6)[0]])
    np.savez(folder / "pool.npz", x=pool)  # a one-input model may name its array x
    pd.DataFrame({"capture_id": [f"t{i}" for i in range(len(pool))], "index": np.arange(len(pool)),
                  "line": ["a", "b"] * (len(pool) // 2) + ["a"] * (len(pool) % 2)}).to_csv(folder / "meta.csv",
                                                                                          index=False)
    weights = save_weights(TinyEncoder(), folder / "w.safetensors")
    cfg = token_config(folder, weights, paths)
    cfg["model"]["inputs"] = [{"name": "features", "shape": ["batch", 6], "dtype": "float32"}]
    cfg["data"]["captures"] = {"path": str(folder / "pool.npz"), "metadata": str(folder / "meta.csv"),
                               "strata": ["line"], "min_size": 10, "augmented_column": None}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_tabular_rows_and_an_older_one_input_record(tmp_path):
    from edgeq.calibration import open_calibration
    from edgeq.calibration.versions import _path, load_version
    from edgeq.core.store import ArtifactStore

    cfg = load_cfg(_tabular(tmp_path))
    cand = _build(cfg)
    v = cand.version
    assert v.excluded == {"duplicate": 1, "in-train": 1} and v.size == 41
    assert cand.report.kind == "inputs" and cand.report.length_input is None
    assert [(i.name, i.dtype, i.shape, i.artifact) for i in v.inputs] == [("features", "float32", [6], "samples")]

    # A record written before `inputs` existed (one float32 input, artifact "samples") still verifies and reads.
    store = ArtifactStore(cfg.store_url)
    old = v.model_copy(update={"inputs": None})
    old = old.model_copy(update={"content_sha256": old.content_hash()})
    data = old.model_dump(mode="json")
    del data["inputs"]
    store.write_record(_path(v.version), data)
    assert load_version(store, v.version).inputs is None
    _approve(cfg, v.version)
    reader = open_calibration(store, v.version)
    assert reader.names == ["features"] and len(reader) == 41
    assert next(iter(reader))["features"].dtype == np.float32 and next(iter(reader))["features"].shape == (1, 6)


def test_the_flow_builds_a_token_candidate(prefect_server, tmp_path, splits):
    from edgeq.flows.calibration import CalibrationParams, build_calibration_set

    path = _write_config(tmp_path, splits, splits["captures"], splits["metadata"], augmented_column=None)
    result = build_calibration_set(CalibrationParams(config=str(path), wait_for_review=False))
    assert result.status == "candidate" and result.size == 80
    assert [i.name for i in result.record.inputs] == NAMES
    again = build_calibration_set(CalibrationParams(config=str(path), wait_for_review=False))  # cached steps
    assert again.version == result.version
