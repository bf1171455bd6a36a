import os
from pathlib import Path

import numpy as np
import pytest
import torch

from skpatchcore.datasets import make_defect_images

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MTD_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mtd"


@pytest.fixture(scope="session")
def defects():
    """Synthetic textures: 24 normal then 12 with drawn defects, 64x64 RGB uint8."""
    X, y, masks = make_defect_images(24, 12, image_size=64, random_state=0)
    return X, y, masks


@pytest.fixture(scope="session")
def rng_images():
    rng = np.random.RandomState(0)
    return (rng.rand(3, 40, 56, 3) * 255).astype(np.uint8)


@pytest.fixture
def mtd_root():
    if not MTD_ROOT.is_dir():
        pytest.skip("../shared/datasets/mtd is not present")
    return MTD_ROOT
