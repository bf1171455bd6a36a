import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import FocusDistributionDetector, load_model, save_model
from skpatchcore._images import check_images
from skpatchcore.fyd import (
    _affine,
    _alignment_loss,
    _compose,
    _FeatureAligners,
    _ImageAligner,
    _invert,
    _non_contrastive_loss,
    _warp,
)
from skpatchcore.metrics import image_auroc
from skpatchcore.padim import PaDiMDetector

#: A tiny setting that trains in a few seconds on 2 CPU cores.
TINY = dict(image_size=64, max_epochs=3, batch_size=8, n_features=40, random_state=0)


@pytest.fixture(scope="module")
def fitted(defects):
    X, y, _ = defects
    return FocusDistributionDetector(**TINY).fit(X[y == 1])


@pytest.fixture(scope="module")
def test_scores(fitted, defects):
    X, _, _ = defects
    return fitted.score_and_map(X)


# ------------------------------------------------------------------ the losses
def test_alignment_loss_is_the_mean_pairwise_pixel_l2():
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.rand(4, 3, 5, 6).astype(np.float32))
    expected = np.mean([np.sqrt(((images[a] - images[b]).numpy() ** 2).sum(0) + 1e-8).mean()
                        for a in range(4) for b in range(4) if a != b])
    assert float(_alignment_loss(images)) == pytest.approx(expected, rel=1e-5)


def test_non_contrastive_loss_is_the_mean_pairwise_negative_cosine():
    rng = np.random.RandomState(1)
    p = torch.from_numpy(rng.randn(5, 7, 3, 4).astype(np.float32))
    z = torch.from_numpy(rng.randn(5, 7, 3, 4).astype(np.float32))
    cos = torch.nn.functional.cosine_similarity
    expected = np.mean([-cos(p[i], z[j], dim=0).mean().item()
                        for i in range(5) for j in range(5) if i != j])
    assert float(_non_contrastive_loss(p, z)) == pytest.approx(expected, rel=1e-5)


def test_non_contrastive_loss_stops_the_gradient_of_the_projection():
    p = torch.randn(3, 4, 2, 2, requires_grad=True)
    z = torch.randn(3, 4, 2, 2, requires_grad=True)
    _non_contrastive_loss(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_alignment_loss_is_zero_for_identical_images():
    images = torch.rand(1, 3, 8, 8).repeat(3, 1, 1, 1)
    assert float(_alignment_loss(images)) < 1e-3


# ------------------------------------------------------------------ the transformers
def test_transformers_start_at_the_identity():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    stn = _ImageAligner().eval()
    theta = stn.theta(x)
    assert torch.equal(theta, _affine(torch.zeros(3, 4), stn.bounds))
    torch.testing.assert_close(stn(x, theta), x, rtol=0, atol=1e-5)
    fmaps = [torch.randn(3, 5, 8, 8), torch.randn(3, 7, 4, 4)]
    aligned, _, _ = _FeatureAligners([5, 7]).eval()(fmaps)
    for a, f in zip(aligned, fmaps, strict=True):
        torch.testing.assert_close(a, f, rtol=0, atol=1e-5)


def test_transforms_are_bounded():
    bounds = (0.1, 0.2, np.log(1.1))
    theta = _affine(torch.tensor([[50.0, -50.0, 50.0, 50.0]]), bounds)[0]
    scale = float(torch.linalg.det(theta[:, :2]).sqrt())
    assert scale == pytest.approx(1.1, rel=1e-4)
    assert float(torch.atan2(theta[1, 0], theta[0, 0])) == pytest.approx(0.1, rel=1e-4)
    torch.testing.assert_close(theta[:, 2], torch.tensor([-0.2, 0.2]))


def test_the_inverse_of_a_composition_warps_back():
    torch.manual_seed(0)
    outer = _affine(torch.randn(2, 4), (0.3, 0.1, 0.1))
    inner = _affine(torch.randn(2, 4), (0.1, 0.1, 0.05))
    both = _compose(outer, inner)
    p = torch.tensor([0.3, -0.2, 1.0])
    step = inner[0] @ p
    torch.testing.assert_close(both[0] @ p, outer[0] @ torch.cat([step, torch.ones(1)]))
    identity = _compose(both, _invert(both))
    torch.testing.assert_close(identity, _affine(torch.zeros(2, 4), (1, 1, 1)))
    # a smooth image warped and warped back is unchanged away from the border
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64),
                            indexing="ij")
    img = torch.sin(3 * xx + 2 * yy)[None, None].repeat(2, 1, 1, 1)
    back = _warp(_warp(img, both, "border"), _invert(both), "border")
    torch.testing.assert_close(back[..., 16:48, 16:48], img[..., 16:48, 16:48], rtol=0,
                               atol=0.05)


# ------------------------------------------------------------------ training and scores
def test_training_lowers_both_losses(fitted):
    assert fitted.n_epochs_ == TINY["max_epochs"] == len(fitted.train_loss_)
    assert len(fitted.image_alignment_loss_) == TINY["max_epochs"]
    assert fitted.train_loss_[-1] < fitted.train_loss_[0]
    assert min(fitted.train_loss_) >= -1.0
    assert np.all(np.isfinite(fitted.image_alignment_loss_))


def test_image_alignment_aligns_shifted_copies():
    """Phase 1 alone on copies of one bright square at random places: the image-level
    transformer learns to bring them together (its loss falls, and so does the spread of
    the squares' centres)."""
    rng = np.random.RandomState(0)
    yy, xx = (np.mgrid[:64, :64] + 0.5) / 32.0 - 1  # grid_sample's coordinates
    centres = rng.uniform(-0.25, 0.25, size=(16, 2))
    squares = ((np.abs(xx - centres[:, :1, None]) < 0.3)
               & (np.abs(yy - centres[:, 1:, None]) < 0.3))
    frames = torch.from_numpy(np.repeat(squares[:, None], 3, 1).astype(np.uint8) * 255)
    det = FocusDistributionDetector(max_epochs=20, batch_size=8, learning_rate=1e-2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        det._nets = det._build()
    losses = det._train_image_alignment(frames, rng, torch.device("cpu"))
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses

    def spread(images):
        mass = images[:, 0] / images[:, 0].sum(dim=(1, 2), keepdim=True)
        grid = torch.from_numpy(np.stack([xx, yy])).float()
        centre = (mass[:, None] * grid).sum(dim=(2, 3))
        return float(centre.std(dim=0).sum())

    with torch.no_grad():
        aligned, _ = det._align_images(frames.float() / 255)
    assert spread(aligned) < 0.7 * spread(frames.float() / 255), (
        spread(aligned), spread(frames.float() / 255))


def test_fitted_attributes(fitted, defects):
    X, y, _ = defects
    n_good = int((y == 1).sum())
    assert fitted.n_train_images_ + fitted.n_validation_images_ == n_good
    assert fitted.grid_shape_ == (8, 8)  # 64 px, stride 8
    dim = TINY["n_features"]
    assert fitted.feature_indices_.shape == (dim,)
    assert np.all(np.diff(fitted.feature_indices_) > 0)
    assert fitted.mean_.shape == (8, 8, dim) and fitted.mean_.dtype == np.float64
    assert fitted.cholesky_.shape == (8, 8, dim, dim)
    assert np.allclose(np.triu(fitted.cholesky_, 1), 0.0)
    assert set(fitted._fitted_arrays()) == {"feature_indices_", "mean_", "cholesky_"}
    for key, (dtype, shape) in fitted._fitted_arrays().items():
        value = getattr(fitted, key)
        assert value.dtype == dtype and value.ndim == len(shape)
    assert isinstance(fitted.weights_sha256_, str) and len(fitted.weights_sha256_) == 64
    # the stored weights: the transformers and the adapter, not the training heads
    assert {k.split(".")[0] for k in fitted.network_state()} == {
        "image_stn", "feature_stn", "adapter"}


def test_gaussians_are_padim_on_the_trained_features(fitted, defects):
    """The Gaussians are PaDiM's, fitted on the adapted features of the training images
    after training: PaDiMDetector on those features has the same means and factors, and
    every image's score is PaDiM's largest distance."""
    X, y, _ = defects
    good = X[y == 1]
    with torch.no_grad():
        x = fitted._float(fitted._frames(check_images(good)), torch.device("cpu"))
        aligned, _ = fitted._align_images(x)
        e, _, _ = fitted._encode(fitted._backbone_maps(aligned))
    grids = e.index_select(1, torch.as_tensor(fitted.feature_indices_))
    grids = grids.permute(0, 2, 3, 1).numpy()
    # TrainedDetector's split: the first n_validation_images_ of a permutation are held out
    order = np.random.RandomState(TINY["random_state"]).permutation(len(good))
    kept = np.sort(order[fitted.n_validation_images_:])
    ref = PaDiMDetector(n_features=None, reg=fitted.reg).fit(grids[kept])
    # the same features up to float32 rounding (computed in other batches here)
    np.testing.assert_allclose(ref.mean_, fitted.mean_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref.cholesky_, fitted.cholesky_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref.score_samples(grids), fitted.score_samples(good),
                               rtol=1e-4)


def test_defects_score_higher(fitted, test_scores, defects):
    X, y, masks = defects
    scores, maps = test_scores
    auroc = image_auroc(y == -1, -scores)
    assert auroc >= 0.9, auroc
    bad = y == -1
    inside = np.mean([m[k].mean() for m, k in zip(maps[bad], masks[bad], strict=True)])
    outside = np.mean([m[~k].mean() for m, k in zip(maps[bad], masks[bad], strict=True)])
    assert inside > 1.5 * outside, (inside, outside)
    assert maps.shape == (len(X), 64, 64) and maps.dtype == np.float32


def test_signs_and_offset(fitted, test_scores, defects):
    X, y, _ = defects
    scores, _ = test_scores
    np.testing.assert_array_equal(fitted.score_samples(X), scores)
    decision = fitted.decision_function(X)
    np.testing.assert_allclose(decision, scores - fitted.offset_)
    pred = np.where(decision < 0, -1, 1)
    assert (pred[y == -1] == -1).mean() > (pred[y == 1] == -1).mean()
    pick = np.r_[0, 1, 30, 31]
    np.testing.assert_array_equal(fitted.predict(X[pick]), pred[pick])


def test_same_random_state_gives_identical_scores(fitted, test_scores, defects):
    X, y, _ = defects
    again = FocusDistributionDetector(**TINY).fit(X[y == 1])
    pick = np.r_[0, 1, 30, 31]
    np.testing.assert_array_equal(again.score_samples(X[pick]), test_scores[0][pick])
    assert again.train_loss_ == fitted.train_loss_


def test_labels_leave_defects_out(defects):
    X, y, _ = defects
    keep = np.r_[np.flatnonzero(y == 1)[:8], np.flatnonzero(y == -1)[:3]]
    params = {**TINY, "max_epochs": 1}
    with_y = FocusDistributionDetector(**params).fit(X[keep], y[keep])
    good = FocusDistributionDetector(**params).fit(X[keep][y[keep] == 1])
    np.testing.assert_array_equal(with_y.score_samples(X[:4]), good.score_samples(X[:4]))


# ------------------------------------------------------------------ persistence
def test_pickle_round_trip(fitted, test_scores, defects):
    X, _, _ = defects
    again = pickle.loads(pickle.dumps(fitted))
    scores, maps = again.score_and_map(X)
    np.testing.assert_array_equal(scores, test_scores[0])
    np.testing.assert_array_equal(maps, test_scores[1])


def test_save_and_load_model(fitted, test_scores, defects, tmp_path):
    X, _, _ = defects
    save_model(fitted, tmp_path / "fyd.skpc")
    loaded = load_model(tmp_path / "fyd.skpc")
    assert type(loaded) is FocusDistributionDetector
    scores, maps = loaded.score_and_map(X)
    np.testing.assert_array_equal(scores, test_scores[0])
    np.testing.assert_array_equal(maps, test_scores[1])
    assert loaded.offset_ == fitted.offset_


# ------------------------------------------------------------------ scikit-learn contract
def test_clone_and_params():
    det = FocusDistributionDetector(n_features=7, max_epochs=2)
    twin = clone(det)
    assert twin.get_params() == det.get_params()
    assert twin.set_params(reg=0.5).reg == 0.5
    assert det.reg == 0.01
    with pytest.raises(NotFittedError):
        det.score_samples(np.zeros((1, 64, 64, 3), dtype=np.uint8))


def test_grid_search_and_pipeline(defects):
    X, y, _ = defects
    idx = np.r_[np.arange(10), np.arange(24, 28)]  # 10 good, 4 defective
    search = GridSearchCV(
        FocusDistributionDetector(**{**TINY, "max_epochs": 1}),
        {"learning_rate": [1e-3, 1e-2]},
        scoring=lambda est, X, y: image_auroc(y == -1, -est.score_samples(X)),
        cv=StratifiedKFold(2, shuffle=True, random_state=0))
    search.fit(X[idx], y[idx])
    assert search.best_params_["learning_rate"] in (1e-3, 1e-2)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    pipe = Pipeline([("det", FocusDistributionDetector(**{**TINY, "max_epochs": 1}))])
    pipe.fit(X[:8])
    assert pipe.predict(X[:3]).shape == (3,)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("params", [
    {"batch_size": 1}, {"backbone": "resnet18"}, {"n_features": 0}, {"reg": -1.0},
    {"image_size": 16}, {"max_epochs": 0}])
def test_bad_parameters(params, defects):
    X, _, _ = defects
    with pytest.raises(InvalidParameterError):
        FocusDistributionDetector(**params).fit(X[:6])


def test_too_few_images(defects):
    X, _, _ = defects
    with pytest.raises(ValueError, match="at least 4 good training images"):
        FocusDistributionDetector(**TINY).fit(X[:3])


def test_singular_covariance_names_the_fix(defects):
    X, _, _ = defects
    with pytest.raises(ValueError, match="use reg > 0"):
        FocusDistributionDetector(**{**TINY, "max_epochs": 1, "reg": 0.0}).fit(X[:6])


# ------------------------------------------------------------------ properties
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(list(range(6))))
def test_scores_do_not_depend_on_the_batch(order, fitted, test_scores, defects):
    X, _, _ = defects
    pick = np.array([0, 5, 11, 24, 30, 35])[list(order)]
    scores, maps = fitted.score_and_map(X[pick])
    np.testing.assert_allclose(scores, test_scores[0][pick], rtol=1e-6)
    np.testing.assert_allclose(maps, test_scores[1][pick], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(maps)) and np.all(maps >= 0)
