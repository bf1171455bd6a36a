import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatchcore import (
    CoresetSampler,
    FeatureExtractor,
    PatchCoreDetector,
    PatchCorePipeline,
    load_model,
    save_model,
)
from skpatchcore.metrics import image_auroc, pixel_auroc
from skpatchcore.spade import SPADEDetector


def _dists(A, B):
    A, B = A.astype(np.float64), B.astype(np.float64)
    return np.sqrt(((A[:, None, :] - B[None]) ** 2).sum(-1))


def _brute_pooled(train, test, k, loo=False):
    """Independent numpy SPADE image score: mean distance to the k nearest pooled images."""
    pt = train.reshape(len(train), -1, train.shape[-1]).astype(np.float64).mean(1)
    pq = test.reshape(len(test), -1, test.shape[-1]).astype(np.float64).mean(1)
    d = _dists(pq.astype(np.float32), pt.astype(np.float32))
    if loo:
        np.fill_diagonal(d, np.inf)
    d = np.sort(d, axis=1)[:, :k]
    return np.array([r[np.isfinite(r)].mean() for r in d])


@pytest.fixture(scope="module")
def defect_features(defects):
    X, y, masks = defects
    return FeatureExtractor(image_size=64).fit_transform(X), y, masks


# ------------------------------------------------------------------ the defining formulas
@pytest.mark.parametrize("k", [1, 3])
def test_patch_scores_and_pooled_image_scores_match_bruteforce(k):
    rng = np.random.RandomState(0)
    train = rng.rand(7, 3, 4, 5).astype(np.float32)
    test = (rng.rand(4, 3, 4, 5) * 1.3).astype(np.float32)
    det = SPADEDetector(n_neighbors=k, n_image_neighbors=3).fit(train)
    d = np.sort(_dists(test.reshape(-1, 5), train.reshape(-1, 5)), axis=1)[:, :k].mean(1)
    np.testing.assert_allclose(det.predict_map(test), d.reshape(4, 3, 4), rtol=1e-6)
    scores = det.score_samples(test)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(-scores, _brute_pooled(train, test, 3), rtol=1e-6)
    np.testing.assert_allclose(det.image_features_, train.mean(axis=(1, 2)), rtol=1e-6)
    assert det.memory_bank_.shape == (7 * 12, 5)


@pytest.mark.parametrize("contamination", [0.1, 0.25, 0.5])
def test_offset_from_leave_one_out_image_scores(contamination):
    rng = np.random.RandomState(1)
    train = rng.rand(12, 2, 3, 4).astype(np.float32)
    det = SPADEDetector(n_image_neighbors=4, contamination=contamination).fit(train)
    loo = -_brute_pooled(train, train, 4, loo=True)
    assert det.offset_ == pytest.approx(np.percentile(loo, 100 * contamination), rel=1e-6)
    # more neighbours than other training images: the mean over all n - 1 of them
    det = SPADEDetector(n_image_neighbors=50, contamination=0.5).fit(train)
    loo = -_brute_pooled(train, train, 11, loo=True)
    assert det.offset_ == pytest.approx(np.median(loo), rel=1e-6)


def test_max_mode_offset_is_leave_one_out_on_patches():
    rng = np.random.RandomState(2)
    train = rng.rand(8, 2, 2, 3).astype(np.float32)
    det = SPADEDetector(image_score="max", contamination=0.5).fit(train)
    loo = []
    for i in range(8):
        others = np.delete(train, i, axis=0).reshape(-1, 3)
        loo.append(_dists(train[i].reshape(-1, 3), others).min(1).max())
    assert det.offset_ == pytest.approx(-np.median(loo), rel=1e-6)


# ------------------------------------------------------------------ relation to PatchCore
def test_k1_maps_equal_patchcore_without_reweighting(defect_features):
    F, y, _ = defect_features
    train, test = F[:16], F[16:]
    spade = SPADEDetector(n_neighbors=1).fit(train)
    patchcore = PatchCoreDetector(n_reweight_neighbors=1).fit(train)
    np.testing.assert_array_equal(spade.predict_map(test), patchcore.predict_map(test))
    np.testing.assert_array_equal(
        spade.predict_map(test, output_size=(64, 64)),
        patchcore.predict_map(test, output_size=(64, 64)),
    )
    # Image level: the paper's pooled kNN differs from PatchCore's maximum patch distance;
    # image_score='max' is exactly PatchCore without reweighting, offset_ included.
    spade_max = SPADEDetector(n_neighbors=1, image_score="max").fit(train)
    np.testing.assert_array_equal(spade_max.score_samples(test), patchcore.score_samples(test))
    assert spade_max.offset_ == patchcore.offset_
    assert not np.allclose(spade.score_samples(test), patchcore.score_samples(test))


def test_memory_bank_rows_and_pooled_source():
    rng = np.random.RandomState(3)
    train = rng.rand(10, 4, 4, 6).astype(np.float32)
    y = np.r_[np.ones(9), -1]
    bank = CoresetSampler(sampling_ratio=0.25, random_state=0).fit_transform(train, y)
    det = SPADEDetector(contamination=0.5, n_image_neighbors=3).fit(bank)
    assert det.memory_bank_.shape == (bank.shape[0], 6)
    rows = np.asarray(bank)  # same rows, grouped by training image
    np.testing.assert_array_equal(
        det.memory_bank_[np.lexsort(det.memory_bank_.T)], rows[np.lexsort(rows.T)]
    )
    assert np.all(np.diff(det.bank_sample_index_) >= 0)
    # the pooled image bank is built from the 9 normal source grids, not from the coreset
    np.testing.assert_allclose(det.image_features_, train[:9].mean(axis=(1, 2)), rtol=1e-6)
    loo = -_brute_pooled(train[:9], train[:9], 3, loo=True)
    assert det.offset_ == pytest.approx(np.median(loo), rel=1e-6)
    # maps search the coreset rows only
    patchcore = PatchCoreDetector(n_reweight_neighbors=1).fit(bank)
    np.testing.assert_array_equal(det.predict_map(train), patchcore.predict_map(train))
    # image_score='max' with a bank: leave-one-out over its groups, like PatchCore
    det_max = SPADEDetector(image_score="max").fit(bank)
    assert det_max.offset_ == patchcore.offset_


# ------------------------------------------------------------------ contract
def test_sign_conventions_predict_and_y_exclusion():
    rng = np.random.RandomState(4)
    normal = rng.rand(8, 3, 3, 4).astype(np.float32)
    bad = normal[:3] + 4.0
    X = np.concatenate([normal, bad])
    y = np.r_[np.ones(8), -np.ones(3)]
    det = SPADEDetector(n_image_neighbors=3).fit(X, y)
    ref = SPADEDetector(n_image_neighbors=3).fit(normal)
    np.testing.assert_array_equal(det.memory_bank_, ref.memory_bank_)
    np.testing.assert_array_equal(det.image_features_, ref.image_features_)
    assert det.offset_ == ref.offset_
    assert (det.score_samples(bad) < det.score_samples(normal).min()).all()
    np.testing.assert_allclose(
        det.decision_function(bad), det.score_samples(bad) - det.offset_
    )
    labels = det.predict(bad)
    assert labels.dtype.kind == "i" and labels.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="Every sample is labelled -1"):
        SPADEDetector().fit(X, -np.ones(11))
    with pytest.raises(ValueError, match="n_samples=1"):
        SPADEDetector().fit(X, np.r_[1, -np.ones(10)])


def test_bad_input_messages():
    det = SPADEDetector().fit(np.random.RandomState(0).rand(4, 2, 2, 3))
    with pytest.raises(ValueError, match="expecting 3 features"):
        det.score_samples(np.zeros((1, 2, 2, 5)))
    with pytest.raises(ValueError, match="expecting 3 features"):
        det.predict_map(np.zeros((1, 2, 2, 5)))
    with pytest.raises(ValueError, match="FeatureExtractor first"):
        det.score_samples(np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match=r"\(n_images, h, w, d\)"):
        det.predict_map(np.zeros((2, 3)))


def test_tabular_rows_are_scored_leave_one_out():
    X = np.random.RandomState(0).normal(size=(60, 3))
    det = SPADEDetector(n_image_neighbors=5, contamination=0.1).fit(X)
    assert (det.predict(X) == -1).sum() == 6
    # a row identical to a training row is that row, scored without itself
    np.testing.assert_allclose(det.score_samples(X[:4]), det.score_samples(X)[:4])
    loo = _brute_pooled(X[:, None, None, :], X[:, None, None, :], 5, loo=True)
    np.testing.assert_allclose(-det.score_samples(X), loo, rtol=1e-5)


def test_pickle_and_safe_format_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    train = rng.rand(6, 3, 3, 4).astype(np.float32)
    test = rng.rand(2, 3, 3, 4).astype(np.float32)
    det = SPADEDetector(n_neighbors=2).fit(train)
    pickled = pickle.loads(pickle.dumps(det))
    assert "_patch_index" not in pickled.__dict__
    safe = load_model(save_model(det, tmp_path / "spade"))
    for again in (pickled, safe):
        np.testing.assert_array_equal(again.score_samples(test), det.score_samples(test))
        np.testing.assert_array_equal(again.predict_map(test), det.predict_map(test))
        assert again.offset_ == det.offset_
    rows = rng.rand(20, 3)
    det = SPADEDetector(n_image_neighbors=3).fit(rows)
    safe = load_model(save_model(det, tmp_path / "spade_rows"))
    np.testing.assert_array_equal(safe.score_samples(rows), det.score_samples(rows))


@pytest.mark.parametrize("image_score", ["pooled", "max"])
def test_score_and_map_is_both_methods_at_once(image_score):
    rng = np.random.RandomState(5)
    train = rng.rand(6, 3, 2, 4).astype(np.float32)
    test = rng.rand(3, 3, 2, 4).astype(np.float32)
    det = SPADEDetector(image_score=image_score, n_neighbors=2).fit(train)
    scores, maps = det.score_and_map(test)
    np.testing.assert_array_equal(scores, det.score_samples(test))
    np.testing.assert_array_equal(maps, det.predict_map(test))
    assert scores.dtype == np.float64 and maps.dtype == np.float32


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(0.01, 5.0), k=st.integers(1, 4))
def test_property_maps_monotone_and_training_patches_zero(seed, shift, k):
    """A bank patch scores 0 (k=1); moving a patch away never lowers its map value."""
    rng = np.random.RandomState(seed)
    train = rng.rand(5, 2, 2, 3).astype(np.float32)
    det = SPADEDetector(n_neighbors=k).fit(train)
    if k == 1:
        assert (det.predict_map(train[:2]) == 0).all()
    near, far = train[:1].copy(), train[:1].copy()
    near[0, 1, 1] += 2.0
    far[0, 1, 1] += 2.0 + shift
    assert det.predict_map(far)[0, 1, 1] >= det.predict_map(near)[0, 1, 1]


# ------------------------------------------------------------------ on images
def test_detects_synthetic_defects(defect_features):
    F, y, masks = defect_features
    train, test, yt = F[:16], F[16:], y[16:]  # 8 unseen normal, 12 defective
    det = SPADEDetector().fit(train)
    assert image_auroc(yt == -1, -det.score_samples(test)) > 0.9
    assert pixel_auroc(masks[16:], det.predict_map(test, output_size=(64, 64))) > 0.9
    assert (det.predict(test)[yt == -1] == -1).mean() > 0.8


def test_in_patchcore_pipeline_maps_at_input_size(defects):
    X, y, masks = defects
    pipe = PatchCorePipeline([
        ("features", FeatureExtractor(image_size=64)),
        ("detector", SPADEDetector()),
    ])
    pipe.fit(X[:12])
    test = [16, 17, 30, 31]  # two unseen normal images, two defective ones
    maps = pipe.predict_map(X[test])
    assert maps.shape == (4, 64, 64) and maps.dtype == np.float32
    assert pixel_auroc(masks[test], maps) > 0.9
    scores = pipe.score_samples(X[test])
    assert scores[:2].min() > scores[2:].max()


def test_coreset_pipeline_and_grid_search_on_features(defect_features):
    F, y, _ = defect_features
    # with a coreset step in front, the detector receives a MemoryBank
    pipe = Pipeline([
        ("coreset", CoresetSampler(sampling_ratio=0.05, random_state=0)),
        ("detector", SPADEDetector(image_score="max")),
    ]).fit(F[:16])
    assert pipe[-1].memory_bank_.shape[0] == math.ceil(0.05 * 16 * 64)
    assert roc_auc_score(y[16:], pipe.score_samples(F[16:])) > 0.9
    search = GridSearchCV(
        SPADEDetector(), {"n_image_neighbors": [1, 5]}, scoring="roc_auc",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
    ).fit(F, y)
    assert search.best_score_ > 0.9
    # -1 images are left out of every fold's banks, and of the refit
    assert search.best_estimator_.image_features_.shape[0] == 24
    assert clone(search.best_estimator_).get_params()["n_neighbors"] == 1


# ------------------------------------------------------------------ scikit-learn's checks
@parametrize_with_checks(
    [
        SPADEDetector(),
        SPADEDetector(image_score="max", n_neighbors=3, contamination=0.1),
    ],
)
@pytest.mark.usefixtures("sklearn_check_labels")  # the checks' 0/1/2 labels: see conftest
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
