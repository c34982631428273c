"""The calibration set built from the demo's production pool (plain functions, real data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.calibration.cal_helpers import demo_pool_rows
from tests.conftest import write_config


@pytest.fixture(scope="module")
def demo_candidate(tmp_path_factory, demo_root):
    from edgeq.tasks.calibration import build_calibration_candidate
    from edgeq.tasks.config import load_prepared

    cfg = load_prepared(write_config(tmp_path_factory.mktemp("cal-demo"), demo_root))
    return cfg, build_calibration_candidate(cfg)


def _manifest(cfg, version) -> pd.DataFrame:
    from edgeq.calibration.ingest import read_parquet_bytes
    from edgeq.core.store import ArtifactStore

    return read_parquet_bytes(ArtifactStore(cfg.store_url).read_bytes(version.artifacts["manifest"]))


def test_demo_candidate_uses_whole_usable_pool_and_says_so(demo_candidate):
    _, cand = demo_candidate
    v = cand.version
    assert v.status == "candidate" and v.version.startswith("cal-")
    assert (v.pool_rows, v.usable, v.size) == (434, 400, 400)
    assert v.excluded == {"duplicate": 8, "in-train": 12, "augmented-flip": 8, "augmented-flag": 6}
    assert any("using all 400 usable captures (target 1024)" in n for n in v.notes)
    assert "using all 400 usable captures" in cand.markdown


def test_every_stratum_of_the_pool_is_covered(demo_candidate):
    cfg, cand = demo_candidate
    rep = cand.report
    assert rep.joint_strata_covered == rep.joint_strata_usable == 36
    meta = pd.read_csv(cfg.data.captures.metadata)
    for col in ("lighting", "camera", "time_of_day"):
        for value in meta[col].unique():
            row = next(r for r in rep.rows if r.column == col and r.value == value)
            assert row.selected > 0, (col, value)
            assert f"| {col} | {value} |" in cand.markdown
    assert not rep.missing
    assert {s["set"] for s in rep.stats} == {"calibration", "train"}


def test_no_selected_sample_is_in_train_or_test_by_hash(demo_candidate, demo_root):
    from edgeq.core.data import pixel_hash
    from edgeq.core.store import ArtifactStore

    cfg, cand = demo_candidate
    manifest = _manifest(cfg, cand.version)
    train = set(pd.read_parquet(demo_root / "train_manifest.parquet")["sha256"])
    test = set(pd.read_parquet(demo_root / "test_manifest.parquet")["sha256"])
    # The manifest's hashes are the stored samples' pixels: undo the demo's 1/255 scaling and re-hash.
    x = np.load(ArtifactStore(cfg.store_url).local_path(cand.version.artifacts["samples"]))
    raw = np.rint(x * 255).astype(np.uint8)
    assert [pixel_hash(s) for s in raw] == manifest["sha256"].tolist()
    assert not set(manifest["sha256"]) & train
    assert not set(manifest["sha256"]) & test
    assert manifest["sha256"].is_unique


def test_planted_faults_are_excluded(demo_candidate, demo_root):
    cfg, cand = demo_candidate
    meta = pd.read_csv(demo_root / "captures" / "metadata.csv")  # simulated_origin: read by the test only
    selected = set(_manifest(cfg, cand.version)["capture_id"])
    origin = dict(zip(meta["capture_id"], meta["simulated_origin"]))
    kinds = {origin[c] for c in selected}
    assert kinds <= {"pool", "duplicate"}  # a duplicate's first capture may be the copy; never both
    assert not any(origin[c] in ("train-copy", "train-flip", "flagged") for c in selected)
    assert len(selected) == len(demo_pool_rows(demo_root))


def test_rebuild_is_the_same_version_and_leaves_the_record_alone(demo_candidate):
    from edgeq.tasks.calibration import build_calibration_candidate

    cfg, cand = demo_candidate
    again = build_calibration_candidate(cfg)
    assert again.version.version == cand.version.version
    assert not again.new and again.version.created_at == cand.version.created_at


def test_crops_jitters_and_flips_of_training_images_are_rejected(demo_root):
    from PIL import Image

    from edgeq.calibration.select import reject_augmented

    train = np.load(demo_root / "train.npz")["x"]
    pool = np.load(demo_root / "pool.npz")["x"][:20]
    crop = np.asarray(Image.fromarray(train[3, 0]).crop((1, 1, 7, 7)).resize((8, 8), Image.Resampling.BILINEAR))
    jitter = np.clip(train[5].astype(int) * 0.8 + 30, 0, 255).astype(np.uint8)
    vflip = train[7][:, ::-1, :]
    pixels = np.concatenate([pool, crop[None, None], jitter[None], vflip[None]])
    table = pd.DataFrame({"capture_id": [f"c{i}" for i in range(len(pixels))], "pixel_index": range(len(pixels)),
                          "excluded": "", "detail": "", "augmented_flag": False})
    out = reject_augmented(table, pixels, train)
    assert out["excluded"].tolist() == [""] * 20 + ["augmented-crop", "augmented-jitter", "augmented-flip"]
    assert out["detail"].iloc[-1] == "flip of training sample #7"


def test_readers_follow_onnxruntime_and_nncf_contracts(demo_candidate, tmp_path):
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from edgeq.calibration import open_calibration
    from edgeq.calibration.versions import record_decision
    from edgeq.core.errors import NotApproved, VersionNotFound
    from edgeq.core.store import ArtifactStore

    cfg, cand = demo_candidate
    store = ArtifactStore(cfg.store_url)
    vid = cand.version.version
    with pytest.raises(NotApproved, match=f"{vid} is a candidate awaiting review"):
        open_calibration(store, vid)
    with pytest.raises(VersionNotFound, match="no approved calibration version for model 'digits-cnn'"):
        open_calibration(store, "latest", model="digits-cnn")
    record_decision(store, vid, True, "tester", "looks right")

    reader = open_calibration(cfg.store_url, "latest", model="digits-cnn")
    assert isinstance(reader, CalibrationDataReader) and len(reader) == 400
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    assert len(feeds) == 400 and set(feeds[0]) == {"image"}
    assert feeds[0]["image"].shape == (1, 1, 8, 8) and feeds[0]["image"].dtype == np.float32
    assert isinstance(reader.samples, np.memmap)  # mapped from the store object, not copied
    reader.rewind()

    # A real conv model with the demo's input name, quantized by ONNX Runtime with this reader.
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 1, 3, 3], np.random.default_rng(0).normal(size=36).tolist())
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ)
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert "QuantizeLinear" in ops

    ds = reader.as_nncf_dataset()
    items = list(ds.get_inference_data())
    assert len(items) == 400 and items[0]["image"].shape == (1, 1, 8, 8)
    assert len(list(ds.get_inference_data())) == 400  # iterable again, as NNCF's passes need
    assert ds.get_length() == 400
    again = open_calibration(store, vid)
    assert again.version.decision.reviewer == "tester"
