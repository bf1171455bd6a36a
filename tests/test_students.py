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
from skpatchcore.students import StudentNet, StudentTeacherDetector

#: A detector small enough for a test: narrow students, a few epochs, at the synthetic
#: images' own 64 px.
TINY = dict(image_size=64, n_students=2, width=16, max_epochs=5, learning_rate=3e-3,
            random_state=0)
#: Smaller still, for the contract tests that fit many times (grid search, pipeline).
MINI = dict(TINY, image_size=32, width=8, max_epochs=1)


@pytest.fixture(scope="module")
def split(defects):
    """18 good training images; a test set of the 6 other good ones and the 12 defects."""
    X, y, masks = defects
    return X[:18], X[18:], y[18:], masks[18:]


@pytest.fixture(scope="module")
def fitted(split):
    return StudentTeacherDetector(**TINY).fit(split[0])


# ------------------------------------------------------------------ the networks
@pytest.mark.parametrize("strides, channels", [([8, 16], [40, 80]), ([4], [24]),
                                               ([16, 16], [80, 112])])
def test_student_outputs_every_teacher_layer_at_its_stride(strides, channels):
    torch.manual_seed(0)
    net = StudentNet(strides, channels, 4).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 48))
    assert [tuple(o.shape) for o in out] == [(2, c, 64 // s, 48 // s)
                                             for s, c in zip(strides, channels, strict=True)]
    assert len(net.stages) == int(np.log2(max(strides)))


# ------------------------------------------------------------------ training and scoring
def test_training_lowers_the_losses(fitted):
    assert fitted.n_epochs_ == len(fitted.train_loss_) == TINY["max_epochs"]
    assert fitted.train_loss_[-1] < fitted.train_loss_[0]
    assert fitted.n_train_images_ + fitted.n_validation_images_ == 18
    assert fitted.n_stats_images_ == 2  # 10 % of the 16 training images, rounded


def test_fitted_statistics(fitted):
    # blocks.2 and blocks.3 of EfficientNet-Lite0: 40 + 80 descriptor dimensions
    assert fitted.teacher_mean_.shape == fitted.teacher_std_.shape == (120,)
    assert (fitted.teacher_std_ > 0).all()
    assert fitted.error_stats_.shape == fitted.variance_stats_.shape == (2, 2)
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
    """The map, by hand from the networks: students' mean against the normalised teacher
    (the pretrained network's layers), plus their variance, each standardised by the
    fitted statistics, the coarser layer's upsampled to the finer one's grid, averaged."""
    x = fitted._float(fitted._frames(check_images(split[1][:2])), "cpu")  # 64 x 64
    mean, std = fitted._normalisation("cpu")
    xn = (x - mean) / std
    network, _ = fitted._pretrained_network()
    with torch.no_grad():
        teacher = network(xn)
        preds = [fitted._nets[f"student{i}"](xn) for i in range(2)]
    assert [tuple(t.shape) for t in teacher] == [(2, 40, 8, 8), (2, 80, 4, 4)]
    expected, start = 0.0, 0
    for k, t in enumerate(teacher):
        c = t.shape[1]
        t = (t - torch.tensor(fitted.teacher_mean_[start : start + c]).float().view(1, -1, 1, 1)
             ) / torch.tensor(fitted.teacher_std_[start : start + c]).float().view(1, -1, 1, 1)
        start += c
        s = torch.stack([p[k] for p in preds])
        e = ((s.mean(0) - t) ** 2).sum(1, keepdim=True)
        v = ((s - s.mean(0)) ** 2).sum(2).mean(0)[:, None]
        e, v = (torch.nn.functional.interpolate(m, size=(8, 8), mode="bilinear",
                                                align_corners=False)[:, 0].numpy()
                for m in (e, v))
        (em, es), (vm, vs) = fitted.error_stats_[k], fitted.variance_stats_[k]
        expected = expected + (e - em) / es + (v - vm) / vs
    scores, maps = fitted._anomaly(x)
    assert maps.shape == (2, 8, 8)
    np.testing.assert_allclose(maps, expected / 2, rtol=1e-4, atol=1e-4)
    assert (scores <= maps.reshape(2, -1).max(1) + 1e-6).all()  # max of a smoothed map


def test_statistics_come_from_images_the_students_did_not_train_on(split):
    """The paper's validation set: the frames whose maps set ``error_stats_`` and
    ``variance_stats_`` are never in a training batch of the students."""
    seen = {"train": set(), "stats": set()}

    class Spy(StudentTeacherDetector):
        def _input(self, frames, device):
            seen["train"].update(f.numpy().tobytes() for f in frames)
            return super()._input(frames, device)

        def _map_stats(self, frames, device):
            seen["stats"].update(f.numpy().tobytes() for f in frames)
            return super()._map_stats(frames, device)

    det = Spy(**MINI).fit(split[0])
    assert len(seen["stats"]) == det.n_stats_images_ == 2
    assert len(seen["train"]) == det.n_train_images_ - det.n_stats_images_ == 14
    assert not seen["stats"] & seen["train"]


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
    other = StudentTeacherDetector(**dict(MINI, random_state=1)).fit(X_train)
    assert not np.array_equal(other.score_samples(X), first.score_samples(X))


def test_one_student_has_no_variance_term(split):
    det = StudentTeacherDetector(**dict(MINI, n_students=1)).fit(split[0])
    np.testing.assert_array_equal(det.variance_stats_, [[0.0, 1.0], [0.0, 1.0]])
    assert np.isfinite(det.score_samples(split[1])).all()


@pytest.mark.parametrize("layers, dims, grid", [(("blocks.1",), 24, 8),
                                                 (("blocks.1", "blocks.4"), 136, 8),
                                                 (("blocks.3",), 80, 2)])
def test_other_teacher_layers(split, layers, dims, grid):
    det = StudentTeacherDetector(**dict(MINI, teacher_layers=layers)).fit(split[0])
    assert det.teacher_mean_.shape == (dims,)
    assert det.error_stats_.shape == (len(layers), 2)
    assert set(det._nets) == {"student0", "student1"}
    _, _, grids = next(det.iter_score_and_grids(split[1][:2]))
    assert grids.shape == (2, grid, grid)  # the finest layer's grid at 32 px
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
    assert params["teacher_layers"] == ("blocks.2", "blocks.3") and params["n_students"] == 2
    other = clone(det).set_params(n_students=4, teacher_layers=("blocks.1",))
    assert other.n_students == 4 and other.teacher_layers == ("blocks.1",)
    assert det.n_students == 2
    default = StudentTeacherDetector()
    assert default.image_size == 128 and default.max_epochs == 20


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
@pytest.mark.parametrize("layers", [(), ("blocks.9",), ("blocks.2", "blocks.2"), ("stem",),
                                    ("blocks.6",), (2,), "blocks.2", None])
def test_bad_teacher_layers(split, layers):
    det = StudentTeacherDetector(**dict(MINI, teacher_layers=layers))
    with pytest.raises((ValueError, InvalidParameterError), match="teacher_layers"):
        det.fit(split[0])


@pytest.mark.parametrize("param, value", [("n_students", 0), ("width", 0),
                                          ("max_epochs", 0), ("image_size", 16)])
def test_bad_parameters(split, param, value):
    with pytest.raises(InvalidParameterError, match=param):
        StudentTeacherDetector(**dict(MINI, **{param: value})).fit(split[0])


def test_too_few_images_and_not_fitted(split):
    with pytest.raises(ValueError, match="at least 4 good training images"):
        StudentTeacherDetector(**MINI).fit(split[0][:3])
    with pytest.raises(NotFittedError):
        StudentTeacherDetector(**MINI).score_samples(split[1])
