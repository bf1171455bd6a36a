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


@pytest.fixture(scope="session")
def grid_data():
    """Feature grids without a network: 30 normal grids (6 x 6 x 8) around one mean, and
    test grids: 4 normal, 4 with one far-off cell at (2, 3)."""
    rng = np.random.RandomState(0)
    mean = rng.randn(6, 6, 8).astype(np.float32)
    train = (mean + 0.1 * rng.randn(30, 6, 6, 8)).astype(np.float32)
    test = (mean + 0.1 * rng.randn(8, 6, 6, 8)).astype(np.float32)
    test[4:, 2, 3] += 3.0
    y_test = np.array([1] * 4 + [-1] * 4)
    return train, test, y_test


def all_detectors():
    """One unfitted instance of every detector, for the shared contract tests."""
    from skpatchcore import PaDiMDetector, PatchCoreDetector, SPADEDetector

    return [PatchCoreDetector(), SPADEDetector(), SPADEDetector(image_score="max"),
            PaDiMDetector(n_features=6, random_state=0)]


@pytest.fixture
def sklearn_check_labels(monkeypatch):
    """scikit-learn's estimator checks pass class labels (0, 1, 2) to every fit, which our
    detectors refuse by design (only +1/-1 mean IsolationForest's convention). For those
    checks, labels other than +1/-1 are ignored, as IsolationForest ignores y, so that every
    other property the checks test still runs; test_detector_contract tests the refusal."""
    from skpatchcore import _base, coreset, padim
    from skpatchcore._validation import normal_mask

    def ignore_class_labels(y, n, name="y"):
        if y is not None and not set(np.unique(np.asarray(y)).tolist()) <= {1, -1}:
            y = None
        return normal_mask(y, n, name)

    for module in (_base, coreset, padim):
        monkeypatch.setattr(module, "normal_mask", ignore_class_labels)
