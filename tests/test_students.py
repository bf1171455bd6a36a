import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import load_model, save_model
from skpatchcore._images import check_images
from skpatchcore.datasets import make_defect_images
from skpatchcore.metrics import image_auroc
from skpatchcore.students import (
    PatchDescriptorNet,
    StudentTeacherDetector,
    patch_dilations,
    sample_windows,
)

#: A detector small enough for a test: one patch size, narrow networks, a few epochs, at
#: the synthetic images' own 64 px (at 32 px their thin scratches and fine spots are hardly
#: there and the image AUROC depends on the seed; at 64 px it is 1.0 for seeds 0, 1, 2).
TINY = dict(image_size=64, patch_sizes=(9,), n_students=2, descriptor_dim=16, width=16,
            teacher_epochs=2, max_epochs=3, learning_rate=3e-3, random_state=0)
#: Smaller still, for the contract tests that fit many times (grid search, pipeline).
MINI = dict(TINY, image_size=32, descriptor_dim=8, width=8, teacher_epochs=1, max_epochs=1)


@pytest.fixture(scope="module")
def split(defects):
    """18 good training images; a test set of the 6 other good ones and the 12 defects."""
    X, y, masks = defects
    return X[:18], X[18:], y[18:], masks[18:]


@pytest.fixture(scope="module")
def fitted(split):
    return StudentTeacherDetector(**TINY).fit(split[0])


# ------------------------------------------------------------------ the networks
@given(st.integers(1, 40))
def test_dilations_give_the_patch_size(half):
    p = 2 * half + 1
    dilations = patch_dilations(p)
    assert 1 + 2 * sum(dilations) == p
    assert all(d >= 1 for d in dilations)


@pytest.mark.parametrize("p", [9, 17])
def test_a_crop_gives_the_image_descriptors_of_its_window(p):
    """Training on crops is exact: the descriptors of a crop of the padded image are those
    of the whole image in the crop's window (each depends on its own patch only)."""
    torch.manual_seed(0)
    net = PatchDescriptorNet(p, 4, 3).eval()
    h = (p - 1) // 2
    padded = torch.nn.functional.pad(torch.rand(1, 3, 30, 28), [h] * 4, mode="reflect")
    with torch.no_grad():
        whole = net(padded)
        part = net(padded[:, :, 5 : 5 + 10 + p - 1, 7 : 7 + 12 + p - 1])
    assert whole.shape == (1, 3, 30, 28)
    torch.testing.assert_close(part, whole[:, :, 5:15, 7:19], rtol=1e-5, atol=1e-6)


def test_sampled_windows_are_windows_of_the_upsampled_maps():
    """The teachers' distillation targets: windows of the backbone maps upsampled to the
    frame, without upsampling the whole frame."""
    maps = torch.randn(3, 5, 8, 6)
    full = torch.nn.functional.interpolate(maps, size=(64, 48), mode="bilinear",
                                           align_corners=False)
    top, left = np.array([0, 10, 44]), np.array([28, 3, 0])
    windows = sample_windows(maps, top, left, 20, (64, 48))
    expected = torch.stack([full[i, :, t : t + 20, s : s + 20]
                            for i, (t, s) in enumerate(zip(top, left, strict=True))])
    torch.testing.assert_close(windows, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ training and scoring
def test_training_lowers_the_losses(fitted):
    assert fitted.n_epochs_ == len(fitted.train_loss_) == TINY["max_epochs"]
    assert len(fitted.teacher_loss_) == TINY["teacher_epochs"]
    assert fitted.train_loss_[-1] < fitted.train_loss_[0]
    assert fitted.teacher_loss_[-1] < fitted.teacher_loss_[0]
    assert fitted.n_train_images_ + fitted.n_validation_images_ == 18


def test_fitted_statistics(fitted):
    assert fitted.teacher_mean_.shape == fitted.teacher_std_.shape == (1, 16)
    assert (fitted.teacher_std_ > 0).all()
    assert fitted.error_stats_.shape == fitted.variance_stats_.shape == (1, 2)
    assert (fitted.error_stats_ > 0).all() and (fitted.variance_stats_ > 0).all()
    assert fitted.weights_sha256_ is not None


def test_defects_score_higher(fitted, split):
    _, X, y, masks = split
    scores, maps = fitted.score_and_map(X)
    assert maps.shape == (len(X), 64, 64) and np.isfinite(maps).all()
    assert image_auroc(y == -1, -scores) >= 0.9
    bad = y == -1
    inside = np.mean([m[k].mean() for m, k in zip(maps[bad], masks[bad], strict=True)])
    outside = np.mean([m[~k].mean() for m, k in zip(maps[bad], masks[bad], strict=True)])
    assert inside > outside + 1.0
    # the maps are standardised on good training pixels: good test pixels are near 0
    assert abs(float(np.median(maps[~bad]))) < 1.0


def test_map_is_the_standardised_error_plus_variance(fitted, split):
    """The map, by hand from the networks: students' mean against the normalised teacher,
    plus their variance, each standardised by the fitted statistics."""
    x = fitted._float(fitted._frames(check_images(split[1][:2])), "cpu")  # 64 x 64
    with torch.no_grad():
        padded = torch.nn.functional.pad(fitted._normalise(x), [4] * 4, mode="reflect")
        t = fitted._nets["teacher9"](padded)
        t = (t - torch.tensor(fitted.teacher_mean_[0]).float().view(1, -1, 1, 1)) / \
            torch.tensor(fitted.teacher_std_[0]).float().view(1, -1, 1, 1)
        s = torch.stack([fitted._nets[f"student9_{i}"](padded) for i in range(2)])
    e = ((s.mean(0) - t) ** 2).sum(1).numpy()
    v = ((s - s.mean(0)) ** 2).sum(2).mean(0).numpy()
    (em, es), (vm, vs) = fitted.error_stats_[0], fitted.variance_stats_[0]
    expected = (e - em) / es + (v - vm) / vs
    scores, maps = fitted._anomaly(x)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4)
    assert (scores <= maps.reshape(2, -1).max(1) + 1e-6).all()  # max of a smoothed map


def test_predict_and_decision_function(fitted, split):
    X = split[1]
    s = fitted.score_samples(X)
    np.testing.assert_array_equal(fitted.decision_function(X), s - fitted.offset_)
    np.testing.assert_array_equal(fitted.predict(X), np.where(s - fitted.offset_ < 0, -1, 1))


def test_same_random_state_same_scores(split):
    X_train, X = split[0], split[1]
    first = StudentTeacherDetector(**MINI).fit(X_train)
    again = StudentTeacherDetector(**MINI).fit(X_train)
    np.testing.assert_array_equal(again.score_samples(X), first.score_samples(X))
    np.testing.assert_array_equal(again.predict_map(X[:2]), first.predict_map(X[:2]))
    assert again.train_loss_ == first.train_loss_
    assert again.teacher_loss_ == first.teacher_loss_
    other = StudentTeacherDetector(**dict(MINI, random_state=1)).fit(X_train)
    assert not np.array_equal(other.score_samples(X), first.score_samples(X))


def test_one_student_has_no_variance_term(split):
    det = StudentTeacherDetector(**dict(MINI, n_students=1)).fit(split[0])
    np.testing.assert_array_equal(det.variance_stats_, [[0.0, 1.0]])
    assert np.isfinite(det.score_samples(split[1])).all()


def test_several_patch_sizes(split):
    det = StudentTeacherDetector(**dict(MINI, patch_sizes=(5, 9))).fit(split[0])
    assert det.teacher_mean_.shape == (2, 8) and det.error_stats_.shape == (2, 2)
    assert {k for k in det._nets} == {"teacher5", "teacher9", "student5_0", "student5_1",
                                      "student9_0", "student9_1"}
    assert np.isfinite(det.predict_map(split[1][:2])).all()


@settings(max_examples=5, deadline=None)
@given(st.permutations(range(6)))
def test_scores_do_not_depend_on_the_order(fitted, split, order):
    X = split[1][:6]
    order = np.asarray(order)
    np.testing.assert_allclose(fitted.score_samples(X[order]), fitted.score_samples(X)[order],
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ persistence
def test_pickle_round_trip(fitted, split):
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.score_samples(split[1]), fitted.score_samples(split[1]))


def test_save_load_round_trip(fitted, split, tmp_path):
    loaded = load_model(save_model(fitted, tmp_path / "students"))
    assert isinstance(loaded, StudentTeacherDetector)
    np.testing.assert_array_equal(loaded.score_samples(split[1]),
                                  fitted.score_samples(split[1]))
    np.testing.assert_array_equal(loaded.teacher_mean_, fitted.teacher_mean_)


def test_network_state_round_trip(fitted, split):
    det = clone(fitted)
    for key in ("teacher_mean_", "teacher_std_", "error_stats_", "variance_stats_", "offset_"):
        setattr(det, key, getattr(fitted, key))
    det.load_network_state(fitted.network_state())
    np.testing.assert_array_equal(det.score_samples(split[1]), fitted.score_samples(split[1]))


# ------------------------------------------------------------------ scikit-learn contract
def test_clone_and_params():
    det = StudentTeacherDetector(**TINY)
    params = det.get_params()
    assert params["patch_sizes"] == (9,) and params["n_students"] == 2
    other = clone(det).set_params(n_students=4, patch_sizes=(5, 9))
    assert other.n_students == 4 and other.patch_sizes == (5, 9)
    assert det.n_students == 2
    default = StudentTeacherDetector()
    assert default.patch_sizes == (17, 33) and default.image_size == 128


def test_grid_search():
    X, y, _ = make_defect_images(10, 6, image_size=64, random_state=3)

    def scorer(est, X, y):
        return image_auroc(y == -1, -est.score_samples(X))

    search = GridSearchCV(StudentTeacherDetector(**MINI), {"learning_rate": [1e-3, 3e-3]},
                          scoring=scorer, cv=StratifiedKFold(2, shuffle=True, random_state=0))
    search.fit(X, y)
    assert search.best_params_["learning_rate"] in (1e-3, 3e-3)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.n_train_images_ + \
        search.best_estimator_.n_validation_images_ == 10  # defects left out


def test_pipeline(split):
    pipe = Pipeline([("det", StudentTeacherDetector(**MINI))]).fit(split[0])
    assert pipe.score_samples(split[1]).shape == (len(split[1]),)
    assert set(pipe.predict(split[1])) <= {-1, 1}


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("sizes", [(8,), (), (9, 9), (1,), (65,), (9.0,), "9", 9])
def test_bad_patch_sizes(split, sizes):
    det = StudentTeacherDetector(**dict(MINI, patch_sizes=sizes))
    with pytest.raises((ValueError, InvalidParameterError), match="patch_sizes"):
        det.fit(split[0])


@pytest.mark.parametrize("param, value", [("n_students", 0), ("descriptor_dim", 1),
                                          ("width", 0), ("teacher_epochs", -1),
                                          ("max_epochs", 0), ("image_size", 16)])
def test_bad_parameters(split, param, value):
    with pytest.raises(InvalidParameterError, match=param):
        StudentTeacherDetector(**dict(MINI, **{param: value})).fit(split[0])


def test_too_few_images_and_not_fitted(split):
    with pytest.raises(ValueError, match="at least 4 good training images"):
        StudentTeacherDetector(**MINI).fit(split[0][:3])
    with pytest.raises(NotFittedError):
        StudentTeacherDetector(**MINI).score_samples(split[1])
