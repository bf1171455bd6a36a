"""The contract every detector keeps, tested once for all of them (PatchCore, SPADE, PaDiM):
fit, scores with IsolationForest's signs, maps, persistence, pickle, clone, Pipeline
``memory=``, labels, and the one tabular leave-one-out rule."""

import pickle

import numpy as np
import pytest
from conftest import all_detectors
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from skpatchcore import (
    CoresetSampler,
    FeatureExtractor,
    MemoryBank,
    PaDiMDetector,
    PatchCoreDetector,
    PatchFeatures,
    SPADEDetector,
    load_model,
    save_model,
)

DETECTORS = all_detectors()
IDS = [f"{type(d).__name__}({d.get_params().get('image_score', '')})" for d in DETECTORS]


@pytest.fixture(params=range(len(DETECTORS)), ids=IDS)
def detector(request):
    return clone(DETECTORS[request.param])


def test_fit_scores_and_signs(detector, grid_data):
    train, test, y_test = grid_data
    assert detector.fit(train) is detector
    scores = detector.score_samples(test)
    assert scores.dtype == np.float64 and scores.shape == (8,)
    assert np.isfinite(detector.offset_)
    np.testing.assert_allclose(detector.decision_function(test), scores - detector.offset_)
    labels = detector.predict(test)
    assert labels.dtype.kind == "i" and set(labels.tolist()) <= {-1, 1}
    # lower = more abnormal, and the planted anomalies are found
    assert roc_auc_score(y_test, scores) == 1.0
    assert (labels[y_test == -1] == -1).all()


def test_maps_locate_the_anomalous_cell(detector, grid_data):
    train, test, _ = grid_data
    detector.fit(train)
    grids = detector.predict_map(test)
    assert grids.dtype == np.float32 and grids.shape == (8, 6, 6)
    for g in grids[4:]:
        assert np.unravel_index(g.argmax(), g.shape) == (2, 3)
    up = detector.predict_map(test, output_size=(12, 18), sigma=1.0)
    assert up.shape == (8, 12, 18)
    scores, maps = detector.score_and_map(test)
    np.testing.assert_array_equal(scores, detector.score_samples(test))
    np.testing.assert_array_equal(maps, grids)
    with pytest.raises(ValueError, match="output_size"):
        detector.predict_map(test, output_size=(0, 0))


def test_persistence_pickle_and_clone_keep_the_model(detector, grid_data, tmp_path):
    train, test, _ = grid_data
    detector.fit(train)
    expected = detector.score_and_map(test)
    restored = [load_model(save_model(detector, tmp_path / "model.npz")),
                pickle.loads(pickle.dumps(detector))]
    for other in restored:
        assert other.offset_ == detector.offset_
        got = other.score_and_map(test)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    fresh = clone(detector)
    assert fresh.get_params() == detector.get_params() and not hasattr(fresh, "offset_")


def test_features_in_any_container_give_the_same_model(detector, grid_data):
    """An array, PatchFeatures in memory and PatchFeatures spilled to disk are one model."""
    train, test, _ = grid_data
    spilled = PatchFeatures(train.shape[1:], max_memory_mb=0)
    for s in range(0, len(train), 7):
        spilled.append(train[s : s + 7])
    ref = clone(detector).fit(train)
    for form in (PatchFeatures.from_array(train), spilled):
        other = clone(detector).fit(form)
        assert other.offset_ == ref.offset_
        np.testing.assert_array_equal(other.score_samples(test), ref.score_samples(test))


def test_labels_follow_isolation_forest(detector, grid_data):
    train, test, _ = grid_data
    y = np.ones(len(train), dtype=int)
    y[:3] = -1
    a = clone(detector).fit(train, y)
    b = clone(detector).fit(train[3:])
    np.testing.assert_array_equal(a.score_samples(test), b.score_samples(test))
    # anything but +1/-1 is refused with the convention stated, before any work
    for bad in (np.where(y == -1, -1, 0), (y == -1).astype(int), np.full(len(y), 2)):
        with pytest.raises(ValueError, match=r"holds labels .*\+1 for normal and -1"):
            clone(detector).fit(train, bad)
    with pytest.raises(ValueError, match="1-D with one label per sample"):
        clone(detector).fit(train, y[:-1])


def test_nan_never_says_good(detector, grid_data):
    train, test, _ = grid_data
    detector.fit(train)
    detector.offset_ = np.nan
    assert (detector.predict(test) == -1).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), pick=st.integers(0, 39))
def test_tabular_leave_one_out_rule(seed, pick):
    """2-D rows: a row equal to a training row is scored as that training sample without
    itself, alone or in a batch, by every detector; fit(X).predict(X) flags about
    contamination * n samples."""
    rng = np.random.RandomState(seed)
    X = rng.randn(40, 3)
    for det in all_detectors():
        det.set_params(contamination=0.1)
        det.fit(X)
        scores = det.score_samples(X)
        np.testing.assert_allclose(det.score_samples(X[pick : pick + 1]), scores[pick : pick + 1],
                                   rtol=1e-12)
        assert abs(int((det.predict(X) == -1).sum()) - 4) <= 1, type(det).__name__
        # a new row equal to a training row gets that row's leave-one-out score
        new = np.array(X[pick : pick + 1], copy=True)
        np.testing.assert_allclose(det.score_samples(new)[0], scores[pick], rtol=1e-12)


@pytest.mark.parametrize("make", [lambda: PatchCoreDetector(n_neighbors=3),
                                  lambda: SPADEDetector(image_score="max", n_neighbors=2)])
def test_no_eligible_neighbour_is_infinitely_anomalous(make):
    """A training sample whose only bank rows are its own has no neighbour leave-one-out:
    every memory-bank detector scores it -inf (never NaN) and calls it an outlier."""
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    bank = MemoryBank(X[:2], [0, 1], X)  # sample 2 has no row; samples 0, 1 one each
    det = make().fit(bank)
    scores = det.score_samples(X[:2])
    assert np.isfinite(scores).all()
    lonely = MemoryBank(X[:1], [0], X)
    det = make().fit(lonely)
    assert det.score_samples(X[:1])[0] == -np.inf
    assert det.predict(X[:1])[0] == -1


@pytest.mark.parametrize("detector_", [PatchCoreDetector(), SPADEDetector(),
                                       PaDiMDetector(n_features=20, random_state=0)],
                         ids=["patchcore", "spade", "padim"])
def test_pipeline_memory_cache_hit_equals_first_fit(detector_, defects, tmp_path):
    X, _, _ = defects
    train, test = X[:12], X[24:28]
    steps = [("features", FeatureExtractor(image_size=48))]
    if not isinstance(detector_, PaDiMDetector):
        steps.append(("coreset", CoresetSampler(sampling_ratio=0.2, random_state=0)))
    steps.append(("detector", detector_))
    plain = Pipeline(clone(Pipeline(steps)).steps).fit(train)
    first = Pipeline(clone(Pipeline(steps)).steps, memory=str(tmp_path)).fit(train)
    hit = Pipeline(clone(Pipeline(steps)).steps, memory=str(tmp_path)).fit(train)
    for pipe in (first, hit):
        assert pipe[-1].offset_ == plain[-1].offset_
        np.testing.assert_array_equal(pipe.score_samples(test), plain.score_samples(test))
