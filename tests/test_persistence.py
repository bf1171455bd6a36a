import numpy as np
import pytest

from skpatchcore import (
    CoresetSampler,
    FeatureExtractor,
    PatchCoreDetector,
    load_model,
    make_patchcore,
    save_model,
)
from skpatchcore.persistence import FORMAT_VERSION


@pytest.fixture(scope="module")
def fitted_pipe(defects):
    X, _, _ = defects
    return make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0,
                          contamination=0.1).fit(X[:16])


def test_safe_round_trip_gives_identical_scores(defects, fitted_pipe, tmp_path):
    X, _, _ = defects
    path = save_model(fitted_pipe, tmp_path / "model")
    assert path.name == "model.npz"
    # loading never unpickles: the file holds only plain arrays
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = load_model(path)
    assert type(loaded) is type(fitted_pipe)
    np.testing.assert_array_equal(loaded.score_samples(X[16:]), fitted_pipe.score_samples(X[16:]))
    np.testing.assert_array_equal(loaded.predict(X[16:]), fitted_pipe.predict(X[16:]))
    assert loaded.get_params()["coreset__sampling_ratio"] == 0.1
    assert loaded[-1].offset_ == fitted_pipe[-1].offset_
    np.testing.assert_array_equal(loaded["coreset"].sample_indices_,
                                  fitted_pipe["coreset"].sample_indices_)


def test_single_estimators_and_tabular(tmp_path):
    X = np.random.RandomState(0).rand(40, 3)
    det = PatchCoreDetector(contamination=0.1).fit(X)
    loaded = load_model(save_model(det, tmp_path / "det.npz"))
    np.testing.assert_array_equal(loaded.predict(X), det.predict(X))
    sampler = CoresetSampler(0.5, random_state=0).fit(X)
    assert load_model(save_model(sampler, tmp_path / "s.npz")).coverage_radius_ == \
        sampler.coverage_radius_


def test_random_weights_are_stored(tmp_path, rng_images):
    fe = FeatureExtractor("resnet18", weights=None, image_size=32).fit()
    loaded = load_model(save_model(fe, tmp_path / "fe.npz"))
    np.testing.assert_array_equal(loaded.transform(rng_images), fe.transform(rng_images))


def test_calibrate_threshold_from_normal_images(defects, tmp_path):
    X, y, _ = defects
    pipe = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0).fit(X[:12])
    pipe.calibrate(X[12:24], fpr=0.25)
    normal_flags = (pipe.predict(X[12:24]) == -1).mean()
    assert normal_flags == pytest.approx(0.25, abs=1 / 12 + 1e-9)
    assert pipe[-1].calibration_fpr_ == 0.25
    loaded = load_model(save_model(pipe, tmp_path / "cal.npz"))
    assert loaded[-1].offset_ == pipe[-1].offset_
    with pytest.warns(UserWarning, match="fewer than one false positive"):
        pipe.calibrate(X[12:16], fpr=0.01)
    with pytest.raises(ValueError, match="fpr must be"):
        pipe.calibrate(X[12:16], fpr=1.5)


def test_corrupt_partial_and_foreign_files(fitted_pipe, tmp_path):
    path = save_model(fitted_pipe, tmp_path / "m.npz")
    partial = tmp_path / "partial.npz"
    partial.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a complete skpatchcore model"):
        load_model(partial)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a complete skpatchcore model"):
        load_model(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a skpatchcore model"):
        load_model(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.npz")


def test_newer_format_is_refused_with_reason(fitted_pipe, tmp_path, monkeypatch):
    import skpatchcore.persistence as persistence

    monkeypatch.setattr(persistence, "FORMAT_VERSION", FORMAT_VERSION + 1)
    path = save_model(fitted_pipe, tmp_path / "future.npz")
    monkeypatch.setattr(persistence, "FORMAT_VERSION", FORMAT_VERSION)
    with pytest.raises(ValueError, match="Upgrade skpatchcore"):
        load_model(path)


def test_changed_weights_are_detected_after_loading(fitted_pipe, tmp_path, defects):
    path = save_model(fitted_pipe, tmp_path / "m.npz")
    loaded = load_model(path)
    loaded["features"].weights_sha256_ = "f" * 64
    with pytest.raises(ValueError, match="SHA-256"):
        loaded.score_samples(defects[0][:1])


def test_unsaveable_parameters_say_what_to_do(tmp_path):
    det = PatchCoreDetector()
    sampler = CoresetSampler(random_state=np.random.RandomState(0))
    save_model(det, tmp_path / "ok.npz")
    with pytest.raises(ValueError, match="random_state=0"):
        save_model(sampler, tmp_path / "bad.npz")


def test_files_from_before_the_border_parameter_keep_their_features(defects, tmp_path):
    """A model saved before FeatureExtractor had ``border`` (and ``scales``) used no border
    replacement and one scale; it must load with border=0 and scales=(1.0,), not today's
    defaults, so its scores do not change."""
    import json

    from skpatchcore.persistence import _META_KEY

    X, _, _ = defects
    old = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0, border=0).fit(X[:8])
    path = save_model(old, tmp_path / "old.npz")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays[_META_KEY].tobytes().decode("utf-8"))
    features = meta["model"]["steps"][0][1]
    del features["params"]["border"], features["fitted"]["border_"]
    del features["params"]["scales"], features["fitted"]["scales_"]
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(tmp_path / "legacy.npz", **arrays)
    loaded = load_model(tmp_path / "legacy.npz")
    assert loaded[0].border == 0 and loaded[0].border_ == 0
    assert tuple(loaded[0].scales) == (1.0,) and tuple(loaded[0].scales_) == (1.0,)
    np.testing.assert_array_equal(loaded.score_samples(X[8:12]), old.score_samples(X[8:12]))


def test_pyramid_model_round_trips(defects, tmp_path):
    X, _, _ = defects
    pipe = make_patchcore(image_size=64, scales=(1.0, 0.5), sampling_ratio=0.1,
                          random_state=0).fit(X[:8])
    loaded = load_model(save_model(pipe, tmp_path / "pyramid.npz"))
    assert tuple(loaded[0].scales_) == (1.0, 0.5) and loaded[0].feature_dim_ == 2 * 168
    np.testing.assert_array_equal(loaded.score_samples(X[8:12]), pipe.score_samples(X[8:12]))
