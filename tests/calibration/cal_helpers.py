"""Small capture pools for the calibration tests, cut from the session's demo build."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tests.conftest import write_config


def demo_pool_rows(demo_root: Path, origin: str = "pool") -> pd.DataFrame:
    meta = pd.read_csv(demo_root / "captures" / "metadata.csv")
    return meta[meta["simulated_origin"] == origin]


def tiny_pool(folder: Path, demo_root: Path, n: int = 40) -> Path:
    """A capture folder with `n` real pool images and their metadata (without the test-only column)."""
    cap = folder / "captures"
    (cap / "images").mkdir(parents=True, exist_ok=True)
    rows = demo_pool_rows(demo_root).head(n).drop(columns=["simulated_origin"])
    for p in rows["path"]:
        shutil.copy(demo_root / "captures" / p, cap / p)
    rows.to_csv(cap / "metadata.csv", index=False)
    return cap


def config_with_captures(folder: Path, demo_root: Path, **captures) -> Path:
    """The demo config with data.captures replaced by `captures` (path/metadata/strata/...)."""
    path = write_config(folder, demo_root)
    data = yaml.safe_load(path.read_text())
    data["data"]["captures"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in captures.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_cfg(path: Path):
    from edgeq.tasks.config import load_prepared

    return load_prepared(path)


def records(cfg) -> list:
    from edgeq.calibration.versions import list_versions
    from edgeq.core.store import ArtifactStore

    return list_versions(ArtifactStore(cfg.store_url))


def write_array_pool(folder: Path, x: np.ndarray, strata: dict[str, list] | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "captures.npy", x)
    meta = pd.DataFrame({"capture_id": [f"a{i}" for i in range(len(x))], "augmented": False, **(strata or {})})
    meta.to_csv(folder / "meta.csv", index=False)
    return folder / "captures.npy", folder / "meta.csv"
