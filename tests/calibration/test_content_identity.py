"""Content identity: one picture has one identity however a source stores it (dtype, scaling, layout), so
calibration's leakage filters and the test/calibration disjointness gate cannot pass for want of a comparable form.

The pictures are the demo's real digits; each calibration test plants one capture among 30 real pool images and
checks that exactly that one is excluded, for the reason a reviewer reads in the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from edgeq.core.data import content_ids, load_split, pixel_hash, split_content_ids
from edgeq.core.errors import SpecError
from edgeq.core.specs import InputSpec, Preprocess, SplitSource
from tests.calibration.cal_helpers import config_with_captures, load_cfg, records, tiny_pool, write_array_pool

PP = Preprocess(scale=0.00392156862745098)  # the demo's: uint8 pixels -> [0, 1]
IMAGE = InputSpec(name="image", shape=["batch", 1, 8, 8])


def _digits(demo_root, split: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    with np.load(demo_root / f"{split}.npz") as z:
        return z["x"][:n], z["y"][:n]


def test_one_picture_one_identity_however_it_is_stored(demo_root):
    x, _ = _digits(demo_root, "test", 60)  # uint8 (N, 1, 8, 8), as captured
    ids = content_ids(x, PP, IMAGE)
    scaled = (x / 255.0).astype(np.float32)  # scaled in float64, stored as float32
    assert content_ids(scaled, PP, IMAGE, made_with=PP) == ids
    assert content_ids(x.astype(np.float32) * np.float32(PP.scale), PP, IMAGE, made_with=PP) == ids
    assert content_ids(x.transpose(0, 2, 3, 1), PP, IMAGE) == ids  # channels-last
    assert content_ids(scaled.transpose(0, 2, 3, 1), PP, IMAGE, made_with=PP) == ids
    assert content_ids(x[:, 0], PP, IMAGE) == ids  # 2-D grayscale
    assert content_ids(x.astype(np.float32), PP, IMAGE) == ids  # raw values stored as floats
    # The stored-bytes hash these filters used before tells the forms apart: the overlap would have been 0.
    assert not {pixel_hash(s) for s in scaled} & {pixel_hash(s) for s in x}
    # Different pictures keep different identities, down to one pixel one step brighter.
    assert len(set(ids)) == len({pixel_hash(s) for s in x})
    brighter = x[:1].copy()
    i, j = np.argwhere(brighter[0, 0] < 255)[0]
    brighter[0, 0, i, j] += 1
    assert content_ids(brighter, PP, IMAGE)[0] != ids[0]


def test_per_channel_normalisation_stored_channels_last_matches_the_raw_pictures(demo_root):
    """ImageNet-style mean/std per channel, scaled in float64 by another tool and stored (N, H, W, C) float32."""
    x, _ = _digits(demo_root, "test", 80)
    rgb = np.concatenate([x[:-2], x[1:-1], x[2:]], axis=1)  # three real digits as three channels
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pp = Preprocess(scale=PP.scale, mean=mean, std=std)
    spec = InputSpec(name="image", shape=["batch", 3, 8, 8])
    stored = ((rgb.transpose(0, 2, 3, 1) / 255.0 - np.array(mean)) / np.array(std)).astype(np.float32)
    assert content_ids(stored, pp, spec, made_with=pp) == content_ids(rgb, pp, spec)


def test_float_split_not_marked_preprocessed_is_refused_and_marked_is_used_as_is(demo_root, tmp_path):
    x, y = _digits(demo_root, "test", 20)
    np.savez(tmp_path / "scaled.npz", x=(x / 255.0).astype(np.float32), y=y)
    unmarked = SplitSource(kind="arrays", path=tmp_path / "scaled.npz")
    msg = (r"holds float32 samples with fractional values \(20 of 20 samples\) but is not marked `preprocessed: "
           r"true`, while data.preprocess scales raw pixel values \(scale 0.00392157\)")
    with pytest.raises(SpecError, match=r"data.test " + msg):
        split_content_ids(unmarked, PP, IMAGE, "data.test")
    with pytest.raises(SpecError, match=r"data split from .*scaled.npz " + msg):
        load_split(unmarked, PP)  # the model would see it scaled twice
    marked = SplitSource(kind="arrays", path=tmp_path / "scaled.npz", preprocessed=True)
    assert split_content_ids(marked, PP, IMAGE, "data.test") == content_ids(x, PP, IMAGE)
    model_input, labels = load_split(marked, PP)
    np.testing.assert_allclose(model_input, x.astype(np.float32) * np.float32(PP.scale), atol=1e-7)
    assert (labels == y).all()


def test_a_shape_no_layout_change_fits_is_refused_naming_both_shapes(demo_root):
    x, _ = _digits(demo_root, "test", 5)
    with pytest.raises(SpecError, match=r"data.test holds samples of shape \[8, 8, 3\] but model input 'image' takes "
                                        r"\[1, 8, 8\] per sample .*cannot be put in one form"):
        content_ids(np.repeat(x, 3, axis=1).transpose(0, 2, 3, 1), PP, IMAGE, what="data.test")


# ---------------------------------------------------------------- calibration: one planted capture each
def _array_pool_cfg(tmp_path, demo_root, planted: np.ndarray, **splits):
    """30 real pool images plus `planted`, with the train/test manifests removed: only the splits' own
    samples, compared by content identity, can show that a capture leaked. `splits` replace data.train/test."""
    pool, _ = _digits(demo_root, "pool", 30)
    path, meta = write_array_pool(tmp_path / "arr", np.concatenate([pool, planted]))
    cfg_path = config_with_captures(tmp_path, demo_root, path=path, metadata=meta)
    data = yaml.safe_load(cfg_path.read_text())
    for key in ("train_manifest", "test_manifest"):
        data["data"].pop(key)
    data["data"].update(splits)
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_cfg(cfg_path)


def _stored(tmp_path, demo_root, split: str, form: str) -> dict:
    """The demo's `split` written as `form`: float32 already scaled (marked preprocessed), or channels-last uint8."""
    x, y = _digits(demo_root, split)
    path = tmp_path / f"{split}-{form}.npz"
    if form == "float32-preprocessed":
        np.savez(path, x=(x / 255.0).astype(np.float32), y=y)
        return {"kind": "arrays", "path": str(path), "preprocessed": True}
    np.savez(path, x=x.transpose(0, 2, 3, 1), y=y)
    return {"kind": "arrays", "path": str(path)}


def _build(cfg):
    from edgeq.tasks.calibration import build_calibration_candidate

    return build_calibration_candidate(cfg, override_reason="content identity test: 30 captures")


def _excluded(cfg, cand) -> pd.DataFrame:
    from edgeq.calibration.ingest import read_parquet_bytes
    from edgeq.core.store import ArtifactStore

    table = read_parquet_bytes(ArtifactStore(cfg.store_url).read_bytes(cand.version.artifacts["pool_table"]))
    return table[table["excluded"] != ""][["capture_id", "excluded", "detail"]]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("form", ["float32-preprocessed", "nhwc"])
def test_a_capture_in_a_split_stored_otherwise_is_excluded_on_its_own(tmp_path, demo_root, split, form):
    planted = _digits(demo_root, split)[0][[17]]  # one uint8 capture of a sample of that split
    cfg = _array_pool_cfg(tmp_path, demo_root, planted, **{split: _stored(tmp_path, demo_root, split, form)})
    cand = _build(cfg)
    assert cand.version.excluded == {f"in-{split}": 1} and cand.version.size == 30
    rows = _excluded(cfg, cand)
    assert rows.values.tolist() == [["a30", f"in-{split}", f"same model input as a sample of data.{split}"]]
    assert f"| a30 | in-{split} | same model input as a sample of data.{split} |" in cand.markdown


def test_a_flip_of_a_training_image_is_caught_when_the_training_split_is_stored_scaled(tmp_path, demo_root):
    planted = _digits(demo_root, "train")[0][[7]][..., ::-1]
    cfg = _array_pool_cfg(tmp_path, demo_root, planted, train=_stored(tmp_path, demo_root, "train",
                                                                     "float32-preprocessed"))
    cand = _build(cfg)
    assert cand.version.excluded == {"augmented-flip": 1} and cand.version.size == 30
    assert _excluded(cfg, cand).values.tolist() == [["a30", "augmented-flip", "flip of training sample #7"]]


def test_a_near_duplicate_is_excluded_on_its_own(tmp_path, demo_root):
    pool, _ = _digits(demo_root, "pool", 30)
    near = np.minimum(pool[[3]].astype(int) + 1, 255).astype(np.uint8)  # one step brighter: re-encoding noise
    cfg = _array_pool_cfg(tmp_path, demo_root, near)
    cand = _build(cfg)
    assert cand.version.excluded == {"near-duplicate": 1} and cand.version.size == 30
    assert _excluded(cfg, cand).values.tolist() == [["a30", "near-duplicate", "near-duplicate of a3"]]


def test_a_capture_of_another_shape_is_excluded_on_its_own(tmp_path, demo_root):
    cap = tiny_pool(tmp_path, demo_root, 30)
    meta = pd.read_csv(cap / "metadata.csv")
    big = np.asarray(Image.open(cap / meta["path"][0]).resize((16, 16)))
    Image.fromarray(big).save(cap / "images" / "big.png")
    odd = meta.iloc[[0]].assign(capture_id="cap_big", path="images/big.png")
    pd.concat([meta, odd]).to_csv(cap / "metadata.csv", index=False)
    cfg = load_cfg(config_with_captures(tmp_path, demo_root, path=cap, metadata=cap / "metadata.csv",
                                        strata=["lighting"]))
    cand = _build(cfg)
    assert cand.version.excluded == {"shape": 1} and cand.version.size == 30
    assert _excluded(cfg, cand).values.tolist() == [["cap_big", "shape", "shape (1, 16, 16) differs from the "
                                                                         "pool's (1, 8, 8)"]]
    assert "| cap_big | shape | shape (1, 16, 16) differs from the pool's (1, 8, 8) |" in cand.markdown


def test_a_pool_the_model_cannot_take_is_refused_naming_both_shapes(tmp_path, demo_root):
    pool, _ = _digits(demo_root, "pool", 30)
    path, meta = write_array_pool(tmp_path / "big", pool.repeat(2, axis=2).repeat(2, axis=3))  # (30, 1, 16, 16)
    cfg = load_cfg(config_with_captures(tmp_path / "c2", demo_root, path=path, metadata=meta))
    with pytest.raises(SpecError, match=r"the capture pool \(data.captures\) holds samples of shape \[1, 16, 16\] but "
                                        r"model input 'image' takes \[1, 8, 8\] .*cannot be put in one form"):
        _build(cfg)
    assert records(cfg) == []
