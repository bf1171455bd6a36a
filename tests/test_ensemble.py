import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from skpatchcore import AnomalyEnsemble, load_model, make_ensemble, make_patchcore, save_model
from skpatchcore.methods import make_model
from skpatchcore.metrics import image_auroc, pixel_auroc


def _members():
    return [("small", make_patchcore(image_size=64, sampling_ratio=0.2, random_state=0)),
            ("large", make_patchcore(image_size=96, sampling_ratio=0.2, random_state=0,
                                     backbone="efficientnet_lite0"))]


@pytest.fixture(scope="module")
def fitted(defects):
    X, _, _ = defects
    return AnomalyEnsemble(_members(), validation_fraction=0.2, random_state=0).fit(X[:20])


def _split(n, fraction, seed):
    n_val = max(2, int(round(fraction * n)))
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[:n_val]), np.sort(order[n_val:])


def test_members_are_fitted_on_the_rest_and_put_in_held_out_units(fitted, defects):
    X, _, _ = defects
    held, kept = _split(20, 0.2, 0)
    assert (fitted.n_train_images_, fitted.n_validation_images_) == (16, 4)
    for j, member in enumerate(fitted.members_):
        # a member's own training images are in its bank: it scores them as their own
        # nearest neighbours, so they rank as the most normal of the 20
        scores = member.score_samples(X[:20])
        assert set(np.argsort(scores)[-16:]) == set(kept)
        anomaly, maps = member.score_and_map(X[held])
        assert fitted.score_loc_[j] == pytest.approx(-scores[held].mean())
        assert fitted.score_scale_[j] == pytest.approx(anomaly.std())
        assert fitted.score_loc_[j] == pytest.approx(-anomaly.mean())
        assert fitted.map_loc_[j] == pytest.approx(maps.mean(dtype=np.float64), rel=1e-6)
        assert fitted.map_scale_[j] == pytest.approx(maps.std(dtype=np.float64), rel=1e-6)
    # held-out images are the units: their ensemble scores have mean 0
    assert fitted.score_samples(X[held]).mean() == pytest.approx(0.0, abs=1e-9)
    assert fitted.members_[0] is not fitted.members[0][1]  # clones, the members untouched
    assert not hasattr(fitted.members[0][1][-1], "offset_")


def test_scores_and_maps_are_the_mean_of_the_standardised_members(fitted, defects):
    X, _, _ = defects
    scores, maps = fitted.score_and_map(X[20:26])
    expected_scores, expected_maps = 0.0, 0.0
    for j, member in enumerate(fitted.members_):
        s, m = member.score_and_map(X[20:26])
        expected_scores = expected_scores + (-s - fitted.score_loc_[j]) / fitted.score_scale_[j]
        expected_maps = expected_maps + (m - fitted.map_loc_[j]) / fitted.map_scale_[j]
    np.testing.assert_allclose(scores, -expected_scores / 2, rtol=1e-10)
    np.testing.assert_allclose(maps, expected_maps / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fitted.score_samples(X[20:26]), scores)
    np.testing.assert_array_equal(fitted.predict_map(X[20:26]), maps)


def test_defects_score_lower_and_light_up_their_masks(fitted, defects):
    X, y, masks = defects
    scores, maps = fitted.score_and_map(X[20:])
    is_defect = y[20:] == -1
    assert image_auroc(is_defect, -scores) == 1.0
    assert pixel_auroc(list(masks[24:]), list(maps[4:])) > 0.9
    for amap, mask in zip(maps[4:], masks[24:], strict=True):
        assert amap[mask].mean() > amap[~mask].mean() + 1.0


def test_signs_threshold_and_masks_follow_isolation_forest(fitted, defects):
    X, y, _ = defects
    scores = fitted.score_samples(X[20:])
    np.testing.assert_allclose(fitted.decision_function(X[20:]), scores - fitted.offset_)
    np.testing.assert_array_equal(fitted.predict(X[20:]),
                                  np.where(scores < fitted.offset_, -1, 1))
    assert (fitted.predict(X[24:]) == -1).all()
    masks = fitted.predict_mask(X[20:22])
    np.testing.assert_array_equal(masks, fitted.predict_map(X[20:22]) > fitted.pixel_threshold_)
    assert fitted.calibrate(X[20:24], fpr=0.25).calibration_n_samples_ == 4


def test_maps_on_each_images_own_pixels(fitted, defects):
    X, _, _ = defects
    images = [X[24], X[25][:48, :40]]
    scores, maps = fitted.score_and_map(images)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(64, 64), (48, 40)]
    assert scores[0] == pytest.approx(fitted.score_samples(X[24:25])[0])


def test_labels_leave_defects_out_and_the_split_follows_random_state(defects):
    X, y, _ = defects
    a = AnomalyEnsemble(_members(), validation_fraction=0.2).fit(X[:26], y[:26])
    assert a.n_train_images_ + a.n_validation_images_ == 24
    b = AnomalyEnsemble(_members(), validation_fraction=0.2, random_state=1).fit(X[:20])
    assert not np.allclose(a.score_loc_, b.score_loc_)


def test_save_and_load_give_identical_scores_and_maps(fitted, defects, tmp_path):
    X, _, _ = defects
    loaded = load_model(save_model(fitted, tmp_path / "ensemble"), require_detector=True)
    assert [name for name, _ in loaded.members] == ["small", "large"]
    s1, m1 = fitted.score_and_map(X[20:])
    s2, m2 = loaded.score_and_map(X[20:])
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert loaded.pixel_threshold_ == fitted.pixel_threshold_
    # an unfitted ensemble saves and loads, but cannot score
    path = save_model(AnomalyEnsemble(_members()), tmp_path / "unfitted")
    assert load_model(path).get_params()["large__features__image_size"] == 96
    with pytest.raises(ValueError, match="unfitted AnomalyEnsemble"):
        load_model(path, require_detector=True)


def test_a_damaged_ensemble_file_is_refused_by_name(fitted, tmp_path):
    import json

    path = save_model(fitted, tmp_path / "ensemble.npz")
    with np.load(path) as npz:
        arrays = dict(npz)
    meta = json.loads(arrays["__skpatchcore_meta__"].tobytes())
    arrays["score_scale_"] = np.array([1.0, -1.0])
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="score_scale_ must hold positive spreads"):
        load_model(bad)
    meta["model"]["fitted_members"].pop()
    arrays["score_scale_"] = fitted.score_scale_
    arrays["__skpatchcore_meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="fitted_members must be a list of 2"):
        load_model(bad)


def test_parameters_clone_and_grid_search_reach_the_members(defects):
    X, _, _ = defects
    ensemble = AnomalyEnsemble(_members())
    ensemble.set_params(small__coreset__sampling_ratio=0.5)
    assert ensemble.get_params()["small__coreset__sampling_ratio"] == 0.5
    assert clone(ensemble).get_params()["small__coreset__sampling_ratio"] == 0.5
    search = GridSearchCV(AnomalyEnsemble(_members(), validation_fraction=0.25),
                          {"small__features__patch_size": [1, 3]},
                          scoring=lambda est, X_, y_=None: float(est.score_samples(X_).mean()),
                          cv=2).fit(X[:16])
    assert search.best_params_["small__features__patch_size"] in (1, 3)
    assert len(search.cv_results_["mean_test_score"]) == 2


def test_bad_members_and_too_few_images_are_clear(defects):
    X, _, _ = defects
    with pytest.raises(ValueError, match="non-empty list of .name, model. pairs"):
        AnomalyEnsemble([make_patchcore()]).fit(X[:8])
    with pytest.raises(TypeError, match="member 'iso' is a IsolationForest"):
        from sklearn.ensemble import IsolationForest

        AnomalyEnsemble([("iso", IsolationForest())]).fit(X[:8])
    with pytest.raises(ValueError, match="at least 4 good training images"):
        AnomalyEnsemble(_members()).fit(X[:3])
    with pytest.raises(ValueError, match="validation_fraction"):
        AnomalyEnsemble(_members(), validation_fraction=0.7).fit(X[:8])


def test_make_ensemble_is_the_measured_pair(defects):
    ensemble = make_ensemble(patch_size=1, random_state=3)
    params = ensemble.get_params()
    assert [name for name, _ in ensemble.members] == ["lite2_320", "lite1_384"]
    assert params["lite2_320__features__backbone"] == "efficientnet_lite2"
    assert params["lite1_384__features__image_size"] == 384
    assert params["lite1_384__features__patch_size"] == 1
    assert params["lite2_320__coreset__sampling_ratio"] == 0.01
    assert params["lite2_320__coreset__random_state"] == 3 and params["random_state"] == 3
    with pytest.raises(ValueError, match="drop backbone"):
        make_ensemble(backbone="efficientnet_lite0")
    assert type(make_model("patchcore", ensemble=True)).__name__ == "AnomalyEnsemble"
    with pytest.raises(ValueError, match="combines PatchCore models"):
        make_model("padim", ensemble=True)


def test_a_trained_detector_is_a_member_too(defects, tmp_path):
    from skpatchcore import DistillationDetector

    X, y, _ = defects
    members = [("patchcore", make_patchcore(image_size=64, sampling_ratio=0.2,
                                            random_state=0)),
               ("mkd", DistillationDetector(image_size=32, max_epochs=2, random_state=0))]
    ensemble = AnomalyEnsemble(members, validation_fraction=0.2).fit(X[:20])
    scores, maps = ensemble.score_and_map(X[20:])
    assert maps.shape == (16, 64, 64)
    assert image_auroc(y[20:] == -1, -scores) > 0.9
    loaded = load_model(save_model(ensemble, tmp_path / "mixed"), require_detector=True)
    np.testing.assert_array_equal(loaded.score_samples(X[20:]), scores)


def test_few_held_out_images_warn_that_the_threshold_is_rough(defects):
    X, _, _ = defects
    with pytest.warns(UserWarning, match="Only 4 held-out good images"):
        AnomalyEnsemble(_members(), validation_fraction=0.2).fit(X[:20])
