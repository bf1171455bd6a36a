"""save_model / load_model: round trips, and every way a file can be damaged, edited,
half-written or missing (one clear ValueError / FileNotFoundError / OSError naming the file)."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import all_detectors
from sklearn.base import clone
from sklearn.pipeline import Pipeline

import skpatchcore.persistence as persistence
from skpatchcore import (
    CoresetSampler,
    FeatureExtractor,
    PaDiMDetector,
    PatchCoreDetector,
    PatchCorePipeline,
    SPADEDetector,
    load_model,
    make_patchcore,
    save_model,
)
from skpatchcore.persistence import _META_KEY, FORMAT_VERSION

ROWS = np.random.RandomState(0).rand(40, 3)
SAVE_AGAIN = "save the model again"


def _read(path):
    """(metadata dict, arrays) of a model file, as an editor of the file would read it."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return json.loads(arrays.pop(_META_KEY).tobytes().decode("utf-8")), arrays


def _meta_bytes(meta):
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def _write(path, meta, arrays):
    """Re-save (edited) metadata and arrays with plain numpy; an array already under the
    metadata key (a test replacing it wholesale) wins."""
    np.savez(path, **{_META_KEY: _meta_bytes(meta), **arrays})
    return path


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
    with pytest.raises(ValueError, match="not a complete skpatchcore model file: the .npz "
                                         "archive is truncated or damaged"):
        load_model(partial)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a complete skpatchcore model file: it is not an "
                                         ".npz"):
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
    old = make_patchcore(image_size=64, sampling_ratio=0.1, random_state=0, border=0,
                         jit=False).fit(X[:8])
    path = save_model(old, tmp_path / "old.npz")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays[_META_KEY].tobytes().decode("utf-8"))
    features = meta["model"]["steps"][0][1]
    del features["params"]["border"], features["fitted"]["border_"]
    del features["params"]["scales"], features["fitted"]["scales_"]
    del features["params"]["jit"]  # and before jit: the eager network it was scored with
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(tmp_path / "legacy.npz", **arrays)
    loaded = load_model(tmp_path / "legacy.npz")
    assert loaded[0].border == 0 and loaded[0].border_ == 0
    assert tuple(loaded[0].scales) == (1.0,) and tuple(loaded[0].scales_) == (1.0,)
    assert loaded[0].jit is False
    np.testing.assert_array_equal(loaded.score_samples(X[8:12]), old.score_samples(X[8:12]))


def test_pyramid_model_round_trips(defects, tmp_path):
    X, _, _ = defects
    pipe = make_patchcore(image_size=64, scales=(1.0, 0.5), sampling_ratio=0.1,
                          random_state=0).fit(X[:8])
    loaded = load_model(save_model(pipe, tmp_path / "pyramid.npz"))
    assert tuple(loaded[0].scales_) == (1.0, 0.5) and loaded[0].feature_dim_ == 2 * 168
    np.testing.assert_array_equal(loaded.score_samples(X[8:12]), pipe.score_samples(X[8:12]))


# ------------------------------------------------------------------- round trips (item 5)
@pytest.mark.parametrize("rows", [False, True], ids=["grids", "rows"])
@pytest.mark.parametrize("detector", all_detectors(),
                         ids=lambda d: f"{type(d).__name__}-{d.get_params().get('image_score')}")
def test_every_detector_round_trips_with_identical_scores(detector, rows, grid_data, tmp_path):
    train, test, _ = grid_data
    if rows:
        train, test = train[:, 0, 0], test[:, 2, 3]
    detector = clone(detector).fit(train)
    detector.calibrate(test[:4], fpr=0.25)
    loaded = load_model(save_model(detector, tmp_path / "det"))
    assert type(loaded) is type(detector) and loaded.get_params() == detector.get_params()
    # scores of new samples and, for rows, of the training rows (leave-one-out rule)
    for X in (test, train):
        np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))
    assert (loaded.offset_, loaded.calibration_fpr_, loaded.calibration_n_samples_) == (
        detector.offset_, 0.25, 4)
    if not rows:
        np.testing.assert_array_equal(loaded.predict_map(test), detector.predict_map(test))


def test_pipeline_of_rows_round_trips(tmp_path):
    pipe = Pipeline([("coreset", CoresetSampler(0.5, random_state=0)),
                     ("detector", PatchCoreDetector(contamination=0.1))]).fit(ROWS)
    loaded = load_model(save_model(pipe, tmp_path / "rows"))
    assert type(loaded) is Pipeline and [n for n, _ in loaded.steps] == ["coreset", "detector"]
    np.testing.assert_array_equal(loaded.score_samples(ROWS), pipe.score_samples(ROWS))


def test_string_arrays_round_trip_without_pickle(tmp_path):
    """scikit-learn keeps feature names as an object array of str; np.savez would pickle it
    and the file could not be loaded with allow_pickle=False."""
    det = PatchCoreDetector().fit(ROWS)
    det.feature_names_in_ = np.array(["a", "b", "c"], dtype=object)
    path = save_model(det, tmp_path / "named")
    with np.load(path, allow_pickle=False) as npz:
        assert npz["feature_names_in_"].dtype.kind == "U"
    loaded = load_model(path)
    assert loaded.feature_names_in_.dtype == object
    assert loaded.feature_names_in_.tolist() == ["a", "b", "c"]
    det.feature_names_in_ = np.array([1, "b", None], dtype=object)
    with pytest.raises(ValueError, match="feature_names_in_ is an array of Python objects"):
        save_model(det, tmp_path / "objects")
    assert not (tmp_path / "objects.npz").exists()


def test_padim_rows_from_before_train_row_samples_still_score(tmp_path):
    """PaDiM files written before ``train_row_samples_`` existed hold only the row digests;
    they load and give the same leave-one-out scores on training rows."""
    det = PaDiMDetector(n_features=2, random_state=0).fit(ROWS)
    meta, arrays = _read(save_model(det, tmp_path / "padim"))
    del meta["model"]["fitted"]["train_row_samples_"], arrays["train_row_samples_"]
    loaded = load_model(_write(tmp_path / "old.npz", meta, arrays))
    np.testing.assert_array_equal(loaded.score_samples(ROWS), det.score_samples(ROWS))
    new = ROWS + 0.5
    np.testing.assert_array_equal(loaded.score_samples(new), det.score_samples(new))


def test_patchcore_rows_from_before_the_leave_one_out_record_still_load(tmp_path):
    det = PatchCoreDetector().fit(ROWS)
    meta, arrays = _read(save_model(det, tmp_path / "pc"))
    for key in ("bank_sample_index_", "train_row_keys_", "train_row_samples_"):
        del meta["model"]["fitted"][key], arrays[key]
    loaded = load_model(_write(tmp_path / "old.npz", meta, arrays))
    assert loaded.train_row_keys_ is None and loaded.bank_sample_index_ is None
    new = ROWS + 0.5
    np.testing.assert_array_equal(loaded.score_samples(new), det.score_samples(new))


# ---------------------------------------------------- malformed files (item 1, all ValueError)
@pytest.fixture(scope="module")
def saved(fitted_pipe, grid_data, tmp_path_factory):
    """One file of each kind, to be edited by the tests."""
    train, _, _ = grid_data
    folder = tmp_path_factory.mktemp("saved")
    models = {
        "pipe": fitted_pipe,  # features -> coreset -> PatchCore, on images
        "rows": PatchCoreDetector(contamination=0.1).fit(ROWS).calibrate(ROWS[:20], fpr=0.1),
        "spade": SPADEDetector().fit(train),
        "padim": PaDiMDetector(n_features=2, random_state=0).fit(ROWS),
        "rows_pipe": Pipeline([("coreset", CoresetSampler(0.5, random_state=0)),
                               ("detector", PatchCoreDetector())]).fit(ROWS),
        "random_fe": FeatureExtractor("resnet18", weights=None, image_size=32).fit(),
    }
    return {name: save_model(model, folder / name) for name, model in models.items()}


def _step(meta, name):
    return dict(meta["model"]["steps"])[name]


def _set(getter, key, value):
    """A mutation that sets ``getter(meta)[key] = value``."""
    def mutate(meta, arrays):
        getter(meta)[key] = value
    return mutate


def _drop(getter, key):
    def mutate(meta, arrays):
        del getter(meta)[key]
    return mutate


def _array(key, change):
    def mutate(meta, arrays):
        arrays[key] = change(arrays[key])
    return mutate


def _raw_meta(data):
    def mutate(meta, arrays):
        arrays[_META_KEY] = data
    return mutate


def _nested_pipeline(depth):
    def mutate(meta, arrays):
        inner = meta["model"]
        for _ in range(depth):
            inner = {"class": "Pipeline", "steps": [["p", inner]], "params": {}}
        meta["model"] = inner
    return mutate


def _swap_last_two_steps(meta, arrays):
    steps = meta["model"]["steps"]
    steps[-2], steps[-1] = steps[-1], steps[-2]


def _mismatched_detector(meta, arrays):
    """A detector fitted on 7 features behind an extractor that makes 168."""
    _step(meta, "detector")["fitted"]["n_features_in_"] = 7
    arrays["detector/memory_bank_"] = np.ones((5, 7), dtype=np.float32)
    arrays["detector/bank_sample_index_"] = np.zeros(5, dtype=np.int64)


def _nan_at_first(a):
    a = a.copy()
    a.flat[0] = np.nan
    return a


def _model(meta):
    return meta["model"]


def _params(meta):
    return meta["model"]["params"]


def _fitted(meta):
    return meta["model"]["fitted"]


def _top(meta):
    return meta


def _seq(*items, tuple_=True):
    """A list or tuple as save_model writes it."""
    return {"__tuple__": tuple_, "items": list(items)}


def _in_step(name, part):
    return lambda meta: _step(meta, name)[part]


F_PARAMS, F_FITTED = _in_step("features", "params"), _in_step("features", "fitted")
C_PARAMS, C_FITTED = _in_step("coreset", "params"), _in_step("coreset", "fitted")

MALFORMED = [
    # the metadata itself
    ("rows", _drop(_top, "format_version"), "its metadata has no format_version"),
    ("rows", _set(_top, "format_version", "1"), "format_version must be a positive integer, "
                                                "got the string '1'"),
    ("rows", _set(_top, "format_version", None), "format_version must be a positive integer, "
                                                 "got null"),
    ("rows", _set(_top, "format_version", 1.0), "got the number 1.0"),
    ("rows", _set(_top, "format_version", True), "got the boolean True"),
    ("rows", _set(_top, "format_version", 0), "got the number 0"),
    ("rows", _set(_top, "format_version", FORMAT_VERSION + 1), "Upgrade skpatchcore"),
    ("rows", _raw_meta(_meta_bytes([1, 2])), "its metadata must be a JSON object, got the "
                                             "list [1, 2]"),
    ("rows", _raw_meta(_meta_bytes("model")), "its metadata must be a JSON object"),
    ("rows", _raw_meta(np.frombuffer(b"{not json", np.uint8)), "its metadata is not valid JSON"),
    ("rows", _raw_meta(np.frombuffer(b"\xff\xfe{}", np.uint8)), "UnicodeDecodeError"),
    ("rows", _raw_meta(np.frombuffer(b"[" * 100_000, np.uint8)), "RecursionError"),
    ("rows", _raw_meta(np.zeros(4)), "its metadata must be a 1-D uint8 array"),
    ("rows", _drop(_top, "model"), "its metadata has no 'model' entry"),
    ("rows", _set(_top, "model", [1]), "model must be a JSON object describing an estimator, "
                                       "got the list [1]"),
    ("rows", _set(_top, "model", "PatchCoreDetector"), "got the string 'PatchCoreDetector'"),
    ("rows", _set(_top, "model", None), "describing an estimator, got null"),
    # class and parameters
    ("rows", _drop(_model, "class"), "model has no 'class' entry"),
    ("rows", _set(_model, "class", "builtins.eval"), "names the class 'builtins.eval', which "
                                                     "is not one of"),
    ("rows", _set(_model, "class", 3), "names the class the number 3"),
    ("rows", _set(_model, "params", []), "params must be a JSON object, got the list []"),
    ("rows", _drop(_model, "params"), "params must be a JSON object, got nothing"),
    ("rows", _set(_params, "foo", 1), "has parameters ['foo'] that PatchCoreDetector does not "
                                      "take"),
    ("rows", _set(_params, "n_neighbors", "many"), "The 'n_neighbors' parameter of "
                                                   "PatchCoreDetector must be"),
    ("rows", _set(_params, "contamination", 0.9), "The 'contamination' parameter of "
                                                  "PatchCoreDetector must be"),
    ("rows", _set(_params, "n_neighbors", {"a": 1}), "parameter 'n_neighbors' is the object"),
    ("pipe", _set(F_PARAMS, "scales", {"__tuple__": True}), "parameter 'scales' is the object"),
    ("pipe", _set(C_PARAMS, "sampling_ratio", 2.0), "The 'sampling_ratio' parameter of "
                                                    "CoresetSampler must be"),
    # fitted attributes: structure and array references
    ("rows", _set(_model, "fitted", []), "fitted must be a JSON object, got the list []"),
    ("rows", _set(_fitted, "__class__", 1), "'__class__' is not a fitted attribute name"),
    ("rows", _set(_fitted, "memory_bank_", {"__array__": "nope"}),
     "memory_bank_ refers to array 'nope', which is not in the file"),
    ("rows", _set(_fitted, "memory_bank_", {"__array__": 3}), "not a reference to an array"),
    ("rows", _drop(_fitted, "memory_bank_"), "is fitted but has no memory_bank_"),
    # memory-bank detectors
    ("rows", _array("memory_bank_", lambda a: a.astype(np.int64)),
     "memory_bank_ must be a float array of shape (n_rows, 3), got an array of dtype int64"),
    ("rows", _array("memory_bank_", np.ravel), "memory_bank_ must be a float array of shape "
                                               "(n_rows, 3), got an array of dtype float32 and "
                                               "shape (120,)"),
    ("rows", _array("memory_bank_", lambda a: a[:, :2]), "shape (40, 2)"),
    ("rows", _array("memory_bank_", lambda a: a[:0]), "shape (0, 3)"),
    ("rows", _array("memory_bank_", _nan_at_first), "memory_bank_ contains NaN or infinite"),
    ("rows", _set(_fitted, "n_features_in_", 4), "memory_bank_ must be a float array of shape "
                                                 "(n_rows, 4)"),
    ("rows", _set(_fitted, "n_features_in_", "3"), "n_features_in_ must be an integer >= 1, "
                                                   "got the string '3'"),
    ("rows", _set(_fitted, "offset_", "x"), "offset_ must be a finite number, got the string"),
    ("rows", _set(_fitted, "offset_", None), "offset_ must be a finite number, got null"),
    ("rows", _set(_fitted, "offset_", float("nan")), "offset_ must be a finite number, got the "
                                                     "number nan"),
    ("rows", _drop(_fitted, "offset_"), "is fitted but has no offset_"),
    ("rows", _set(_fitted, "calibration_fpr_", 2), "calibration_fpr_ must be a finite number "
                                                   "in [0.0, 1.0]"),
    ("rows", _array("bank_sample_index_", lambda a: a[:5]),
     "bank_sample_index_ must be an integer array of shape (40,) or null"),
    ("rows", _array("bank_sample_index_", lambda a: a - 100), "bank_sample_index_ holds values "
                                                              "outside >= 0"),
    ("rows", _array("train_row_keys_", lambda a: a.astype(float)),
     "train_row_keys_ must be an unsigned integer array"),
    ("rows", _array("train_row_keys_", lambda a: a[::-1]), "train_row_keys_ must be sorted"),
    ("rows", _set(_fitted, "train_row_samples_", None), "train_row_keys_ and "
                                                        "train_row_samples_ must be two arrays"),
    ("spade", _array("image_features_", lambda a: a[:, :3]),
     "image_features_ must be a float array of shape (n_images, 8)"),
    ("spade", _array("bank_sample_index_", lambda a: a + 1000), "bank_sample_index_ holds "
                                                                "values outside [0, 30)"),
    # PaDiM
    ("padim", _array("mean_", lambda a: a[..., :1]), "mean_ must be a float array of shape "
                                                     "(1, 1, 2)"),
    ("padim", _array("cholesky_", lambda a: a.astype(np.int64)), "cholesky_ must be a float "
                                                                 "array"),
    ("padim", _array("cholesky_", _nan_at_first), "cholesky_ contains NaN"),
    ("padim", _array("feature_indices_", lambda a: a + 7), "feature_indices_ holds values "
                                                           "outside [0, 3)"),
    ("padim", _set(_params, "n_features", 1), "feature_indices_ holds 2 of 3 features, but the "
                                              "n_features parameter is 1"),
    ("padim", _set(_fitted, "grid_shape_", "ab"), "grid_shape_ must be a pair of positive "
                                                  "integers, got the string 'ab'"),
    ("padim", _set(_fitted, "loo_cholesky_", None), "rows need grid_shape_ (1, 1) and a "
                                                    "loo_cholesky_ array"),
    ("padim", _set(_fitted, "n_samples_fit_", 1), "n_samples_fit_ must be an integer >= 3"),
    # CoresetSampler and FeatureExtractor inside the image pipeline
    ("pipe", _set(C_FITTED, "coverage_radius_", -1), "coverage_radius_ must be a finite number "
                                                     ">= 0.0"),
    ("pipe", _array("coreset/sample_indices_", lambda a: a[:, None]),
     "sample_indices_ must be an integer array of shape (n_rows,)"),
    ("pipe", _set(F_FITTED, "layers_", _seq("nope", tuple_=False)),
     "layers_ must be a non-empty list of efficientnet_lite2 layers"),
    ("pipe", _set(F_FITTED, "feature_dim_", 7), "feature_dim_ must be the channels of layers"),
    ("pipe", _set(F_FITTED, "grid_shape_", _seq(3, 3)),
     "grid_shape_ must be the grid of a 64x64 input at stride 8"),
    ("pipe", _set(F_FITTED, "scales_", _seq()),
     "scales_ must be distinct scales in (0, 1] starting with 1.0, got the list ()"),
    ("pipe", _set(F_PARAMS, "scales", _seq(1.0, 0.5)), "scales_ must be the scales parameter"),
    ("pipe", _set(F_PARAMS, "scales", _seq(0.5)), "invalid parameter: scales=(0.5,) must "
                                                  "list distinct input scales"),
    ("pipe", _set(F_PARAMS, "patch_size", 4), "patch_size must be odd"),
    ("pipe", _set(F_FITTED, "weights_sha256_", "abc"), "weights_sha256_ must be a string or "
                                                       "null"),
    ("pipe", _set(F_FITTED, "weights_sha256_", None), "fitted with random weights "
                                                      "(weights_sha256_ is null) but the file "
                                                      "holds no network weights"),
    ("random_fe", lambda m, a: m["model"]["network_state"].append("extra"),
     "network weight 'extra' is not in the file"),
    ("random_fe", _set(_model, "network_state", "all"), "network_state must be a list of "
                                                        "weight names"),
    ("random_fe", _array("network/stages.0.0.weight", lambda a: a[:1]),
     "the stored network weights cannot be used"),
    ("random_fe", _array("network/stages.0.0.weight", lambda a: a.astype(str)),
     "network weight 'stages.0.0.weight' is an array of dtype <U"),
    # pipelines
    ("pipe", _set(_model, "steps", "abc"), "steps must be a non-empty list of [name, "
                                           "estimator] pairs, got the string 'abc'"),
    ("pipe", _set(_model, "steps", []), "steps must be a non-empty list"),
    ("pipe", _set(_model, "steps", [["features"]]), "steps[0] must be a [name, estimator] "
                                                    "pair"),
    ("pipe", lambda m, a: m["model"]["steps"][0].__setitem__(0, 1), "steps[0] must be a [name, "
                                                                    "estimator] pair"),
    ("pipe", lambda m, a: m["model"]["steps"][1].__setitem__(0, "features"),
     "steps[1] has the name 'features'; step names must be unique"),
    ("pipe", lambda m, a: m["model"]["steps"][1].__setitem__(0, "a__b"), "has the name 'a__b'"),
    ("pipe", lambda m, a: m["model"]["steps"][1].__setitem__(0, "memory"), "has the name "
                                                                           "'memory'"),
    ("pipe", lambda m, a: m["model"]["steps"][1].__setitem__(1, [1, 2]), "steps[1] 'coreset' "
                                                                         "must be a JSON object"),
    ("pipe", _swap_last_two_steps, "is a PatchCoreDetector, which has no transform"),
    ("pipe", _set(_params, "verbose", "yes"), "verbose must be true or false"),
    ("pipe", _set(_params, "memory", "/tmp/cache"), "memory must be null"),
    ("pipe", _set(_model, "params", [1]), "params must be a JSON object with 'memory' and "
                                          "'verbose'"),
    ("pipe", _mismatched_detector, "step 'detector' was fitted on 7 features per patch, but "
                                   "step 'features' makes 168"),
    ("rows_pipe", _nested_pipeline(9), "nests pipelines more than 8 deep"),
]


def _case_id(case):
    base, mutate, fragment = case
    return f"{base}:{fragment[:40]}"


@pytest.mark.parametrize(("base", "mutate", "fragment"), MALFORMED,
                         ids=[_case_id(c) for c in MALFORMED])
def test_malformed_files_raise_one_valueerror_naming_the_file(saved, tmp_path, base, mutate,
                                                             fragment):
    meta, arrays = _read(saved[base])
    mutate(meta, arrays)
    path = _write(tmp_path / "edited.npz", meta, arrays)
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(repr(str(path)))
    assert fragment in message
    if "Upgrade" not in fragment:
        assert "is not a valid skpatchcore model file" in message and SAVE_AGAIN in message


def _paths(node, at=()):
    """Every position inside a JSON document."""
    yield at
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*at, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*at, i))


@pytest.mark.parametrize("base", ["rows", "spade", "padim", "rows_pipe"])
def test_any_edit_of_the_metadata_loads_or_raises_valueerror(saved, grid_data, tmp_path, base):
    """Replace every value in the description, one at a time, by values of every JSON kind:
    the file loads, or load_model raises ValueError naming it; a model that loads scores,
    or raises ValueError."""
    meta, arrays = _read(saved[base])
    X = grid_data[1] if base == "spade" else ROWS[:6]
    outcomes = {"loaded": 0, "refused": 0}
    for at in list(_paths(meta))[1:]:
        for value in (None, "x", -1, 0, 1.5, True, float("nan"), 10**6, [], {}):
            edited = json.loads(json.dumps(meta))
            node = edited
            for key in at[:-1]:
                node = node[key]
            node[at[-1]] = value
            path = _write(tmp_path / "fuzz.npz", edited, arrays)
            try:
                model = load_model(path)
            except ValueError as exc:
                assert str(path) in str(exc), (at, value, exc)
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            if hasattr(model, "score_samples"):
                try:
                    model.score_samples(X)
                except ValueError:
                    pass
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10


def test_a_zip_entry_that_is_not_an_array(saved, tmp_path):
    path = tmp_path / "extra.npz"
    path.write_bytes(saved["rows"].read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("extra", b"hello")
    with pytest.raises(ValueError, match="its entry 'extra' is not a NumPy array") as info:
        load_model(path)
    assert str(path) in str(info.value)


# -------------------------------------------------------------- files that are not models (4)
def _truncated(saved):
    data = saved["rows"].read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(("content", "found"), [
    (lambda saved: b"", "it is empty (0 bytes)"),
    (lambda saved: b"junk", "it is not an .npz (zip) archive at all (it starts with b'junk')"),
    (lambda saved: b"\x93NUMPY\x01\x00v\x00", "a single NumPy array (.npy)"),
    (lambda saved: pickle.dumps({"a": 1}), "a Python pickle (e.g. joblib.dump)"),
    (_truncated, "the .npz archive is truncated or damaged"),
], ids=["empty", "junk", "npy", "pickle", "truncated"])
def test_unreadable_files_say_what_they_are_and_what_to_do(saved, tmp_path, content, found):
    path = tmp_path / "model.npz"
    path.write_bytes(content(saved))
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} is not a complete skpatchcore model file: ")
    assert found in message
    assert "Check the path, or save the model again" in message and "-o FILE" in message


def test_a_foreign_npz_is_not_a_model(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"is an .npz \(zip\) file but not a skpatchcore model "
                                         r"\(it has no '__skpatchcore_meta__' entry; it holds "
                                         r"\['weights'\]\)"):
        load_model(path)


def test_load_model_paths(tmp_path):
    det = PatchCoreDetector().fit(ROWS)
    path = save_model(det, tmp_path / "model")
    assert path == tmp_path / "model.npz"
    # symmetric with save_model: 'model' finds the 'model.npz' it wrote
    for given in (tmp_path / "model", str(tmp_path / "model")):
        np.testing.assert_array_equal(load_model(given).score_samples(ROWS),
                                      det.score_samples(ROWS))
    with pytest.raises(FileNotFoundError) as info:
        load_model(tmp_path / "other")
    message = str(info.value)
    assert repr(str(tmp_path / "other")) in message
    assert repr(str(tmp_path / "other.npz")) in message and "Check the path" in message
    with pytest.raises(FileNotFoundError, match=r"'[^']*/gone\.npz' does not exist\. Check"):
        load_model(tmp_path / "gone.npz")
    with pytest.raises(ValueError, match="load_model: path is empty"):
        load_model("")
    with pytest.raises(ValueError, match=f"Model file {str(tmp_path)!r} is a folder, not a "
                                         "model file"):
        load_model(tmp_path)


def test_save_model_refuses_empty_and_folder_paths_before_writing(tmp_path):
    det = PatchCoreDetector()
    (tmp_path / "out").mkdir()
    (tmp_path / "taken.npz").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="save_model: path is empty"):
        save_model(det, "")
    with pytest.raises(ValueError, match=f"path {str(tmp_path / 'out')!r} is a folder; give a "
                                         "file name inside it, e.g. "
                                         f"{str(tmp_path / 'out' / 'model.npz')!r}"):
        save_model(det, tmp_path / "out")
    with pytest.raises(ValueError, match="is a folder"):
        save_model(det, str(tmp_path / "new") + os.sep)
    with pytest.raises(ValueError, match=f"{str(tmp_path / 'taken.npz')!r}, which is a folder"):
        save_model(det, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------- require_detector (item 1)
def test_require_detector_accepts_only_models_that_can_score(fitted_pipe, tmp_path):
    fitted = save_model(fitted_pipe, tmp_path / "pipe")
    assert isinstance(load_model(fitted, require_detector=True), PatchCorePipeline)
    assert isinstance(load_model(save_model(PatchCoreDetector().fit(ROWS), tmp_path / "det"),
                                 require_detector=True), PatchCoreDetector)
    refused = {
        "no_detector": (Pipeline([("coreset", CoresetSampler(random_state=0))]).fit(ROWS),
                        "holds a Pipeline(CoresetSampler), which cannot score images"),
        "passthrough": (Pipeline([("coreset", CoresetSampler()), ("detector", "passthrough")]),
                        "holds a Pipeline(CoresetSampler -> passthrough), which cannot score"),
        "sampler": (CoresetSampler(), "holds a CoresetSampler, which cannot score"),
        "unfitted": (PatchCoreDetector(), "holds an unfitted PatchCoreDetector, so it cannot "
                                          "score"),
        "unfitted_step": (Pipeline([("features", FeatureExtractor()),
                                    ("detector", PatchCoreDetector().fit(ROWS))]),
                          "whose FeatureExtractor is not fitted, so it cannot score"),
    }
    for name, (model, fragment) in refused.items():
        path = save_model(model, tmp_path / name)
        assert type(load_model(path)) is type(model)  # any model loads by default
        with pytest.raises(ValueError) as info:
            load_model(path, require_detector=True)
        assert str(info.value).startswith(repr(str(path))) and fragment in str(info.value)


# ---------------------------------------------------------------- failed saves (item 2)
@pytest.fixture
def existing(tmp_path):
    """A model already at the destination, and the new model a failing save tries to
    write over it."""
    old = PatchCoreDetector(contamination=0.1).fit(ROWS)
    path = save_model(old, tmp_path / "model.npz")
    new = PatchCoreDetector(contamination=0.2).fit(ROWS + 1)
    return path, path.read_bytes(), old, new


def _assert_nothing_changed(path, content, old):
    assert not path.with_name(path.name + ".partial").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_bytes() == content
    np.testing.assert_array_equal(load_model(path).score_samples(ROWS), old.score_samples(ROWS))


def _savez_that(action):
    """np.savez that writes part of a file, checks the partial file is there, then fails."""
    def savez(file, **arrays):
        file.write(b"PK\x03\x04 part of a model")
        file.flush()
        assert Path(file.name).name.endswith(".npz.partial") and Path(file.name).exists()
        action()
    return savez


def _raise(exc):
    def action():
        raise exc
    return action


@pytest.mark.parametrize(("error", "advice"), [
    (OSError(errno.ENOSPC, "No space left on device"), "free some disk space, or save to "
                                                       "another disk"),
    (PermissionError(errno.EACCES, "Permission denied"), "save to a folder you can write to"),
    (OSError(errno.EIO, "Input/output error"), "check the path and the disk"),
], ids=["disk-full", "permission", "io-error"])
def test_failed_write_removes_the_partial_file_and_says_what_to_do(existing, monkeypatch,
                                                                   error, advice):
    path, content, old, new = existing
    monkeypatch.setattr(np, "savez", _savez_that(_raise(error)))
    with pytest.raises(OSError) as info:
        save_model(new, path)
    assert type(info.value) is type(error) and info.value.errno == error.errno
    message = str(info.value)
    assert message.startswith(f"Could not save the model to {str(path)!r}: {error.strerror} "
                              f"(errno {error.errno}). Nothing was written there and a model "
                              "already at that path is unchanged; ")
    assert advice in message
    monkeypatch.undo()
    _assert_nothing_changed(path, content, old)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("bug")],
                         ids=["KeyboardInterrupt", "other-exception"])
def test_interrupted_write_removes_the_partial_file(existing, monkeypatch, error):
    path, content, old, new = existing
    monkeypatch.setattr(np, "savez", _savez_that(_raise(error)))
    with pytest.raises(type(error)):
        save_model(new, path)
    monkeypatch.undo()
    _assert_nothing_changed(path, content, old)


def _send_sigterm():
    # never kill the test run: the save must have put its handler in place
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler's exception interrupts this
    raise AssertionError("SIGTERM did not interrupt the save")


@pytest.fixture
def default_sigterm():
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        pytest.skip("needs the main thread with SIGTERM's default disposition")


def test_sigterm_during_a_save_removes_the_partial_file_then_terminates(
        existing, monkeypatch, default_sigterm):
    path, content, old, new = existing
    redelivered = []
    # In a real process the re-sent SIGTERM ends it (see the subprocess test below); here
    # we record which handler it would meet.
    monkeypatch.setattr(persistence, "_redeliver_sigterm",
                        lambda: redelivered.append(signal.getsignal(signal.SIGTERM)))
    monkeypatch.setattr(np, "savez", _savez_that(_send_sigterm))
    with pytest.raises(SystemExit) as info:
        save_model(new, path)
    assert info.value.code == 128 + signal.SIGTERM
    assert redelivered == [signal.SIG_DFL]  # the default handler is back when it is re-sent
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    _assert_nothing_changed(path, content, old)


def test_sigterm_kills_a_saving_process_without_leaving_the_partial_file(existing):
    path, content, old, _ = existing
    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        import numpy as np
        from skpatchcore import PatchCoreDetector, save_model

        def savez(file, **arrays):
            file.write(b"PK part of a model")
            file.flush()
            assert Path({str(path) + '.partial'!r}).exists()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)

        np.savez = savez
        save_model(PatchCoreDetector(), {str(path)!r})
        print("the save survived SIGTERM")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert "survived" not in proc.stdout
    _assert_nothing_changed(path, content, old)


def test_an_application_sigterm_handler_is_kept_and_its_exception_cleans_up(
        existing, monkeypatch):
    path, content, old, new = existing

    class Shutdown(Exception):
        pass

    def handler(signum, frame):
        raise Shutdown

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(np, "savez", _savez_that(_send_sigterm))
        with pytest.raises(Shutdown):
            save_model(new, path)
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    _assert_nothing_changed(path, content, old)


def test_saving_restores_the_handler_and_works_in_threads(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    det = PatchCoreDetector().fit(ROWS)
    save_model(det, tmp_path / "main")
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def save():
        try:
            save_model(det, tmp_path / "thread")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=save)
    worker.start()
    worker.join()
    assert errors == []
    np.testing.assert_array_equal(load_model(tmp_path / "thread").score_samples(ROWS),
                                  det.score_samples(ROWS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.npz", "thread.npz"]
