import pickle

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

from skpatchcore import (
    CoresetSampler,
    FeatureExtractor,
    PatchCoreDetector,
    PatchCorePipeline,
    make_patchcore,
)
from skpatchcore.datasets import make_defect_images
from skpatchcore.pipeline import DEFAULT_REWEIGHT_NEIGHBORS


def _pipe(**kw):
    return Pipeline([
        ("features", FeatureExtractor(image_size=64)),
        ("coreset", CoresetSampler(sampling_ratio=0.1, random_state=0)),
        ("detector", PatchCoreDetector(**kw)),
    ])


@pytest.fixture(scope="module")
def fitted(defects):
    X, y, _ = defects
    return _pipe().fit(X[y == 1][:16])


def test_pipeline_detects_synthetic_defects(defects, fitted):
    X, y, _ = defects
    Xt, yt = X[16:], y[16:]  # 8 unseen normal, 12 defective
    scores = fitted.score_samples(Xt)
    assert scores.dtype == np.float64 and scores.shape == (20,)
    assert roc_auc_score(yt, scores) > 0.95
    decision = fitted.decision_function(Xt)
    np.testing.assert_allclose(decision, scores - fitted[-1].offset_)
    labels = fitted.predict(Xt)
    assert labels.dtype.kind == "i" and set(labels) <= {-1, 1}
    assert (labels[yt == -1] == -1).mean() > 0.8


def test_every_input_form_gives_the_same_scores(defects, fitted, tmp_path):
    X, _, _ = defects
    Xt = X[20:24]
    ref = fitted.score_samples(Xt)
    paths = []
    for i, x in enumerate(Xt):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(x).save(paths[-1])
    forms = [
        paths,
        [str(p) for p in paths],
        [Image.fromarray(x) for x in Xt],
        Xt / 255.0,
        list(Xt),
        torch.from_numpy(Xt).permute(0, 3, 1, 2).contiguous(),
    ]
    for form in forms:
        np.testing.assert_allclose(fitted.score_samples(form), ref, rtol=1e-5)


def test_y_keeps_anomalies_out_of_the_bank(defects):
    X, y, _ = defects
    pipe = _pipe().fit(X, y)
    bank_images = pipe["coreset"].sample_indices_ // (8 * 8)
    assert (y[bank_images] == 1).all()


def test_wrong_labels_fail_before_any_feature_is_extracted(defects):
    X, y, _ = defects
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"holds labels 0; .*np.where\(y == 1, -1, 1\)"):
        pipe.fit(X, (y == -1).astype(int))
    assert not hasattr(pipe["features"], "grid_shape_")  # the network was never loaded


def _two_mode_parts():
    """Normal parts in two looks (plain and inverted texture); defects are bright discs.

    One memory-bank row cannot cover both looks, so a tiny coreset must lose."""
    X, _, _ = make_defect_images(36, 0, image_size=64, random_state=0)
    X = X.astype(np.int16)
    X[1::2] = 255 - X[1::2]
    y = np.ones(36, dtype=int)
    y[24:] = -1
    rng = np.random.RandomState(0)
    rows, cols = np.mgrid[:64, :64]
    for i in range(24, 36):
        cy, cx = rng.randint(12, 52, size=2)
        X[i][(rows - cy) ** 2 + (cols - cx) ** 2 < 25] += 70
    return np.clip(X, 0, 255).astype(np.uint8), y


def test_grid_search_over_ratio_and_patch_size():
    X, y = _two_mode_parts()
    # Lite0's features are where one bank row cannot cover both looks; Lite2 spots these
    # discs even from one row, which would leave the grid nothing to choose.
    search = GridSearchCV(
        _pipe().set_params(features__backbone="efficientnet_lite0"),
        {"coreset__sampling_ratio": [0.001, 0.1], "features__patch_size": [1, 3]},
        scoring="roc_auc",
        cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=0),
    ).fit(X, y)
    assert search.best_params_["coreset__sampling_ratio"] == 0.1
    assert search.best_score_ > 0.95
    ratios = np.array(search.cv_results_["param_coreset__sampling_ratio"])
    assert search.cv_results_["mean_test_score"][ratios == 0.001].max() < 0.9
    # every fit, the refit included, saw only normal images
    best = search.best_estimator_
    assert (y[best["coreset"].sample_indices_ // 64] == 1).all()
    assert roc_auc_score(y, best.decision_function(X)) > 0.95


def test_clone_params_and_set_output(fitted):
    pipe = _pipe()
    params = pipe.get_params()
    assert params["coreset__sampling_ratio"] == 0.1
    pipe.set_params(features__patch_size=5, detector__contamination=0.05)
    twin = clone(pipe)
    assert twin.get_params()["features__patch_size"] == 5
    assert twin.get_params()["detector__contamination"] == 0.05
    assert not hasattr(twin["detector"], "offset_")
    pipe.set_output(transform="default")


def test_pickle_and_joblib_round_trips(defects, fitted, tmp_path):
    X, _, _ = defects
    ref = fitted.score_samples(X[20:26])
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.score_samples(X[20:26]), ref)
    joblib.dump(fitted, tmp_path / "model.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "model.joblib").score_samples(X[20:26]),
                                  ref)


def test_detector_without_sampler(defects):
    X, y, _ = defects
    pipe = Pipeline([("features", FeatureExtractor(image_size=64)),
                     ("detector", PatchCoreDetector())]).fit(X[:16])
    assert pipe["detector"].memory_bank_.shape == (16 * 64, 168)
    assert roc_auc_score(y[16:], pipe.score_samples(X[16:])) > 0.95


def test_patchcore_pipeline_maps_at_original_resolution(defects):
    X, y, masks = defects
    pipe = make_patchcore(image_size=64, sampling_ratio=0.2, random_state=0).fit(X[:16])
    assert [name for name, _ in pipe.steps] == ["features", "coreset", "detector"]
    maps = pipe.predict_map(X[24:])
    assert maps.shape == (12, 64, 64) and maps.dtype == np.float32
    # the hottest pixel lies on the drawn defect, give or take one 8-px grid cell
    near = [binary_dilation(m, iterations=8) for m in masks[24:]]
    hits = [m[np.unravel_index(a.argmax(), a.shape)] for a, m in zip(maps, near, strict=True)]
    assert np.mean(hits) >= 0.9
    inside = [a[m].mean() > a[~m].mean() for a, m in zip(maps, masks[24:], strict=True)]
    assert all(inside)
    # images of other sizes come back at their own size (a list when sizes differ)
    big = np.kron(X[30], np.ones((2, 2, 1), dtype=np.uint8))  # the same part at 128 x 128
    out = pipe.predict_map([X[30], big])
    assert isinstance(out, list) and out[0].shape == (64, 64) and out[1].shape == (128, 128)
    r, c = np.unravel_index(out[1].argmax(), out[1].shape)
    assert near[30 - 24][r // 2, c // 2]
    masks_pred = pipe.predict_mask(X[24:])
    assert masks_pred.dtype == bool and masks_pred.shape == (12, 64, 64)
    assert masks_pred[masks[24:]].mean() > masks_pred[~masks[24:]].mean()
    with pytest.raises(ValueError, match="sigma=-2"):
        pipe.predict_map(X[24:26], sigma=-2)
    assert not pipe.predict_mask(X[16:24]).mean() > 0.05


def test_patchcore_pipeline_survives_clone_slicing_and_search(defects):
    X, y, _ = defects
    pipe = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0)
    twin = clone(pipe)
    assert isinstance(twin, PatchCorePipeline) and hasattr(twin, "predict_map")
    assert isinstance(pipe[:2], PatchCorePipeline)
    search = GridSearchCV(pipe, {"features__patch_size": [3]}, scoring="roc_auc",
                          cv=StratifiedKFold(n_splits=2)).fit(X, y)
    assert search.best_estimator_.predict_map(X[:2]).shape == (2, 64, 64)
    without_detector = PatchCorePipeline([("features", FeatureExtractor(image_size=64))])
    assert not hasattr(without_detector, "predict_map")


def test_letterbox_and_crop_are_undone():
    from skpatchcore._geometry import frame_geometry

    assert frame_geometry((100, 200), (64, 64), "letterbox") == (16, 0, 32, 64)
    assert frame_geometry((100, 200), (64, 64), "stretch") == (0, 0, 64, 64)
    rng = np.random.RandomState(0)
    base = (rng.rand(48, 96, 3) * 60 + 100).astype(np.uint8)
    train = [np.roll(base, s, axis=1) for s in range(0, 40, 5)]
    test = train[0].copy()
    test[16:32, 64:80] = 255  # a bright square right of centre
    for kw in ({"resize_mode": "letterbox"}, {"resize_mode": "stretch"},
               {"resize_mode": "stretch", "crop_size": 56}):
        pipe = make_patchcore(image_size=64, sampling_ratio=0.5, random_state=0, **kw)
        amap = pipe.fit(train).predict_map([test])[0]
        assert amap.shape == (48, 96)
        r, c = np.unravel_index(amap.argmax(), amap.shape)
        # the grid is coarse (8 px cells at 64 px): allow one cell around the square
        assert 8 <= r <= 40 and 56 <= c <= 92, (kw, r, c)


def _steps(memory_mb=128):
    return [("features", FeatureExtractor(image_size=64, batch_size=5,
                                          feature_memory_mb=memory_mb)),
            ("coreset", CoresetSampler(sampling_ratio=0.1, random_state=0)),
            ("detector", PatchCoreDetector(n_reweight_neighbors=DEFAULT_REWEIGHT_NEIGHBORS))]


def test_factory_scores_an_image_by_its_largest_patch_distance(defects):
    """make_patchcore's image score is the maximum of its own patch grid (b = 1, measured
    better than the paper's reweighting on both development sets); b = 9 is one parameter
    away and only ever lowers a score (its weight lies in [0, 1))."""
    X, y, _ = defects
    train, test = X[y == 1][:16], X[16:]
    pipe = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0).fit(train)
    assert pipe[-1].n_reweight_neighbors == DEFAULT_REWEIGHT_NEIGHBORS == 1
    grids = pipe[-1].predict_map(pipe[:-1].transform(test))
    largest = grids.reshape(len(test), -1).max(axis=1)
    np.testing.assert_allclose(-pipe.score_samples(test), largest, rtol=1e-6)
    paper = clone(pipe).set_params(detector__n_reweight_neighbors=9).fit(train)
    np.testing.assert_array_equal(paper[-1].memory_bank_, pipe[-1].memory_bank_)
    reweighted = -paper.score_samples(test)
    assert (reweighted <= largest * (1 + 1e-6)).all() and (reweighted < largest).any()


def test_one_model_however_the_pipeline_is_fitted(defects, tmp_path):
    """The plain Pipeline, make_patchcore, Pipeline(memory=...) on its first fit and on a
    cache hit, a pickled-and-restored fitted pipeline, features spilled to disk, and the
    detector fitted on a copied (or pickled) bank all give identical offset_, scores and
    maps: the fit-time contract is an explicit container, not attributes on an array."""
    X, y, _ = defects
    train, test = X[:20], X[20:]
    ref = Pipeline(_steps()).fit(train)
    ref_scores, ref_maps = ref.score_samples(test), ref[-1].predict_map(ref[:-1].transform(test))
    fitted = {
        "make_patchcore": make_patchcore(image_size=64, batch_size=5, sampling_ratio=0.1,
                                         random_state=0).fit(train),
        "memory first fit": Pipeline(_steps(), memory=str(tmp_path)).fit(train),
        "memory cache hit": Pipeline(_steps(), memory=str(tmp_path)).fit(train),
        "pickled": pickle.loads(pickle.dumps(ref)),
        "spilled to disk": Pipeline(_steps(memory_mb=0)).fit(train),
    }
    features = FeatureExtractor(image_size=64).fit_transform(train)
    bank = CoresetSampler(sampling_ratio=0.1, random_state=0).fit_transform(features)
    for name, b in (("copied bank", bank.copy()), ("pickled bank", pickle.loads(
            pickle.dumps(bank))), ("bank", bank)):
        detector = PatchCoreDetector(n_reweight_neighbors=DEFAULT_REWEIGHT_NEIGHBORS)
        fitted[name] = Pipeline([("features", ref[0]), ("detector", detector.fit(b))])
    assert fitted["memory cache hit"][1] is not fitted["memory first fit"][1]
    for name, pipe in fitted.items():
        assert pipe[-1].offset_ == ref[-1].offset_, name
        np.testing.assert_array_equal(pipe[-1].memory_bank_, ref[-1].memory_bank_, name)
        np.testing.assert_array_equal(pipe.score_samples(test), ref_scores, name)
        np.testing.assert_array_equal(pipe[-1].predict_map(pipe[:-1].transform(test)),
                                      ref_maps, name)


def test_fit_transform_spills_beyond_the_memory_budget(defects):
    X, _, _ = defects
    small = FeatureExtractor(image_size=64, feature_memory_mb=0).fit_transform(X[:6])
    big = FeatureExtractor(image_size=64, feature_memory_mb=None).fit_transform(X[:6])
    assert small.spilled and not big.spilled
    dense = FeatureExtractor(image_size=64).fit(X[:6]).transform(X[:6])
    np.testing.assert_array_equal(np.asarray(small), dense)
    np.testing.assert_array_equal(np.asarray(big), dense)


def test_score_and_map_equals_score_samples_and_predict_map(defects):
    X, _, _ = defects
    pipe = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0).fit(X[:16])
    sizes = [np.asarray(X[16]), np.asarray(X[17])[:, :40]]  # two sizes: a list of maps
    scores, maps = pipe.score_and_map(sizes, sigma=2.0)
    np.testing.assert_array_equal(scores, pipe.score_samples(sizes))
    expected = pipe.predict_map(sizes, sigma=2.0)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(64, 64), (64, 40)]
    for got, want in zip(maps, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="sigma"):
        pipe.score_and_map(sizes, sigma=-1)


def test_grid_search_in_two_processes_equals_one(defects):
    """GridSearchCV(n_jobs=2) sends the pipeline and images to worker processes; the
    containers are built there and every fold's score equals the single-process run."""
    X, y, _ = defects
    grid = {"coreset__sampling_ratio": [0.05, 0.2]}
    cv = StratifiedKFold(n_splits=2, shuffle=True, random_state=0)
    runs = [GridSearchCV(_pipe(), grid, scoring="roc_auc", cv=cv, n_jobs=n).fit(X, y)
            for n in (1, 2)]
    for key in ("split0_test_score", "split1_test_score"):
        np.testing.assert_array_equal(runs[0].cv_results_[key], runs[1].cv_results_[key])
    assert runs[0].best_estimator_[-1].offset_ == runs[1].best_estimator_[-1].offset_


def test_huge_images_are_shrunk_the_same_way_in_python_and_in_predict(defects):
    """An image far larger than the frame is shrunk before the resize (bounded memory);
    score_samples, score_and_map and the CLI's streamed scoring see the same pixels."""
    X, _, _ = defects
    pipe = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0).fit(X[:16])
    big = np.kron(X[20], np.ones((5, 5, 1), dtype=np.uint8))  # 320 px against a 64 px frame
    small = X[21]
    scores = pipe.score_samples([big, small])
    streamed = np.concatenate([chunk[1] for chunk in pipe.iter_score_and_grids([big, small])])
    np.testing.assert_array_equal(scores, streamed)
    s2, maps = pipe.score_and_map([big, small])
    np.testing.assert_array_equal(s2, scores)
    assert maps[0].shape == (320, 320) and maps[1].shape == (64, 64)
