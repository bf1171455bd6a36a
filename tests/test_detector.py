import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_blobs
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from skpatchcore import CoresetSampler, PatchCoreDetector
from skpatchcore._geometry import upsample_maps


def _brute_scores(bank, grids, b):
    """Independent numpy implementation of PatchCore's image score (float64)."""
    bank = bank.astype(np.float64)
    out = []
    for g in grids.reshape(len(grids), -1, grids.shape[-1]).astype(np.float64):
        d = np.sqrt(((g[:, None, :] - bank[None]) ** 2).sum(-1))
        nn = d.argmin(1)
        dmin = d[np.arange(len(g)), nn]
        p = dmin.argmax()
        s_star, m_star, t = dmin[p], nn[p], g[p]
        if b == 1:
            out.append(s_star)
            continue
        dm = np.sqrt(((bank - bank[m_star]) ** 2).sum(-1))
        nb = np.argsort(dm, kind="stable")[:b]
        dt = np.sqrt(((bank[nb] - t) ** 2).sum(-1))
        w = 1 - np.exp(s_star) / np.exp(dt).sum()
        out.append(w * s_star)
    return np.array(out)


@pytest.mark.parametrize("b", [1, 3, 9])
def test_scores_match_bruteforce(b):
    rng = np.random.RandomState(0)
    train = rng.rand(5, 4, 4, 6).astype(np.float32)
    test = (rng.rand(3, 4, 4, 6) * 1.5).astype(np.float32)
    det = PatchCoreDetector(n_reweight_neighbors=b).fit(train)
    expected = _brute_scores(train.reshape(-1, 6), test, b)
    np.testing.assert_allclose(-det.score_samples(test), expected, rtol=1e-6)
    assert det.score_samples(test).dtype == np.float64


def test_reweighting_is_stable_for_huge_distances():
    rng = np.random.RandomState(0)
    train = rng.rand(4, 3, 3, 5).astype(np.float32)
    far = train[:1] + 1e4  # exp(1e4) overflows a naive implementation
    det = PatchCoreDetector().fit(train)
    s = -det.score_samples(far)
    assert np.isfinite(s).all() and s[0] > 1e3


def test_patch_distances_are_true_l2_not_squared():
    train = np.zeros((2, 1, 1, 3), np.float32)
    test = np.array([[[[3.0, 4.0, 0.0]]]], np.float32)
    det = PatchCoreDetector(n_reweight_neighbors=1).fit(train)
    assert det.predict_map(test)[0, 0, 0] == pytest.approx(5.0)
    assert det.score_samples(test)[0] == pytest.approx(-5.0)


def test_sign_conventions_and_predict():
    rng = np.random.RandomState(0)
    train = rng.rand(10, 4, 4, 8).astype(np.float32)
    normal = rng.rand(3, 4, 4, 8).astype(np.float32)
    weird = normal + 3.0
    det = PatchCoreDetector().fit(train)
    assert (det.score_samples(weird) < det.score_samples(normal)).all()
    np.testing.assert_allclose(det.decision_function(normal), det.score_samples(normal)
                               - det.offset_)
    assert det.predict(weird).tolist() == [-1, -1, -1]
    assert det.predict(normal).dtype.kind == "i"


def test_contamination_leave_one_out_on_images():
    rng = np.random.RandomState(0)
    train = rng.rand(40, 3, 3, 4).astype(np.float32)
    det = PatchCoreDetector(contamination=0.1).fit(train)
    # a training image is never its own neighbour: its LOO score is strictly positive
    assert det.offset_ < 0
    auto = PatchCoreDetector().fit(train)
    assert auto.offset_ <= det.offset_


@pytest.mark.parametrize("n_features", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drop_in_for_isolation_forest(seed, n_features):
    """The unchanged IsolationForest snippet, with PatchCoreDetector instead."""
    rng = np.random.RandomState(seed)
    X, _ = make_blobs(n_samples=500, centers=3, n_features=n_features, random_state=seed)
    outliers = rng.uniform(X.min(0) - 2, X.max(0) + 2, size=(55, n_features))
    X = np.vstack([X, outliers])
    y = np.r_[np.ones(500), -np.ones(55)]
    labels = PatchCoreDetector(contamination=0.1).fit(X).predict(X)
    assert set(np.unique(labels)) == {-1, 1}
    assert abs((labels == -1).mean() - 0.1) < 0.01
    ours = roc_auc_score(y, PatchCoreDetector(contamination=0.1).fit(X).decision_function(X))
    iforest = IsolationForest(contamination=0.1, random_state=0).fit(X)
    assert ours >= roc_auc_score(y, iforest.decision_function(X))


def test_one_neighbour_is_the_patchcore_rule_on_rows():
    X = np.random.RandomState(0).rand(30, 3)
    q = np.random.RandomState(1).rand(4, 3) + 0.5
    det = PatchCoreDetector(n_neighbors=1, n_reweight_neighbors=1).fit(X)
    d = np.sqrt(((q[:, None] - X[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(-det.score_samples(q), d, rtol=1e-6)
    det20 = PatchCoreDetector(n_reweight_neighbors=1).fit(X)
    d20 = np.sort(np.sqrt(((q[:, None] - X[None]) ** 2).sum(-1)), axis=1)[:, :20].mean(1)
    np.testing.assert_allclose(-det20.score_samples(q), d20, rtol=1e-6)


def test_training_rows_scored_leave_one_out():
    X = np.random.RandomState(0).rand(50, 3)
    det = PatchCoreDetector(contamination=0.2).fit(X)
    assert (det.predict(X) == -1).sum() == 10
    # a new point identical to a training row is that row: scored against the others
    np.testing.assert_allclose(det.score_samples(X[:5]), det.score_samples(X)[:5])


def test_y_excludes_anomalies_from_bank():
    rng = np.random.RandomState(0)
    normal = rng.rand(6, 2, 2, 3).astype(np.float32)
    bad = normal[:2] + 5
    X = np.concatenate([normal, bad])
    y = np.r_[np.ones(6), -np.ones(2)]
    det = PatchCoreDetector().fit(X, y)
    assert det.memory_bank_.shape == (24, 3)
    assert det.score_samples(bad).max() < det.score_samples(normal).min()
    with pytest.raises(ValueError, match="Every sample is labelled -1"):
        PatchCoreDetector().fit(X, -np.ones(8))
    with pytest.raises(ValueError, match="one label per sample"):
        PatchCoreDetector().fit(X, np.ones(3))


def test_fit_on_memory_bank_uses_image_groups():
    rng = np.random.RandomState(0)
    train = rng.rand(12, 4, 4, 5).astype(np.float32)
    bank = CoresetSampler(sampling_ratio=0.25, random_state=0).fit_transform(train)
    det = PatchCoreDetector(contamination=0.25).fit(bank)
    assert det.memory_bank_.shape == (48, 5)
    # offset_ comes from leave-one-out scores, so it is below 0 (no image matches itself)
    assert det.offset_ < 0
    # training images scored normally include their own patches in the bank
    assert (det.decision_function(train) > -1e-9).mean() >= 0.75


def test_predict_map_units_and_upsampling():
    rng = np.random.RandomState(0)
    train = rng.rand(5, 4, 4, 6).astype(np.float32)
    test = train[:1].copy()
    test[0, 1, 2] += 2.0
    det = PatchCoreDetector(n_reweight_neighbors=1).fit(train)
    grid = det.predict_map(test)
    assert grid.shape == (1, 4, 4) and grid.dtype == np.float32
    assert np.unravel_index(grid[0].argmax(), (4, 4)) == (1, 2)
    assert grid[0].max() == pytest.approx(-det.score_samples(test)[0], rel=1e-6)
    assert grid[0, 0, 0] == 0.0  # unchanged patch is in the bank
    up = det.predict_map(test, output_size=(32, 48), sigma=2)
    assert up.shape == (1, 32, 48)
    r, c = np.unravel_index(up[0].argmax(), (32, 48))
    assert 8 <= r < 16 and 24 <= c < 36
    nosmooth = upsample_maps(grid, (8, 8), sigma=0)
    assert nosmooth.max() <= grid.max() + 1e-6
    with pytest.raises(ValueError, match="shape"):
        det.predict_map(test.reshape(-1, 6))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma="):
            det.predict_map(test, output_size=(32, 48), sigma=bad)


def test_feature_mismatch_and_bad_input():
    det = PatchCoreDetector().fit(np.random.RandomState(0).rand(4, 2, 2, 3))
    with pytest.raises(ValueError, match="expecting 3 features"):
        det.score_samples(np.zeros((1, 2, 2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        det.score_samples(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="n_samples=1"):
        PatchCoreDetector().fit(np.zeros((1, 2, 2, 3)))


def test_pickle_round_trip():
    rng = np.random.RandomState(0)
    train = rng.rand(6, 3, 3, 4).astype(np.float32)
    test = rng.rand(2, 3, 3, 4).astype(np.float32)
    det = PatchCoreDetector().fit(train)
    again = pickle.loads(pickle.dumps(det))
    np.testing.assert_array_equal(again.score_samples(test), det.score_samples(test))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), which=st.integers(0, 5), scale=st.floats(0.1, 3.0))
def test_property_training_image_scores_no_worse(seed, which, scale):
    rng = np.random.RandomState(seed)
    train = rng.rand(6, 3, 3, 4).astype(np.float32)
    others = (rng.rand(4, 3, 3, 4) * scale).astype(np.float32)
    det = PatchCoreDetector().fit(train)
    copy_score = det.score_samples(train[which : which + 1])[0]
    assert copy_score == 0.0
    assert (det.score_samples(others) <= copy_score).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(0.01, 5.0))
def test_property_score_monotone_in_distance(seed, shift):
    """Moving a patch further away from the bank never makes the image look more normal."""
    rng = np.random.RandomState(seed)
    train = rng.rand(5, 2, 2, 3).astype(np.float32)
    base = train[:1].copy()
    near, far = base.copy(), base.copy()
    direction = np.float32([1.0, 1.0, 1.0])
    near[0, 0, 0] += 2.0 * direction
    far[0, 0, 0] += (2.0 + shift) * direction
    det = PatchCoreDetector(n_reweight_neighbors=1).fit(train)
    assert det.score_samples(far)[0] <= det.score_samples(near)[0]


def test_repeated_edge_cells_are_searched_once_with_identical_results():
    """Grids whose edge rings repeat inner cells (FeatureExtractor's border) are searched
    once per distinct cell; scores, maps and offset_ equal those of searching every cell."""
    import skpatchcore.detector as detector_module

    rng = np.random.RandomState(0)
    X = rng.randn(6, 9, 11, 5).astype(np.float32)
    rows, cols = np.clip(np.arange(9), 2, 6), np.clip(np.arange(11), 1, 8)
    X = X[:, rows][:, :, cols]
    X[3] = rng.randn(9, 11, 5)  # one image without repeats
    source = detector_module._repeated_cells(X)
    assert len(np.unique(source)) == 5 * 5 * 8 + 9 * 11
    np.testing.assert_array_equal(X.reshape(-1, 5)[source], X.reshape(-1, 5))
    assert detector_module._repeated_cells(rng.randn(2, 4, 4, 3)) is None

    train, test = X[:4], np.concatenate([X[4:], X[:1] + 0.5])
    fast = PatchCoreDetector().fit(train)
    scores, maps = fast.score_and_map(test)
    original = detector_module._repeated_cells
    detector_module._repeated_cells = lambda X: None
    try:
        slow = PatchCoreDetector().fit(train)
        ref_scores, ref_maps = slow.score_and_map(test)
    finally:
        detector_module._repeated_cells = original
    assert fast.offset_ == slow.offset_
    np.testing.assert_array_equal(scores, ref_scores)
    np.testing.assert_array_equal(maps, ref_maps)


def test_many_samples_are_scored_in_bounded_chunks_with_identical_results(monkeypatch):
    import skpatchcore._base as base_module

    rng = np.random.RandomState(1)
    train, test = rng.randn(5, 4, 4, 6), rng.randn(9, 4, 4, 6)
    det = PatchCoreDetector().fit(train)
    scores, maps = det.score_and_map(test)
    rows = rng.randn(50, 3)
    tab = PatchCoreDetector(contamination=0.1).fit(rows)
    tab_scores = tab.score_samples(rows)
    monkeypatch.setattr(base_module, "SCORE_CHUNK_ROWS", 20)  # 1 image, 20 rows a chunk
    chunked = PatchCoreDetector().fit(train)
    assert chunked.offset_ == det.offset_
    s2, m2 = chunked.score_and_map(test)
    np.testing.assert_array_equal(s2, scores)
    np.testing.assert_array_equal(m2, maps)
    tab2 = PatchCoreDetector(contamination=0.1).fit(rows)
    assert tab2.offset_ == tab.offset_
    np.testing.assert_array_equal(tab2.score_samples(rows), tab_scores)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.sampled_from([1, 3]), repeat=st.booleans(),
       ties=st.booleans())
def test_property_pruned_image_scores_equal_the_full_search(seed, k, repeat, ties):
    """score_samples and the leave-one-out offset_ search exactly only the cells that can
    hold each image's maximum; they must equal the full search (score_and_map) bit for bit,
    with repeated edge cells and with exact ties between cells."""
    import skpatchcore.detector as detector_module

    rng = np.random.RandomState(seed)
    train = rng.randn(12, 7, 7, 40).astype(np.float32)
    test = rng.randn(9, 7, 7, 40).astype(np.float32)
    test[5:, 2, 3] += 3.0
    if repeat:  # edge rings repeat their inner neighbours, as FeatureExtractor's border
        for X in (train, test):
            X[:, 0] = X[:, 1]
            X[:, :, -1] = X[:, :, -2]
    if ties:  # two cells with the same, largest, distance
        test[:, 4, 4] = test[:, 2, 3]
    det = PatchCoreDetector(n_neighbors=k).fit(train)
    np.testing.assert_array_equal(det.score_samples(test), det.score_and_map(test)[0])
    first = detector_module._FIRST_CELLS
    detector_module._FIRST_CELLS = 10**6  # every cell searched exactly
    try:
        full = PatchCoreDetector(n_neighbors=k).fit(train)
    finally:
        detector_module._FIRST_CELLS = first
    assert full.offset_ == det.offset_
