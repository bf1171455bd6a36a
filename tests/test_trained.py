"""TrainedDetector, the base of the trained methods, through a minimal subclass.

The subclass below is a test double (a one-layer convolutional autoencoder whose squared
reconstruction error is the map), small enough to train in a fraction of a second; the three
real methods have their own test modules."""

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from skpatchcore._trained import SCORE_BATCH, TrainedDetector
from skpatchcore.datasets import make_defect_images


class Reconstruct(TrainedDetector):
    _parameter_constraints = dict(TrainedDetector._common_constraints)

    def __init__(self, *, image_size=32, resize_mode="letterbox", max_epochs=4, batch_size=4,
                 learning_rate=0.02, validation_fraction=0.25, contamination="auto",
                 device="cpu", random_state=0, verbose=False):
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.contamination = contamination
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _build(self):
        return {"ae": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(4, 3, 3, padding=1))}

    def _train(self, frames, rng):
        net = self._nets["ae"]
        opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
        losses = []
        for _ in range(self.max_epochs):
            total = 0.0
            for idx in self._batches(len(frames), rng):
                x = self._float(frames[idx], self._device())
                loss = ((net(x) - x) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / len(frames))
        return losses

    def _anomaly(self, x):
        with torch.no_grad():
            err = ((self._nets["ae"](x) - x) ** 2).mean(1)
        return err.flatten(1).amax(1).numpy(), err.numpy()


@pytest.fixture(scope="module")
def data():
    X, y, masks = make_defect_images(16, 6, image_size=32, random_state=0)
    return X, y, masks


@pytest.fixture(scope="module")
def fitted(data):
    X, y, _ = data
    return Reconstruct().fit(X[y == 1])


def test_fit_holds_out_images_and_sets_offset_from_them(fitted, data):
    X, y, _ = data
    assert fitted.n_validation_images_ == 4 and fitted.n_train_images_ == 12
    assert fitted.n_epochs_ == 4 and len(fitted.train_loss_) == 4
    assert fitted.train_loss_[-1] < fitted.train_loss_[0]
    assert fitted.weights_sha256_ is None
    # offset_ is Tukey's fence of the held-out images' scores ('auto'), which the
    # training images (seen in training) do not set
    again = Reconstruct(contamination=0.5).fit(X[y == 1])
    assert again.offset_ != fitted.offset_
    assert np.isfinite(fitted.offset_)


def test_pixel_threshold_is_the_contamination_rule_on_held_out_map_peaks(data):
    X, y, _ = data
    model = Reconstruct(contamination=0.25).fit(X[y == 1])
    # the held-out images are those the model did not train on: find them by refitting the
    # rule on the peaks of every good image's map and checking the held-out quantile
    rng = np.random.RandomState(0)
    held = np.sort(rng.permutation(int((y == 1).sum()))[:model.n_validation_images_])
    maps = model.predict_map(list(X[y == 1][held]), sigma=4.0)
    peaks = np.asarray(maps).max(axis=(1, 2))
    assert model.pixel_threshold_ == pytest.approx(np.percentile(peaks, 75.0), rel=1e-5)


def test_labels_leave_out_defects_and_refuse_other_values(fitted, data):
    X, y, _ = data
    with_defects = Reconstruct().fit(X, y)
    np.testing.assert_array_equal(with_defects.score_samples(X), fitted.score_samples(X))
    with pytest.raises(ValueError, match="1"):
        Reconstruct().fit(X, np.where(y == 1, 1, 0))


def test_too_few_images_is_a_clear_error(data):
    X, y, _ = data
    with pytest.raises(ValueError, match="at least 4 good training images"):
        Reconstruct().fit(X[:3])


def test_same_random_state_same_model_and_another_one_differs(fitted, data):
    X, y, _ = data
    np.testing.assert_array_equal(Reconstruct().fit(X[y == 1]).score_samples(X),
                                  fitted.score_samples(X))
    assert not np.array_equal(Reconstruct(random_state=1).fit(X[y == 1]).score_samples(X),
                              fitted.score_samples(X))


def test_signs_follow_isolation_forest(fitted, data):
    X, y, _ = data
    scores = fitted.score_samples(X)
    np.testing.assert_allclose(fitted.decision_function(X), scores - fitted.offset_)
    np.testing.assert_array_equal(fitted.predict(X),
                                  np.where(scores - fitted.offset_ < 0, -1, 1))
    assert scores.dtype == np.float64
    # the drawn defects reconstruct worse: lower score_samples
    assert scores[y == -1].mean() < scores[y == 1].mean()


def test_maps_on_each_images_own_pixels(fitted, data):
    X, _, _ = data
    images = [X[0], X[1][:20, :28], X[2]]
    scores, maps = fitted.score_and_map(images, sigma=0)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(32, 32), (20, 28), (32, 32)]
    np.testing.assert_array_equal(scores, fitted.score_samples(images))
    # the method's map is the image-level reduction's source: its max is the anomaly score
    assert np.isclose(maps[0].max(), -scores[0], rtol=1e-5)
    same = fitted.predict_map(images, sigma=0)
    assert all(np.array_equal(a, b) for a, b in zip(maps, same, strict=True))
    masks = fitted.predict_mask(images, sigma=0)
    assert all(np.array_equal(m, a > fitted.pixel_threshold_)
               for m, a in zip(masks, maps, strict=True))
    stacked = fitted.predict_map(X[:3], sigma=4.0)
    assert isinstance(stacked, np.ndarray) and stacked.shape == (3, 32, 32)


@settings(max_examples=5, deadline=None)
@given(chunk=st.integers(1, 9))
def test_chunks_give_the_scores_of_score_samples(fitted, data, chunk):
    X, _, _ = data
    parts = list(fitted.iter_score_and_grids(X[:9], chunk_size=chunk))
    assert [start for start, _, _ in parts] == list(range(0, 9, chunk))
    scores = np.concatenate([s for _, s, _ in parts])
    # network batches of another size round differently (float32), nothing more
    np.testing.assert_allclose(scores, fitted.score_samples(X[:9]), rtol=1e-5)
    default = np.concatenate([s for _, s, _ in fitted.iter_score_and_grids(X)])
    np.testing.assert_array_equal(default, fitted.score_samples(X))
    grids = np.concatenate([g for _, _, g in parts])
    assert grids.shape == (9, 32, 32) and (grids >= 0).all()


def test_scores_do_not_depend_on_the_scoring_batch(fitted, data):
    X, _, _ = data
    n = SCORE_BATCH + 3
    images = np.concatenate([X] * 2)[:n]
    np.testing.assert_allclose(fitted.score_samples(images)[:3],
                               fitted.score_samples(images[:3]), rtol=1e-6)


def test_calibrate_sets_the_threshold_from_normal_images(fitted, data):
    X, y, _ = data
    model = pickle.loads(pickle.dumps(fitted))
    model.calibrate(X[y == 1], fpr=0.25)
    assert model.offset_ == pytest.approx(np.quantile(model.score_samples(X[y == 1]), 0.25))
    assert model.calibration_n_samples_ == int((y == 1).sum())


def test_pickle_and_weights_round_trip(fitted, data):
    X, _, _ = data
    clone = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(clone.score_samples(X), fitted.score_samples(X))
    state = fitted.network_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert set(state) == {"ae.0.weight", "ae.0.bias", "ae.2.weight", "ae.2.bias"}
    rebuilt = pickle.loads(pickle.dumps(fitted))
    rebuilt.load_network_state(state)
    np.testing.assert_array_equal(rebuilt.score_samples(X), fitted.score_samples(X))
    with pytest.raises(ValueError, match="do not fit"):
        rebuilt.load_network_state({"ae.0.weight": state["ae.0.weight"]})


def test_training_leaves_the_callers_random_state_alone(data):
    X, y, _ = data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Reconstruct(max_epochs=1).fit(X[y == 1])
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_unfitted_and_bad_parameters_are_clear(data):
    X, _, _ = data
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        Reconstruct().score_samples(X)
    with pytest.raises(ValueError, match="max_epochs"):
        Reconstruct(max_epochs=0).fit(X)
    with pytest.raises(ValueError, match="validation_fraction"):
        Reconstruct(validation_fraction=0.9).fit(X)


def test_few_held_out_images_warn_that_the_thresholds_are_rough(data):
    X, y, _ = data
    with pytest.warns(UserWarning, match="Only 4 held-out good images set the thresholds"):
        Reconstruct().fit(X[y == 1])
