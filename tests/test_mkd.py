import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import grey_opening
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import DistillationDetector, load_model, save_model
from skpatchcore.datasets import make_defect_images
from skpatchcore.metrics import image_auroc
from skpatchcore.mkd import _disc

# Tiny but reliable: 64 px frames, a narrow cloner, 3 epochs over the 24 good images.
PARAMS = dict(image_size=64, cloner_width=8, max_epochs=3, batch_size=8, random_state=0,
              device="cpu")


@pytest.fixture(scope="module")
def fitted(defects):
    X, y, _ = defects
    return DistillationDetector(**PARAMS).fit(X[y == 1])


@pytest.fixture(scope="module")
def scored(fitted, defects):
    X, _, _ = defects
    return fitted.score_and_map(X)


@pytest.fixture(scope="module")
def tiny_set():
    """Small labelled set for the scikit-learn meta-estimators (32 px networks)."""
    X, y, _ = make_defect_images(12, 6, image_size=32, random_state=1)
    return X, y


TINY = dict(image_size=32, cloner_width=4, max_epochs=1, batch_size=4, random_state=0,
            device="cpu")


def _variant(fitted, **params):
    """The fitted detector with other scoring parameters, sharing its trained cloner."""
    det = clone(fitted).set_params(**params)
    det.__dict__.update({k: v for k, v in fitted.__dict__.items()
                         if k.endswith("_") or k in ("_nets", "_frozen")})
    return det


def _manual_loss(det, x):
    """The paper's loss of each image, written out with torch's own functions."""
    source, (mean, std) = det._pretrained_network()
    xn = (x - mean) / std
    with torch.no_grad():
        s_acts, c_acts = source(xn), det._nets["cloner"](xn)
    total = torch.zeros(len(x), dtype=torch.float64)
    for s, c in zip(s_acts, c_acts, strict=True):
        for i in range(len(x)):
            value = F.mse_loss(c[i], s[i])  # mean over the layer's elements
            direction = 1 - F.cosine_similarity(c[i].reshape(1, -1), s[i].reshape(1, -1))[0]
            total[i] += float(value) + det.direction_weight * float(direction)
    return total


# ------------------------------------------------------------------ training and detection
def test_training_lowers_the_loss(fitted):
    assert fitted.n_epochs_ == 3 and len(fitted.train_loss_) == 3
    assert fitted.train_loss_[-1] < fitted.train_loss_[0]
    assert fitted.n_train_images_ + fitted.n_validation_images_ == 24
    assert fitted.n_validation_images_ >= 2
    assert isinstance(fitted.weights_sha256_, str) and len(fitted.weights_sha256_) == 64


def test_defects_score_higher_and_are_localised(scored, defects):
    _, y, masks = defects
    scores, maps = scored
    assert image_auroc(y == -1, -scores) >= 0.9
    assert maps.shape == masks.shape
    bad = y == -1
    assert maps[bad][masks[bad]].mean() > 1.5 * maps[bad][~masks[bad]].mean()


def test_score_is_the_distillation_loss(fitted, defects):
    X, _, _ = defects
    frames = fitted._frames(fitted._check_images(X[20:26]))
    x = fitted._float(frames, "cpu")
    expected = _manual_loss(fitted, x)
    np.testing.assert_allclose(-fitted.score_samples(X[20:26]), expected.numpy(), rtol=1e-4)


def test_score_samples_matches_score_and_map(fitted, scored, defects):
    X, _, _ = defects
    np.testing.assert_allclose(fitted.score_samples(X), scored[0], rtol=1e-6)


def test_map_is_the_input_gradient_of_each_image_alone(fitted, defects):
    X, _, _ = defects
    det = _variant(fitted, opening_size=1)
    frames = det._frames(det._check_images(X[22:26]))
    (_, _, grids), = det.iter_score_and_grids(X[22:26])
    for i in range(4):
        x = det._float(frames[i : i + 1], "cpu").requires_grad_(True)
        source, (mean, std) = det._pretrained_network()
        xn = (x - mean) / std
        loss = det._losses(det._nets["cloner"](xn), source(xn)).sum()
        (grad,) = torch.autograd.grad(loss, x)
        expected = grad.abs().mean(dim=1)[0].numpy()
        np.testing.assert_allclose(grids[i], expected, rtol=1e-3, atol=1e-6 * expected.max())


def test_opening_is_a_grey_opening_of_the_gradient_map(fitted, defects):
    X, _, _ = defects
    raw = _variant(fitted, opening_size=1)
    (_, _, plain), = raw.iter_score_and_grids(X[24:28])
    (_, _, opened), = fitted.iter_score_and_grids(X[24:28])
    assert np.all(opened <= plain + 1e-7)  # an opening only removes
    assert np.any(opened < plain)
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    assert np.array_equal(_disc(3), cross)
    for o, p in zip(opened, plain, strict=True):
        np.testing.assert_allclose(o, grey_opening(p, footprint=cross, mode="nearest"))


@pytest.mark.parametrize("attribution", ["guided", "smoothgrad"])
def test_other_attributions(fitted, scored, defects, attribution):
    X, y, masks = defects
    det = _variant(fitted, attribution=attribution, smoothgrad_samples=2)
    idx = np.r_[0:3, 24:30]
    scores, maps = det.score_and_map(X[idx])
    np.testing.assert_allclose(scores, scored[0][idx], rtol=1e-5)  # the score is the loss
    assert np.isfinite(maps).all() and (maps >= 0).all()
    assert not np.allclose(maps, scored[1][idx])
    # the map still points at the defects
    bad = y[idx] == -1
    assert maps[bad][masks[idx][bad]].mean() > maps[bad][~masks[idx][bad]].mean()


# ------------------------------------------------------------------ reproducibility
def test_same_random_state_same_scores(tiny_set):
    X, y = tiny_set
    first = DistillationDetector(**TINY).fit(X[y == 1])
    again = DistillationDetector(**TINY).fit(X[y == 1])
    assert again.train_loss_ == first.train_loss_
    assert again.offset_ == first.offset_
    np.testing.assert_array_equal(again.score_samples(X), first.score_samples(X))
    np.testing.assert_array_equal(again.predict_map(X[:2]), first.predict_map(X[:2]))
    other = DistillationDetector(**{**TINY, "random_state": 1}).fit(X[y == 1])
    assert other.train_loss_ != first.train_loss_


def test_pickle_round_trip(fitted, defects):
    X, _, _ = defects
    copy = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(copy.score_samples(X[:8]), fitted.score_samples(X[:8]))
    np.testing.assert_array_equal(copy.predict_map(X[24:26]), fitted.predict_map(X[24:26]))


def test_save_and_load_model(fitted, defects, tmp_path):
    X, _, _ = defects
    path = tmp_path / "mkd.skpc"
    save_model(fitted, path)
    loaded = load_model(path)
    assert isinstance(loaded, DistillationDetector)
    assert loaded.get_params() == fitted.get_params()
    np.testing.assert_array_equal(loaded.score_samples(X[:8]), fitted.score_samples(X[:8]))
    np.testing.assert_array_equal(loaded.predict_map(X[24:26]), fitted.predict_map(X[24:26]))
    assert loaded.offset_ == fitted.offset_


def test_network_state_round_trip(fitted, defects):
    X, _, _ = defects
    state = fitted.network_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    copy = _variant(fitted)
    copy.load_network_state(state)
    assert copy._nets is not fitted._nets
    np.testing.assert_array_equal(copy.score_samples(X[:6]), fitted.score_samples(X[:6]))
    other = _variant(fitted, layers=("blocks.1", "blocks.2"))
    with pytest.raises(ValueError, match="do not fit"):
        other.load_network_state(state)


# ------------------------------------------------------------------ signs and thresholds
def test_signs(fitted, scored, defects):
    X, y, _ = defects
    scores = scored[0]
    decision = fitted.decision_function(X)
    np.testing.assert_allclose(decision, scores - fitted.offset_, rtol=1e-5)
    labels = fitted.predict(X)
    assert set(np.unique(labels)) <= {-1, 1}
    np.testing.assert_array_equal(labels == -1, decision < 0)
    assert (labels[y == -1] == -1).mean() > (labels[y == 1] == -1).mean()
    masks = fitted.predict_mask(X[24:26], threshold=float(np.median(scored[1])))
    assert masks.dtype == bool and masks.shape == (2, 64, 64)


def test_default_pixel_threshold(fitted, scored, defects):
    """The maps are gradients, not on the scores' scale: predict_mask's default threshold
    comes from the held-out good images' maps."""
    X, y, true_masks = defects
    assert 0 < fitted.pixel_threshold_ < -fitted.offset_
    maps = scored[1]
    masks = fitted.predict_mask(X)
    np.testing.assert_array_equal(masks, maps > fitted.pixel_threshold_)
    good, bad = y == 1, y == -1
    assert masks[good].mean() < 0.01
    assert masks[bad][true_masks[bad]].mean() > 3 * masks[bad][~true_masks[bad]].mean()


def test_letterbox_maps_on_each_images_pixels(tiny_set, rng_images):
    X, y = tiny_set
    det = DistillationDetector(**{**TINY, "resize_mode": "letterbox"}).fit(X[y == 1])
    images = [rng_images[0], rng_images[1][:30], rng_images[2][:, :20]]
    scores, maps = det.score_and_map(images)
    assert [m.shape for m in maps] == [(40, 56), (30, 56), (40, 20)]
    assert np.isfinite(scores).all() and all(np.isfinite(m).all() for m in maps)


# ------------------------------------------------------------------ scikit-learn contract
def test_clone_and_params():
    det = DistillationDetector(direction_weight=3.0, cloner_width=8)
    params = det.get_params()
    assert params["direction_weight"] == 3.0 and params["cloner_width"] == 8
    for name in ("image_size", "resize_mode", "max_epochs", "batch_size", "learning_rate",
                 "validation_fraction", "contamination", "device", "random_state", "verbose"):
        assert name in params
    copy = clone(det)
    assert copy.get_params() == params and copy is not det
    det.set_params(direction_weight=0.5)
    assert det.direction_weight == 0.5 and copy.direction_weight == 3.0
    assert DistillationDetector().image_size == 128


def test_grid_search_and_pipeline(tiny_set):
    X, y = tiny_set
    search = GridSearchCV(
        DistillationDetector(**TINY), {"learning_rate": [1e-3, 3e-3]},
        scoring=lambda est, X, y: image_auroc(y == -1, -est.score_samples(X)),
        cv=StratifiedKFold(2, shuffle=True, random_state=0), error_score="raise")
    search.fit(X, y)
    assert search.best_params_["learning_rate"] in (1e-3, 3e-3)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.n_train_images_ + \
        search.best_estimator_.n_validation_images_ == 12  # the -1 images are left out
    pipe = Pipeline([("det", DistillationDetector(**TINY))]).fit(X[y == 1])
    assert pipe.predict(X).shape == (18,)
    assert pipe.score_samples(X).shape == (18,)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("params, match", [
    (dict(layers=("blocks.9",)), "not valid for backbone"),
    (dict(layers=("blocks.2", "blocks.1")), "strictly increasing stride"),
    (dict(layers=("blocks.3", "blocks.4")), "strictly increasing stride"),
    (dict(layers=(),), "not valid for backbone"),
])
def test_bad_layers(tiny_set, params, match):
    X, y = tiny_set
    with pytest.raises(ValueError, match=match):
        DistillationDetector(**{**TINY, **params}).fit(X[y == 1])


@pytest.mark.parametrize("params", [
    dict(backbone="vgg16"), dict(direction_weight=-1.0), dict(attribution="lrp"),
    dict(cloner_width=0), dict(opening_size=0), dict(smoothgrad_noise=0.0),
    dict(image_size=16), dict(max_epochs=0), dict(layers="blocks.1"),
])
def test_bad_parameters(tiny_set, params):
    X, y = tiny_set
    with pytest.raises(InvalidParameterError):
        DistillationDetector(**{**TINY, **params}).fit(X[y == 1])


def test_too_few_images_and_unfitted(tiny_set):
    X, _ = tiny_set
    with pytest.raises(ValueError, match="at least 4 good training images"):
        DistillationDetector(**TINY).fit(X[:3])
    with pytest.raises(Exception, match="not fitted"):
        DistillationDetector(**TINY).score_samples(X)


# ------------------------------------------------------------------ properties
@settings(max_examples=4, deadline=None)
@given(st.permutations(list(range(6))))
def test_scores_and_maps_do_not_depend_on_the_order(fitted, scored, defects, order):
    X, _, _ = defects
    idx = np.array([0, 5, 24, 27, 30, 33])
    base_scores, base_maps = scored[0][idx], scored[1][idx]  # scored with other neighbours
    scores, maps = fitted.score_and_map(X[idx[order]])
    np.testing.assert_allclose(scores, base_scores[order], rtol=1e-5)
    np.testing.assert_allclose(maps, base_maps[order], rtol=1e-4, atol=1e-7)
    assert np.isfinite(maps).all() and (maps >= 0).all()
