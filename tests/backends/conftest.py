"""Fixtures of the backend tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def demo_samples(demo_cfg) -> np.ndarray:
    """Eight real preprocessed test images, shape [8, 1, 8, 8]."""
    from edgeq.core.data import load_split

    x, _ = load_split(demo_cfg.data.test, demo_cfg.data.preprocess)
    return x[:8].astype(np.float32)
