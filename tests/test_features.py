import pickle

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone

from skpatchcore import FeatureExtractor


@pytest.fixture(scope="module")
def fitted():
    return FeatureExtractor(image_size=48).fit()


def test_shapes_dtype_and_attributes(fitted, rng_images):
    F = fitted.transform(rng_images)
    assert F.shape == (3, 6, 6, 168) and F.dtype == np.float32
    assert fitted.grid_shape_ == (6, 6) and fitted.feature_dim_ == 168 and fitted.stride_ == 8
    assert fitted.layers_ == ["blocks.2", "blocks.4"]
    assert len(fitted.weights_sha256_) == 64
    assert np.isfinite(F).all() and F.std() > 0.01


def test_input_forms_give_identical_features(fitted, rng_images, tmp_path):
    X = rng_images
    ref = fitted.transform(X)
    paths = []
    for i, x in enumerate(X):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(x).save(paths[-1])
    for form in (
        paths,
        [Image.fromarray(x) for x in X],
        X / 255.0,
        list(X),
        torch.from_numpy(X).permute(0, 3, 1, 2),
    ):
        np.testing.assert_allclose(fitted.transform(form), ref, rtol=0, atol=1e-5)


def test_images_of_different_sizes_are_resized(fitted):
    rng = np.random.RandomState(1)
    X = [(rng.rand(h, w, 3) * 255).astype(np.uint8) for h, w in ((30, 60), (48, 48), (100, 20))]
    F = fitted.transform(X)
    assert F.shape == (3, 6, 6, 168)
    # each image's features are those of the image alone
    np.testing.assert_allclose(F[2], fitted.transform(X[2][None])[0], atol=1e-5)


def test_features_are_local(fitted):
    """A change in one corner leaves the stride-8 features of the far corner untouched."""
    rng = np.random.RandomState(0)
    a = (rng.rand(1, 128, 128, 3) * 255).astype(np.uint8)
    b = a.copy()
    b[0, :16, :16] = 255 - b[0, :16, :16]
    fe = clone(fitted).set_params(image_size=128, border=0).fit()
    Fa, Fb = fe.transform(a)[0], fe.transform(b)[0]
    assert np.abs(Fa[:2, :2] - Fb[:2, :2]).max() > 0.1
    np.testing.assert_allclose(Fa[-2:, -2:, :40], Fb[-2:, -2:, :40], atol=1e-6)
    # the deeper (stride-16) layer sees further, but still less at the far corner
    far = np.abs(Fa[-2:, -2:, 40:] - Fb[-2:, -2:, 40:]).mean()
    near = np.abs(Fa[:2, :2, 40:] - Fb[:2, :2, 40:]).mean()
    assert far < 0.1 * near


def test_patch_size_averages_neighbourhood():
    rng = np.random.RandomState(0)
    X = (rng.rand(2, 64, 64, 3) * 255).astype(np.uint8)
    F1 = np.asarray(FeatureExtractor(image_size=64, patch_size=1, layers=["blocks.2"],
                                     border=0).fit_transform(X))
    F3 = np.asarray(FeatureExtractor(image_size=64, patch_size=3, layers=["blocks.2"],
                                     border=0).fit_transform(X))
    # interior cell of the 3x3 average equals the mean of the 1x1 features around it
    np.testing.assert_allclose(F3[:, 3, 4], F1[:, 2:5, 3:6].mean(axis=(1, 2)), atol=1e-5)
    # border cells average only the existing neighbours
    np.testing.assert_allclose(F3[:, 0, 0], F1[:, :2, :2].mean(axis=(1, 2)), atol=1e-5)
    assert F1.var(axis=(1, 2)).mean() > F3.var(axis=(1, 2)).mean()


def test_crop_and_rectangular_size():
    X = np.zeros((1, 50, 80, 3), np.uint8)
    fe = FeatureExtractor(image_size=(64, 96), crop_size=(48, 64)).fit()
    assert fe.transform(X).shape == (1, 6, 8, 168)
    with pytest.raises(ValueError, match="crop_size.*larger than image_size"):
        FeatureExtractor(image_size=32, crop_size=48).fit()


def test_parameter_errors():
    with pytest.raises(ValueError, match="patch_size must be odd"):
        FeatureExtractor(patch_size=2).fit()
    with pytest.raises(ValueError, match="backbone"):
        FeatureExtractor(backbone="nope").fit()
    with pytest.raises(ValueError, match="not valid for backbone"):
        FeatureExtractor(layers=["layer9"]).fit()
    with pytest.raises(ValueError, match="cannot output 'pandas'"):
        FeatureExtractor().set_output(transform="pandas")
    assert FeatureExtractor().set_output(transform="default") is not None


def test_pickle_rebuilds_network_from_name(fitted, rng_images, tmp_path):
    ref = fitted.transform(rng_images)
    blob = pickle.dumps(fitted)
    assert len(blob) < 100_000  # weights are not embedded
    np.testing.assert_array_equal(pickle.loads(blob).transform(rng_images), ref)
    joblib.dump(fitted, tmp_path / "fe.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "fe.joblib").transform(rng_images), ref)


def test_pickle_detects_changed_weights(fitted):
    clone_ = pickle.loads(pickle.dumps(fitted))
    clone_.weights_sha256_ = "0" * 64
    with pytest.raises(ValueError, match="SHA-256.*refit"):
        clone_.transform(np.zeros((1, 16, 16, 1), np.uint8))


def test_random_weights_survive_pickle(rng_images):
    fe = FeatureExtractor("resnet18", weights=None, image_size=32).fit()
    again = pickle.loads(pickle.dumps(fe))
    np.testing.assert_array_equal(again.transform(rng_images), fe.transform(rng_images))


def test_transform_before_fit_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        FeatureExtractor().transform(np.zeros((1, 8, 8), np.uint8))


def test_border_cells_take_their_inner_neighbours_features():
    rng = np.random.RandomState(0)
    square = (rng.rand(1, 256, 256, 3) * 255).astype(np.uint8)
    F0 = FeatureExtractor(image_size=256, border=0).fit_transform(square)
    fe = FeatureExtractor(image_size=256).fit()
    assert fe.border_ == 2  # (3 // 2) * 16 // 8: the stride-16 neighbourhood reaches 2 cells
    F2 = fe.transform(square)
    inner = np.clip(np.arange(32), 2, 29)
    np.testing.assert_array_equal(F2[0], F0[0][inner][:, inner])
    np.testing.assert_array_equal(F2[0, 2:30, 2:30], F0[0, 2:30, 2:30])  # interior untouched
    assert FeatureExtractor(patch_size=1).fit().border_ == 1
    assert FeatureExtractor(layers=["blocks.2"]).fit().border_ == 1
    assert FeatureExtractor(patch_size=5).fit().border_ == 2  # one ring per 16 of 40 cells
    assert FeatureExtractor(patch_size=5, image_size=640).fit().border_ == 4
    assert FeatureExtractor(image_size=128).fit().border_ == 1
    assert FeatureExtractor(image_size=64).fit().border_ == 0  # 8 cells: all kept
    assert FeatureExtractor(image_size=64, border=3).fit().border_ == 3


def test_border_follows_the_image_inside_the_letterbox_and_crop():
    """A 32 x 64 image letterboxed into 64 x 64 covers rows 16..47, cell rows 2..5 (centres
    20..44); with border 1 rows 0..2 take row 3 and rows 5..7 take row 4."""
    rng = np.random.RandomState(1)
    wide = (rng.rand(1, 32, 64, 3) * 255).astype(np.uint8)
    F0 = FeatureExtractor(image_size=64, border=0).fit_transform(wide)
    F1 = FeatureExtractor(image_size=64, border=1).fit_transform(wide)
    rows, cols = np.array([3, 3, 3, 3, 4, 4, 4, 4]), np.clip(np.arange(8), 1, 6)
    np.testing.assert_array_equal(F1[0], F0[0][rows][:, cols])
    # a centre crop cuts the frame: the crop's edge is then the image's edge
    crop0 = FeatureExtractor(image_size=80, crop_size=64, resize_mode="stretch", border=0)
    crop1 = FeatureExtractor(image_size=80, crop_size=64, resize_mode="stretch", border=1)
    inner = np.clip(np.arange(8), 1, 6)
    np.testing.assert_array_equal(crop1.fit_transform(wide)[0],
                                  crop0.fit_transform(wide)[0][inner][:, inner])
    # a sliver thinner than a cell: every cell takes the one at its centre
    sliver = (rng.rand(1, 2, 64, 3) * 255).astype(np.uint8)
    Fs = FeatureExtractor(image_size=64, border=1).fit_transform(sliver)
    assert (Fs[0] == Fs[0, 4:5]).all()


def test_pyramid_levels_are_the_downscaled_inputs_features():
    """scales=(1.0, 0.5): the first block is the one-scale feature, the second the features of
    the half-size input, upsampled to the same grid."""
    rng = np.random.RandomState(3)
    X = (rng.rand(2, 64, 64, 3) * 255).astype(np.uint8)
    # float32: the comparison is exact to rounding (bfloat16 would blur it to ~2%)
    pyr = FeatureExtractor(image_size=64, border=0, scales=(1.0, 0.5), precision="float32").fit()
    assert pyr.scales_ == (1.0, 0.5) and pyr.feature_dim_ == 2 * 168
    F = pyr.transform(X)
    assert F.shape == (2, 8, 8, 336)
    one = FeatureExtractor(image_size=64, border=0, precision="float32").fit().transform(X)
    np.testing.assert_allclose(F[..., :168], one, atol=1e-5)
    half = FeatureExtractor(image_size=32, border=0, precision="float32").fit().transform(X)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(half).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear",
        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(F[..., 168:], up, atol=1e-4)


@pytest.mark.parametrize("scales", [(0.5,), (1.0, 0.0), (1.0, 1.5), (1.0, 1.0), (), ("a",)])
def test_bad_scales_are_refused(scales):
    with pytest.raises(ValueError, match="scales=.*starting with 1.0"):
        FeatureExtractor(image_size=64, scales=scales).fit()


def test_bfloat16_network_changes_scores_within_a_bound(defects):
    """precision='bfloat16' runs the network in bfloat16; the features stay within 5% (relative
    norm) of float32 ones; image scores (a different coreset, a maximum over patches) move
    by 3% at the median and 12% at most, and defects rank the same."""
    from sklearn.metrics import roc_auc_score

    from skpatchcore import make_patchcore

    X, y, _ = defects
    feats = {p: FeatureExtractor(image_size=64, precision=p).fit().transform(X[:8])
             for p in ("float32", "bfloat16")}
    rel = np.linalg.norm(feats["bfloat16"] - feats["float32"]) / np.linalg.norm(
        feats["float32"])
    assert 0 < rel < 0.05
    scores = {p: make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0,
                                precision=p).fit(X[:16]).score_samples(X[16:])
              for p in ("float32", "bfloat16")}
    change = np.abs(scores["bfloat16"] / scores["float32"] - 1)
    assert np.median(change) < 0.03 and change.max() < 0.12
    assert roc_auc_score(y[16:], scores["bfloat16"]) == roc_auc_score(y[16:],
                                                                       scores["float32"])


def test_jit_changes_features_only_by_rounding(defects):
    """jit=True (fused CPU graphs) and jit=False (eager) give the same features: to float
    rounding in float32, within bfloat16's own rounding in bfloat16; every batch alike."""
    X, _, _ = defects
    for precision, bound in (("float32", 1e-5), ("bfloat16", 0.02)):
        feats = {jit: FeatureExtractor(image_size=64, precision=precision, jit=jit).fit()
                 .transform(X[:5]) for jit in (False, True)}
        rel = np.linalg.norm(feats[True] - feats[False]) / np.linalg.norm(feats[False])
        assert rel < bound, (precision, rel)
    fe = FeatureExtractor(image_size=64, precision="bfloat16", batch_size=2).fit()
    np.testing.assert_array_equal(fe.transform(X[:5]), fe.transform(X[:5]))
    np.testing.assert_array_equal(fe.transform(X[4:5])[0], fe.transform(X[:5])[4])


def test_precision_auto_is_fixed_at_fit_and_saved(tmp_path):
    from skpatchcore import load_model, save_model
    from skpatchcore.features import _native_bfloat16

    fe = FeatureExtractor(image_size=32, precision="auto").fit()
    expected = "bfloat16" if _native_bfloat16(fe._device) else "float32"
    assert fe.precision_ == expected
    assert load_model(save_model(fe, tmp_path / "fe.npz")).precision_ == expected
    assert FeatureExtractor(image_size=32, precision="float32").fit().precision_ == "float32"
