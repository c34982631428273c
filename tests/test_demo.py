"""The embedded demo: real digits, disjoint splits, deterministic, built once."""

import json

import numpy as np
import pandas as pd

from edgeq.core.data import pixel_hash
from edgeq.core.store import sha256_file
from edgeq.demo import ensure_demo


def test_demo_is_deterministic_and_a_second_call_is_a_no_op(demo_root, tmp_path):
    other = ensure_demo(tmp_path / "again")
    for name in ("digits_cnn.safetensors", "train.npz", "validation.npz", "test.npz", "pool.npz",
                 "captures/metadata.csv", "train_manifest.parquet", "test_manifest.parquet"):
        assert sha256_file(demo_root / name) == sha256_file(other / name), name
    stamp = (other / "demo.json").stat().st_mtime_ns
    ensure_demo(other)
    assert (other / "demo.json").stat().st_mtime_ns == stamp
    info = json.loads((other / "demo.json").read_text())
    assert info["test_top1"] > 0.93


def test_splits_are_disjoint_and_the_pool_has_simulated_metadata(demo_root):
    hashes = {}
    for split in ("train", "validation", "test"):
        with np.load(demo_root / f"{split}.npz") as z:
            hashes[split] = {pixel_hash(x) for x in z["x"]}
    with np.load(demo_root / "pool.npz") as z:
        hashes["pool"] = {pixel_hash(x) for x in z["x"][:400]}  # the real pool images; planted faults follow
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not hashes[a] & hashes[b], (a, b)
    meta = pd.read_csv(demo_root / "captures" / "metadata.csv")
    assert len(meta) >= 256 + 34
    assert {"lighting", "camera", "time_of_day", "captured_at", "augmented"} <= set(meta.columns)
    assert set(meta["lighting"]) == {"dim", "normal", "bright"}
