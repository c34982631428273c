"""Stratified sampling on a pool larger than the target: every stratum covered, shares proportional."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from edgeq.calibration import CalibrationError
from edgeq.calibration.select import stratified_sample


def _pool(sizes: dict[tuple[str, str], int], excluded_every: int = 0) -> pd.DataFrame:
    rows = []
    for (camera, light), n in sizes.items():
        rows += [{"camera": camera, "lighting": light} for _ in range(n)]
    t = pd.DataFrame(rows)
    t["excluded"] = ""
    t["pixel_index"] = np.arange(len(t))
    if excluded_every:
        t.loc[::excluded_every, "excluded"] = "duplicate"
    return t


SIZES = {("cam-A", "day"): 700, ("cam-A", "night"): 150, ("cam-B", "day"): 120, ("cam-B", "night"): 25,
         ("cam-C", "dusk"): 5}


@pytest.mark.parametrize("target", [256, 300, 511])
def test_each_stratum_share_is_within_one_of_proportional(target):
    table = _pool(SIZES)
    rows = stratified_sample(table, ["camera", "lighting"], target, seed=3)
    assert len(rows) == target and len(set(rows)) == target
    picked = table.iloc[rows].groupby(["camera", "lighting"]).size()
    total = sum(SIZES.values())
    for cell, n in SIZES.items():
        assert picked[cell] >= 1  # every stratum present in the pool is covered
        assert abs(picked[cell] - target * n / total) <= 1 + 1e-9, (cell, picked[cell], target * n / total)


def test_excluded_captures_are_never_sampled():
    table = _pool(SIZES, excluded_every=4)
    rows = stratified_sample(table, ["camera", "lighting"], 256)
    assert len(rows) == 256 and (table.iloc[rows]["excluded"] == "").all()


def test_more_strata_than_the_target_is_refused_naming_the_fix():
    table = _pool({(f"cam-{i}", "day"): 3 for i in range(12)})
    with pytest.raises(CalibrationError, match=r"12 strata of \['camera', 'lighting'\] cannot each be covered by a "
                                               r"sample of 10; raise data.captures.target_size to at least 12"):
        stratified_sample(table, ["camera", "lighting"], 10)


def test_a_stratum_whose_share_rounds_to_zero_still_gets_one_sample():
    sizes = {("cam-A", "day"): 1500, ("cam-A", "night"): 497, ("cam-B", "night"): 2, ("cam-C", "dusk"): 1}
    table = _pool(sizes)
    rows = stratified_sample(table, ["camera", "lighting"], 256)
    picked = table.iloc[rows].groupby(["camera", "lighting"]).size()
    assert len(rows) == 256 and picked[("cam-C", "dusk")] == 1 and picked[("cam-B", "night")] == 1
    assert abs(picked[("cam-A", "day")] - 256 * 1500 / 2000) <= 1 + 1e-9
