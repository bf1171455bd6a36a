"""Tests of skpatchcore.metrics against hand-computed values and brute-force references."""

from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from skpatchcore import metrics
from skpatchcore.metrics import (
    aupro,
    aupro_scorer,
    image_auroc,
    image_auroc_by_type,
    image_auroc_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
    pro_curve,
)

# --------------------------------------------------------------------------------------------
# Independent brute-force reference (no scipy.ndimage, no sorting tricks)
# --------------------------------------------------------------------------------------------


def _regions_bfs(mask):
    """8-connected components of a 2-D bool mask by breadth-first search; list of pixel lists."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for r0 in range(height):
        for c0 in range(width):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            queue, pixels = deque([(r0, c0)]), []
            seen[r0, c0] = True
            while queue:
                r, c = queue.popleft()
                pixels.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < height and 0 <= cc < width and mask[rr, cc]:
                            if not seen[rr, cc]:
                                seen[rr, cc] = True
                                queue.append((rr, cc))
            regions.append(pixels)
    return regions


def _brute_pro_curve(masks, maps):
    """Threshold at every distinct value (score >= t); return fpr, pro from the (0, 0) point."""
    region_scores = []
    for mask, amap in zip(masks, maps, strict=True):
        for pixels in _regions_bfs(np.asarray(mask, dtype=bool)):
            region_scores.append(np.array([amap[r, c] for r, c in pixels]))
    negatives = np.concatenate(
        [np.asarray(a)[~np.asarray(m, dtype=bool)] for m, a in zip(masks, maps, strict=True)]
    )
    values = np.unique(np.concatenate([np.ravel(a) for a in maps]))[::-1]
    fpr, pro = [0.0], [0.0]
    for t in values:
        fpr.append(np.mean(negatives >= t))
        pro.append(np.mean([np.mean(s >= t) for s in region_scores]))
    return np.array(fpr), np.array(pro)


def _brute_aupro(masks, maps, fpr_limit):
    fpr, pro = _brute_pro_curve(masks, maps)
    beyond = np.flatnonzero(fpr > fpr_limit)
    if beyond.size == 0:
        x, y = fpr, pro
    else:
        j = beyond[0]
        i = j - 1
        y_at = pro[i] + (fpr_limit - fpr[i]) / (fpr[j] - fpr[i]) * (pro[j] - pro[i])
        x, y = np.append(fpr[:j], fpr_limit), np.append(pro[:j], y_at)
    return np.trapezoid(y, x) / fpr_limit


def _flat(masks, maps):
    y = np.concatenate([np.ravel(m) for m in masks]).astype(bool)
    s = np.concatenate([np.ravel(a) for a in maps]).astype(np.float64)
    return y, s


# --------------------------------------------------------------------------------------------
# Hand-computed example
# --------------------------------------------------------------------------------------------


def _hand_example():
    """Two 4x4 images.

    Image 0 has two 8-connected regions: a = {(0,0), (0,1)} and b = {(2,2), (3,3)} (diagonal
    neighbours: one region under 8-connectivity, two under 4-connectivity). Image 1 has no
    defect. Scores: a = 0.9, 0.5; b = 0.8, 0.2; defect-free pixels (28 of them): 0.6 in
    image 0, 0.7 and 0.4 in image 1, 0 elsewhere.

    Thresholds (score >= t), FPR and PRO = mean(overlap a, overlap b):
        t=0.9: FPR 0,    PRO (1/2 + 0)/2   = 0.25
        t=0.8: FPR 0,    PRO (1/2 + 1/2)/2 = 0.5
        t=0.7: FPR 1/28, PRO 0.5
        t=0.6: FPR 2/28, PRO 0.5
        t=0.5: FPR 2/28, PRO (1 + 1/2)/2   = 0.75
        t=0.4: FPR 3/28, PRO 0.75
        t=0.2: FPR 3/28, PRO 1
        t=0.0: FPR 1,    PRO 1
    Area up to 0.3: 0.5 * 2/28 + 0.75 * 1/28 + 1 * (0.3 - 3/28) = 0.3 - 1.25/28,
    so AUPRO(0.3) = 1 - 1.25 / 8.4.
    """
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.zeros((2, 4, 4))
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 2, 2] = masks[0, 3, 3] = True
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 2, 2], maps[0, 3, 3] = 0.9, 0.5, 0.8, 0.2
    maps[0, 1, 3] = 0.6
    maps[1, 0, 0], maps[1, 2, 1] = 0.7, 0.4
    return masks, maps


def test_hand_example_aupro():
    masks, maps = _hand_example()
    assert aupro(masks, maps) == pytest.approx(1 - 1.25 / 8.4, abs=1e-12)
    # Limit exactly on the point (1/28, 0.5): the curve is flat at 0.5 before it.
    assert aupro(masks, maps, fpr_limit=1 / 28) == pytest.approx(0.5, abs=1e-12)
    # Limit between 2/28 and 3/28, on the flat part at 0.75.
    expected = (0.5 * 2 / 28 + 0.75 * (0.09 - 2 / 28)) / 0.09
    assert aupro(masks, maps, fpr_limit=0.09) == pytest.approx(expected, abs=1e-12)
    # Up to FPR 1: 0.3 - 1.25/28 + 0.7 (PRO is 1 beyond 3/28).
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 - 1.25 / 28, abs=1e-12)


def test_hand_example_pro_curve():
    masks, maps = _hand_example()
    fpr, pro, thresholds = pro_curve(masks, maps)
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2, 0.0])
    np.testing.assert_allclose(fpr * 28, [0, 0, 0, 1, 2, 2, 3, 3, 28], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 1, 1], atol=1e-12)


def test_hand_example_pixel_auroc():
    masks, maps = _hand_example()
    # Defect scores 0.9, 0.8, 0.5, 0.2 against 28 defect-free (0.7, 0.6, 0.4 and 25 zeros):
    # pairs won: 28 + 28 + 26 + 25 = 107 of 4 * 28.
    assert pixel_auroc(masks, maps) == pytest.approx(107 / 112, abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(*_flat(masks, maps)))


def test_eight_connectivity():
    masks, maps = _hand_example()
    # Breaking the diagonal pair into two regions would change the value (3 regions).
    masks4 = masks.copy()
    masks4[0, 3, 3] = False
    masks4[0, 3, 0] = True  # (3, 0) is isolated: also a separate region
    assert aupro(masks, maps) == pytest.approx(_brute_aupro(masks, maps, 0.3), abs=1e-12)
    assert aupro(masks4, maps) == pytest.approx(_brute_aupro(masks4, maps, 0.3), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Normalisation and invariances
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_perfect_and_constant_maps(fpr_limit):
    rng = np.random.RandomState(0)
    masks = rng.rand(3, 9, 7) < 0.2
    perfect = masks + 0.1 * rng.rand(*masks.shape)
    assert aupro(masks, perfect, fpr_limit=fpr_limit) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(masks, perfect) == 1.0
    # A constant map: the curve is the diagonal, area fpr_limit^2 / 2, normalised fpr_limit/2.
    constant = np.full(masks.shape, 2.5)
    assert aupro(masks, constant, fpr_limit=fpr_limit) == pytest.approx(fpr_limit / 2)
    assert pixel_auroc(masks, constant) == 0.5
    # The worst map: every defect pixel below every defect-free pixel.
    assert aupro(masks, -perfect, fpr_limit=fpr_limit) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(masks, -perfect) == 0.0


def test_increasing_transform_invariance():
    rng = np.random.RandomState(1)
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[1, 2:5, 3:6] = True
    masks[2, 6:9, 1:3] = True
    masks[3, 0, :] = True
    maps = rng.randint(0, 20, size=masks.shape).astype(float) + 3 * masks
    transformed = np.exp(maps / 3.0) - 7.0  # strictly increasing, keeps ties and order
    for f in (aupro, pixel_auroc):
        assert f(masks, transformed) == pytest.approx(f(masks, maps), abs=1e-12)
    scores = maps.max(axis=(1, 2))
    y = np.array([False, True, True, True])
    assert image_auroc(y, np.exp(scores / 3.0)) == pytest.approx(image_auroc(y, scores))


def test_lists_of_differently_sized_images():
    rng = np.random.RandomState(2)
    shapes = [(5, 7), (9, 4), (6, 6)]
    masks = [rng.rand(*s) < 0.25 for s in shapes]
    maps = [rng.rand(*s) + 0.5 * m for s, m in zip(shapes, masks, strict=True)]
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(*_flat(masks, maps)), abs=1e-9)
    assert aupro(masks, maps) == pytest.approx(_brute_aupro(masks, maps, 0.3), abs=1e-9)
    # 0/1 integer masks and float32 maps give the same values.
    int_masks = [m.astype(np.uint8) for m in masks]
    f32 = [a.astype(np.float32) for a in maps]
    assert aupro(int_masks, f32) == pytest.approx(_brute_aupro(masks, f32, 0.3), abs=1e-9)


@pytest.mark.parametrize(("collect_limit", "batch_size"), [(0, 5), (3, 1), (1 << 22, 1 << 24)])
def test_radix_selection_levels_and_batches(monkeypatch, collect_limit, batch_size):
    # A small collection limit forces the radix selection through several passes, a small
    # batch size the counting through several sorted batches.
    monkeypatch.setattr(metrics, "_COLLECT_LIMIT", collect_limit)
    monkeypatch.setattr(metrics, "_BATCH_SIZE", batch_size)
    rng = np.random.RandomState(3)
    masks = rng.rand(2, 12, 12) < 0.15
    maps = np.round(rng.normal(size=masks.shape), 1) + masks  # ties, negative values, -0.0
    maps[0, 0, 0] = -0.0
    for fpr_limit in (0.3, 0.01, 1.0):
        assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(
            _brute_aupro(masks, maps, fpr_limit), abs=1e-9
        )
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(*_flat(masks, maps)), abs=1e-12)


@pytest.mark.parametrize("batch_size", [3, 1 << 24])
def test_pixel_auroc_majority_defect(monkeypatch, batch_size):
    monkeypatch.setattr(metrics, "_BATCH_SIZE", batch_size)
    rng = np.random.RandomState(4)
    masks = rng.rand(2, 8, 8) < 0.8  # defect pixels are the larger class
    maps = rng.randint(0, 5, size=masks.shape) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(*_flat(masks, maps)), abs=1e-12)


# --------------------------------------------------------------------------------------------
# Property-based comparison with the brute-force reference
# --------------------------------------------------------------------------------------------


@st.composite
def _images(draw):
    n_images = draw(st.integers(1, 3))
    integer_scores = draw(st.booleans())  # integers give many ties
    masks, maps = [], []
    for _ in range(n_images):
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        flat_mask = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
        if integer_scores:
            elements = st.integers(-3, 3).map(float)
        else:
            elements = st.floats(-10, 10, allow_nan=False, allow_subnormal=False)
        flat_map = draw(st.lists(elements, min_size=h * w, max_size=h * w))
        masks.append(np.array(flat_mask, dtype=bool).reshape(h, w))
        maps.append(np.array(flat_map, dtype=np.float64).reshape(h, w))
    return masks, maps


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_images(), fpr_limit=st.floats(0.01, 1.0))
def test_against_brute_force(data, fpr_limit):
    masks, maps = data
    y, s = _flat(masks, maps)
    assume(y.any() and not y.all())
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(
        _brute_aupro(masks, maps, fpr_limit), abs=1e-6
    )
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    fpr, pro, thresholds = pro_curve(masks, maps)
    ref_fpr, ref_pro = _brute_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)


def test_pro_curve_thresholds_grid():
    rng = np.random.RandomState(5)
    masks = rng.rand(3, 10, 10) < 0.2
    maps = rng.rand(*masks.shape) + masks
    fpr, pro, thresholds = pro_curve(masks, maps, num_thresholds=11)
    assert thresholds[0] == np.inf and thresholds.size == 12
    np.testing.assert_allclose(thresholds[1:], np.linspace(maps.min(), maps.max(), 11)[::-1])
    for t, f, p in zip(thresholds[1:], fpr[1:], pro[1:], strict=True):
        assert f == pytest.approx(np.mean(maps[~masks] >= t))
        overlaps = []
        for i in range(3):
            for pixels in _regions_bfs(masks[i]):
                overlaps.append(np.mean([maps[i][r, c] >= t for r, c in pixels]))
        assert p == pytest.approx(np.mean(overlaps))
    assert np.all(np.diff(fpr) >= 0) and fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)


def test_aupro_equals_area_of_exact_curve():
    rng = np.random.RandomState(6)
    masks = rng.rand(2, 15, 15) < 0.1
    maps = rng.rand(*masks.shape) + 0.3 * masks
    fpr, pro, _ = pro_curve(masks, maps)
    limit = 0.3
    keep = fpr <= limit
    x = np.append(fpr[keep], limit)
    y = np.append(pro[keep], np.interp(limit, fpr, pro))
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(np.trapezoid(y, x) / limit)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_minus_one_labels_rejected():
    with pytest.raises(ValueError, match=r"y == -1"):
        image_auroc([1, -1, 1], [0.1, 0.9, 0.2])
    masks = np.zeros((1, 3, 3), dtype=int)
    masks[0, 1, 1] = -1
    with pytest.raises(ValueError, match=r"masks\[0\].*y == -1"):
        pixel_auroc(masks, np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match=r"y == -1"):
        aupro(masks, np.zeros((1, 3, 3)))


def test_other_errors():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one score per image"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"mask >= 128"):
        pixel_auroc(np.full((1, 2, 2), 255, dtype=np.uint8), np.zeros((1, 2, 2)))
    masks = [np.zeros((3, 3), bool), np.ones((2, 2), bool)]
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(2, 2\).*anomaly_maps\[1\]"):
        aupro(masks, [np.zeros((3, 3)), np.zeros((3, 2))])
    with pytest.raises(ValueError, match="no defect region"):
        aupro(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="no defect-free pixel"):
        aupro(np.ones((1, 3, 3), bool), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="only defect-free"):
        pixel_auroc(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match=r"masks\[None\]"):
        pixel_auroc(np.zeros((3, 3), bool), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        pixel_auroc(np.eye(3, dtype=bool)[None], np.full((1, 3, 3), np.nan))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 3)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        pro_curve(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 3)), num_thresholds=1)
    with pytest.raises(ValueError, match="2 images but anomaly_maps has 1"):
        pixel_auroc(np.zeros((2, 3, 3), bool), np.zeros((1, 3, 3)))


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


class _MeanDetector:
    """A tiny detector on (n, H, W) images: distance to the mean training image."""

    def __init__(self, power=1.0):
        self.power = power

    def get_params(self, deep=True):
        return {"power": self.power}

    def set_params(self, **params):
        self.power = params.get("power", self.power)
        return self

    def fit(self, X, y=None):
        self.mean_ = np.asarray(X, dtype=float).mean(axis=0)
        return self

    def predict_map(self, X):
        return np.abs(np.asarray(X, dtype=float) - self.mean_) ** self.power

    def score_samples(self, X):
        return -self.predict_map(X).max(axis=(1, 2))

    def decision_function(self, X):
        return self.score_samples(X) + 0.3


def _scorer_data():
    rng = np.random.RandomState(7)
    X = rng.rand(16, 6, 6)
    masks = np.zeros(X.shape, dtype=bool)
    masks[8:, 2:4, 1:3] = True
    X[masks] += rng.uniform(0.0, 1.5, size=masks.sum())
    y = np.where(masks.any(axis=(1, 2)), -1, 1)
    return X, y, masks


def test_image_auroc_by_type_ranks_each_type_against_the_normal_images_only():
    types = ["good", "good", "good", "cut", "cut", "hole", "hole"]
    scores = [0.1, 0.5, 0.3, 0.4, 0.2, 0.9, 0.6]
    # cut: 0.4 beats 0.1 and 0.3, 0.2 beats 0.1 -> 3 of 6 pairs; hole beats every good one.
    # The holes' high scores do not count against the cuts.
    assert image_auroc_by_type(types, scores) == {"cut": 0.5, "hole": 1.0}
    assert list(image_auroc_by_type(["ok", "z", "a", "ok"], [0, 1, 1, 0], normal="ok")) == [
        "a", "z"]
    with pytest.raises(ValueError, match="normal type 'good'"):
        image_auroc_by_type(["cut", "hole"], [0.1, 0.2])
    with pytest.raises(ValueError, match="one type and one score per image"):
        image_auroc_by_type(["good", "cut"], [0.1])


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=12),
       st.lists(st.floats(-10, 10), min_size=1, max_size=12))
def test_image_auroc_by_type_of_one_type_is_image_auroc(normal, defective):
    scores = normal + defective
    types = ["good"] * len(normal) + ["defect"] * len(defective)
    expected = image_auroc([t != "good" for t in types], scores)
    assert image_auroc_by_type(types, scores) == {"defect": expected}


def test_image_auroc_scorer_matches_roc_auc():
    X, y, _ = _scorer_data()
    detector = _MeanDetector().fit(X[:8])
    expected = roc_auc_score(y, detector.decision_function(X))
    assert image_auroc_scorer(detector, X, y) == pytest.approx(expected)
    assert image_auroc_scorer(detector, X, y) == pytest.approx(
        image_auroc(y == -1, -detector.score_samples(X))
    )
    with pytest.raises(ValueError, match=r"\+1 \(normal\) and -1"):
        image_auroc_scorer(detector, X, (y == -1).astype(int))


def test_pixel_scorers_in_grid_search():
    from sklearn.base import BaseEstimator, OutlierMixin
    from sklearn.model_selection import GridSearchCV, KFold

    class Detector(OutlierMixin, BaseEstimator, _MeanDetector):
        def __init__(self, power=1.0):
            self.power = power

    X, _, masks = _scorer_data()
    order = np.r_[0:16:2, 1:16:2]  # interleave so every fold holds defects
    X, masks = X[np.argsort(order)], masks[np.argsort(order)]
    search = GridSearchCV(
        Detector(),
        {"power": [1.0, 2.0]},
        scoring={"pixel": pixel_auroc_scorer, "pro": aupro_scorer},
        refit=False,
        cv=KFold(2),
    ).fit(X, masks)
    detector = Detector().fit(X[8:])
    assert pixel_auroc_scorer(detector, X[:8], masks[:8]) == pytest.approx(
        pixel_auroc(masks[:8], detector.predict_map(X[:8]))
    )
    assert search.cv_results_["mean_test_pro"].shape == (2,)
    with pytest.raises(ValueError, match="predict_map"):
        aupro_scorer(object(), X, masks)
