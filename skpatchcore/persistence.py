"""A safe model file: arrays in a NumPy ``.npz`` and everything else as JSON.

``save_model(model, path)`` writes one ``.npz`` file; ``load_model(path)`` reads it back
with ``allow_pickle=False``, so loading never executes code from the file. Only skpatchcore's
own estimator classes (and scikit-learn's ``Pipeline``) can be rebuilt, by name, from an
allow-list. Network weights are not stored: they are rebuilt from the backbone name and checked
by SHA-256 (random weights, ``weights=None``, are stored since they cannot be rebuilt).

Loading checks the whole file before returning a model: the format version, the structure of
the JSON description, every parameter (the estimator's own ``_validate_params``) and every
fitted attribute a model needs to score (types, dtypes, shapes, finite values, agreement
between the steps of a pipeline). A damaged, truncated, edited or foreign file raises a
``ValueError`` that names the file and says what to do; a missing one ``FileNotFoundError``.
``load_model(path, require_detector=True)`` also refuses a model that cannot score (no final
detector, or not fitted), for callers such as ``skpatchcore predict``.

Saving writes ``<name>.npz.partial`` and renames it over ``<name>.npz`` only when complete, so
an existing model is never replaced by a broken one; the partial file is removed on every
failure (errors, ``KeyboardInterrupt``, and SIGTERM, which is turned into an exception for the
duration of the write when it would otherwise kill the process outright).

joblib/pickle also work for every estimator and pipeline; prefer this format for models that
travel between machines or people.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import threading
import zipfile
import zlib
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._version import __version__

__all__ = ["load_model", "save_model"]

FORMAT_VERSION = 1
# class -> {parameter: value that reproduces models saved before it existed}
_ADDED_PARAMS = {"FeatureExtractor": {"border": 0, "scales": (1.0,), "precision": "float32",
                                      "jit": False}}
_ADDED_FITTED = {
    "FeatureExtractor": {"border_": 0, "scales_": (1.0,), "precision_": "float32"},
    # the tabular leave-one-out record: older files score rows without it
    "PatchCoreDetector": {"bank_sample_index_": None, "train_row_keys_": None,
                          "train_row_samples_": None},
    "SPADEDetector": {"train_row_keys_": None, "train_row_samples_": None},
    "PaDiMDetector": {"train_row_samples_": None},
}
_META_KEY = "__skpatchcore_meta__"
# Pipelines inside pipelines deeper than this are not something save_model writes.
_MAX_NESTING = 8

_SAVE_AGAIN = ("save the model again (save_model(model, path), or `skpatchcore fit ... -o "
               "FILE`)")
_CHECK_PATH = f"Check the path, or {_SAVE_AGAIN}."


def _classes():
    """Every class a model file may name: name -> class, or None for a trained detector's,
    whose module (:data:`~skpatchcore.methods.TRAINED_METHODS`) is imported only when a file
    names it (:func:`_class`)."""
    from .coreset import CoresetSampler
    from .detector import PatchCoreDetector
    from .ensemble import AnomalyEnsemble
    from .features import FeatureExtractor
    from .methods import TRAINED_METHODS
    from .padim import PaDiMDetector
    from .pipeline import PatchCorePipeline
    from .spade import SPADEDetector

    classes = {c.__name__: c for c in (FeatureExtractor, CoresetSampler, PatchCoreDetector,
                                       SPADEDetector, PaDiMDetector, PatchCorePipeline,
                                       Pipeline, AnomalyEnsemble)}
    return {**classes, **{name: None for _, name in TRAINED_METHODS.values()}}


def _class(name):
    """The class a model file names (one of :func:`_classes`)."""
    from .methods import METHOD_OF_CLASS, trained_class

    return _classes()[name] or trained_class(METHOD_OF_CLASS[name])


# --------------------------------------------------------------------------------- saving
def _jsonable(value, where):
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.integer | np.floating | np.bool_):
        return value.item()
    if isinstance(value, list | tuple):
        return {"__tuple__": isinstance(value, tuple),
                "items": [_jsonable(v, where) for v in value]}
    if isinstance(value, Path):
        return str(value)
    raise ValueError(
        f"{where} = {value!r} ({type(value).__name__}) cannot be saved in the safe format; "
        "use an int/float/str/None value (e.g. random_state=0), or joblib.dump instead."
    )


def _storable_array(value, where):
    """An ndarray that loads without pickle: object arrays of str (scikit-learn's
    ``feature_names_in_``) become fixed-width unicode; other object arrays are refused."""
    if value.dtype != object:
        return value
    if all(isinstance(v, str) for v in value.flat):
        return value.astype(str)
    raise ValueError(f"{where} is an array of Python objects and cannot be saved in the safe "
                     "format; use joblib.dump instead.")


def _describe(estimator, prefix, arrays):
    """Estimator -> JSON description; arrays go into ``arrays`` under ``prefix``."""
    name = type(estimator).__name__
    if name not in _classes():
        raise ValueError(f"Cannot save a {name} in the safe format (only skpatchcore estimators "
                         "and Pipeline); use joblib.dump instead.")
    if isinstance(estimator, Pipeline):
        steps = []
        for step_name, step in estimator.steps:
            if step is None or step == "passthrough":
                steps.append([step_name, None])
            else:
                steps.append([step_name, _describe(step, f"{prefix}{step_name}/", arrays)])
        return {"class": name, "steps": steps,
                "params": {"memory": None, "verbose": bool(estimator.verbose)}}
    if name == "AnomalyEnsemble":
        return _describe_ensemble(estimator, prefix, arrays)
    params = {k: _jsonable(v, f"{name}.{k}") for k, v in estimator.get_params(deep=False).items()}
    description = {"class": name, "params": params,
                   "fitted": _describe_fitted(estimator, prefix, arrays)}
    state = (estimator.network_state()
             if description["fitted"] and hasattr(estimator, "network_state") else None)
    if state is not None:
        for k, v in state.items():
            arrays[f"{prefix}network/{k}"] = v
        description["network_state"] = list(state)
    return description


def _describe_fitted(estimator, prefix, arrays, leave_out=()):
    """The fitted attributes of ``estimator`` as JSON (arrays into ``arrays``)."""
    name = type(estimator).__name__
    fitted = {}
    for key, value in vars(estimator).items():
        if not key.endswith("_") or key.startswith("_") or key in leave_out:
            continue
        if isinstance(value, np.ndarray):
            arrays[f"{prefix}{key}"] = _storable_array(value, f"{name}.{key}")
            fitted[key] = {"__array__": f"{prefix}{key}"}
        else:
            fitted[key] = _jsonable(value, f"{name}.{key}")
    return fitted


def _describe_ensemble(ensemble, prefix, arrays):
    """An :class:`~skpatchcore.AnomalyEnsemble`: its parameters, its members (as given)
    and, when fitted, its fitted members, each described as any estimator."""
    params = {k: _jsonable(v, f"AnomalyEnsemble.{k}")
              for k, v in ensemble.get_params(deep=False).items() if k != "members"}
    members = [[str(name), _describe(model, f"{prefix}members/{name}/", arrays)]
               for name, model in ensemble.members]
    description = {"class": "AnomalyEnsemble", "params": params, "members": members,
                   "fitted": _describe_fitted(ensemble, prefix, arrays,
                                              leave_out=("members_",))}
    if "members_" in vars(ensemble):
        description["fitted_members"] = [
            _describe(model, f"{prefix}members_/{i}/", arrays)
            for i, model in enumerate(ensemble.members_)]
    return description


def _path_text(path, who, verb):
    """``path`` as a non-empty str; ValueError naming ``who`` otherwise."""
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw:
        raise ValueError(f"{who}: path is empty; give the model file to {verb}, e.g. "
                         "'model.npz'.")
    return raw


def _destination(path):
    """The file ``save_model`` writes: ``path`` with '.npz' appended when missing; ValueError
    for an empty path or a folder, before anything is written."""
    raw = _path_text(path, "save_model", "write")
    given = Path(raw)
    if raw.endswith(os.sep) or (os.altsep and raw.endswith(os.altsep)) or given.is_dir() \
            or given.name in ("", ".", ".."):
        raise ValueError(f"save_model: path {raw!r} is a folder; give a file name inside it, "
                         f"e.g. {str(given / 'model.npz')!r}.")
    dest = given if given.suffix == ".npz" else given.with_name(given.name + ".npz")
    if dest.is_dir():
        raise ValueError(f"save_model: path {raw!r} would be written to {str(dest)!r}, which "
                         f"is a folder; give another file name, e.g. "
                         f"{str(dest / 'model.npz')!r}.")
    return dest


class _Terminated(SystemExit):
    """Raised by the temporary SIGTERM handler so that a save can remove its partial file
    (exit status 128 + SIGTERM if the process somehow survives the re-delivered signal)."""


class _SigtermGuard:
    """While a save writes: turn SIGTERM into :class:`_Terminated` so the cleanup runs.

    Installed only in the main thread and only when SIGTERM has its default disposition
    (terminate without running Python code); an ignored SIGTERM or a handler installed by
    the application is left alone. ``quiet`` is set once nothing is left to protect (the
    file is renamed or being removed): a SIGTERM then is only recorded. ``received`` tells
    the caller to deliver the signal again after the previous handler is back.
    """

    def __init__(self):
        self.received = False
        self.quiet = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
        except (ValueError, OSError):  # not the main interpreter, or no signals here
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True
        if not self.quiet:
            self.quiet = True
            raise _Terminated(128 + signum)

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _redeliver_sigterm():
    """Send SIGTERM again once the default handler is back: the process ends as it would
    have without the save in progress, only without the partial file."""
    signal.raise_signal(signal.SIGTERM)


def _discard(tmp):
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _write_error(path, exc):
    """The OSError to raise when writing ``path`` failed with ``exc``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        advice = "free some disk space, or save to another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "save to a folder you can write to, or fix the folder's permissions"
    else:
        advice = "check the path and the disk, and save again"
    code = f" (errno {exc.errno})" if exc.errno else ""
    new = type(exc)(f"Could not save the model to {str(path)!r}: {reason}{code}. Nothing was "
                    f"written there and a model already at that path is unchanged; {advice}.")
    new.errno = exc.errno
    return new


def _fsync(fh):
    try:
        os.fsync(fh.fileno())
    except OSError as exc:  # file systems without fsync are fine; real write errors are not
        if exc.errno not in (errno.EINVAL, getattr(errno, "ENOTSUP", None),
                             getattr(errno, "EOPNOTSUPP", None)):
            raise


def save_model(model, path):
    """Write a fitted estimator or pipeline to ``path`` (a ``.npz`` file) safely.

    The file is written as ``<path>.partial`` and renamed to ``path`` only when complete, so a
    model already at ``path`` is never replaced by a broken file. The partial file is removed
    when the save fails or is interrupted (an exception, ``KeyboardInterrupt``, or SIGTERM:
    while writing in the main thread, a SIGTERM with the default disposition is turned into
    an exception, the partial file removed, the previous handler restored and the signal
    delivered again, so the process still ends).

    Parameters
    ----------
    model : estimator or Pipeline
        Any skpatchcore estimator or a Pipeline of them, fitted or not.
    path : str or path-like
        Destination; '.npz' is appended when missing. Folders that do not exist are created.

    Returns
    -------
    path : Path
        The file written.

    Raises
    ------
    ValueError
        ``path`` is empty or a folder, or the model holds something the safe format cannot
        store (nothing is written then).
    OSError
        Writing failed (disk full, permission denied, ...); the message names the file and
        what to do, and ``errno`` is the original one.
    """
    path = _destination(path)
    arrays = {}
    meta = {
        "format_version": FORMAT_VERSION,
        "skpatchcore": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "model": _describe(model, "", arrays),
    }
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(path.name + ".partial")
    guard = _SigtermGuard()
    try:
        with guard:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
                    fh.flush()
                    _fsync(fh)
                tmp.replace(path)  # never leave a half-written model under the real name
            except BaseException:
                guard.quiet = True
                _discard(tmp)
                raise
            guard.quiet = True
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if guard.received:
            _redeliver_sigterm()
    return path


# -------------------------------------------------------------------------------- loading
# advice for what another skpatchcore version may have written
_OTHER_VERSION = "other version"


class _Invalid(Exception):
    """A problem in the model description; :func:`load_model` adds the file and what to do
    (``advice``: None means the file is damaged, save the model again; ``_OTHER_VERSION``
    adds that another skpatchcore version may have written it, when the file says so)."""

    def __init__(self, detail, advice=None):
        super().__init__(detail)
        self.detail = detail
        self.advice = advice


_MISSING = object()


def _show(value):
    """A short description of a JSON value or array, for messages."""
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    if value is None:
        return "null"
    if value is _MISSING:
        return "nothing"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, bool):
        return f"the boolean {text}"
    if isinstance(value, str):
        return f"the string {text}"
    if isinstance(value, int | float):
        return f"the number {text}"
    if isinstance(value, dict):
        return f"the object {text}"
    if isinstance(value, list | tuple):
        return f"the list {text}"
    return f"{type(value).__name__} {text}"


def _from_json(value, where):
    """A JSON value as written by :func:`_jsonable`; tuples/lists come as
    ``{"__tuple__": bool, "items": [...]}``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if (isinstance(value, dict) and set(value) == {"__tuple__", "items"}
            and isinstance(value["__tuple__"], bool) and isinstance(value["items"], list)):
        items = [_from_json(v, where) for v in value["items"]]
        return tuple(items) if value["__tuple__"] else items
    raise _Invalid(f"{where} is {_show(value)}, which is not a value save_model writes")


def _all_finite(a):
    """True when the float array ``a`` holds no NaN or infinity (without a full-size
    temporary unless the float64 sum overflows)."""
    if a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
        return True
    return bool(np.isfinite(a).all())


def _shape_text(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class _Fitted:
    """Checks, and normalises in place, the fitted attributes of one rebuilt estimator."""

    def __init__(self, estimator, label):
        self.est = estimator
        self.label = label

    def has(self, key):
        return key in vars(self.est)

    def get(self, key, optional=False):
        value = vars(self.est).get(key, _MISSING)
        if value is _MISSING and not optional:
            raise _Invalid(f"{self.label} is fitted but has no {key}")
        return value

    def fail(self, key, expected, value):
        raise _Invalid(f"{self.label}: {key} must be {expected}, got {_show(value)}")

    def set(self, key, value):
        setattr(self.est, key, value)
        return value

    def integer(self, key, low=1):
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
            self.fail(key, f"an integer >= {low}", value)
        return self.set(key, int(value))

    def number(self, key, low=-math.inf, high=math.inf, optional=False):
        """A finite real number in [low, high]; None when optional and absent."""
        value = self.get(key, optional)
        if value is _MISSING:
            return None
        if (isinstance(value, bool) or not isinstance(value, Real)
                or not math.isfinite(value) or not low <= value <= high):
            span = "" if math.isinf(low) and math.isinf(high) else (
                f" >= {low}" if math.isinf(high) else f" in [{low}, {high}]")
            self.fail(key, f"a finite number{span}", value)
        return self.set(key, float(value))

    def pair(self, key):
        value = self.get(key)
        if not (isinstance(value, list | tuple) and len(value) == 2 and all(
                isinstance(v, Integral) and not isinstance(v, bool) and v >= 1 for v in value)):
            self.fail(key, "a pair of positive integers", value)
        return self.set(key, (int(value[0]), int(value[1])))

    def text(self, key, pattern=None):
        """A string or None (``pattern``: a check on the string)."""
        value = self.get(key)
        if value is not None and not (isinstance(value, str) and (pattern is None
                                                                  or pattern(value))):
            self.fail(key, "a string or null", value)
        return value

    def array(self, key, kinds, shape, dtype, *, optional=False, finite=False, bounds=None):
        """An ndarray of dtype kind in ``kinds`` ('f' float, 'iu' integer, 'u' unsigned),
        ``shape`` (ints must match; strings name any non-zero size), cast to ``dtype``;
        None when ``optional`` and null or absent. ``bounds``: (low, high) for integer
        values, high exclusive or None."""
        value = self.get(key, optional)
        if optional and (value is None or value is _MISSING):
            return self.set(key, None) if value is None else None
        kind = {"f": "a float", "u": "an unsigned integer"}.get(kinds, "an integer")
        expected = f"{kind} array of shape {_shape_text(shape)}" + (" or null" if optional
                                                                    else "")
        if not (isinstance(value, np.ndarray) and value.dtype.kind in kinds
                and value.ndim == len(shape)
                and all(s == n if isinstance(s, int) else n > 0
                        for s, n in zip(shape, value.shape, strict=True))):
            self.fail(key, expected, value)
        if finite and not _all_finite(value):
            raise _Invalid(f"{self.label}: {key} contains NaN or infinite values")
        if bounds is not None and value.size:
            low, high = bounds
            if value.min() < low or (high is not None and value.max() >= high):
                span = f"[{low}, {high})" if high is not None else f">= {low}"
                raise _Invalid(f"{self.label}: {key} holds values outside {span}")
        return self.set(key, np.ascontiguousarray(value, dtype=dtype))


def _check_calibration(f):
    f.number("calibration_fpr_", low=0.0, high=1.0, optional=True)
    if f.has("calibration_n_samples_"):
        f.integer("calibration_n_samples_")


def _check_training_rows(f):
    """The tabular leave-one-out record of :class:`BaseDetector`: both null, or sorted row
    digests and the training sample of each."""
    keys = f.array("train_row_keys_", "u", ("n_rows",), np.uint64, optional=True)
    samples = f.array("train_row_samples_", "iu", ("n_rows",), np.int64, optional=True,
                      bounds=(0, None))
    if keys is None and samples is None:
        return
    if keys is None or samples is None or len(keys) != len(samples):
        raise _Invalid(f"{f.label}: train_row_keys_ and train_row_samples_ must be two arrays "
                       f"of one length, or both null; got {_show(keys)} and {_show(samples)}")
    if np.any(keys[1:] < keys[:-1]):
        raise _Invalid(f"{f.label}: train_row_keys_ must be sorted")


def _check_bank_detector(f):
    """What PatchCore and SPADE share: n_features_in_, memory_bank_, offset_, the training
    rows; returns (n_features_in_, number of bank rows)."""
    d = f.integer("n_features_in_")
    bank = f.array("memory_bank_", "f", ("n_rows", d), np.float32, finite=True)
    f.number("offset_")
    _check_calibration(f)
    _check_training_rows(f)
    return d, bank.shape[0]


def _check_patchcore(f, stored):
    _, m = _check_bank_detector(f)
    f.array("bank_sample_index_", "iu", (m,), np.int64, optional=True, bounds=(0, None))


def _check_spade(f, stored):
    d, m = _check_bank_detector(f)
    images = f.array("image_features_", "f", ("n_images", d), np.float32, finite=True)
    f.array("bank_sample_index_", "iu", (m,), np.int64, bounds=(0, len(images)))


def _check_padim(f, stored):
    d = f.integer("n_features_in_")
    h, w = f.pair("grid_shape_")
    dim = len(f.array("feature_indices_", "iu", ("dim",), np.int64, bounds=(0, d)))
    n_features = f.est.n_features
    if dim != (d if n_features is None or n_features >= d else n_features):
        raise _Invalid(f"{f.label}: feature_indices_ holds {dim} of {d} features, but the "
                       f"n_features parameter is {n_features!r}")
    f.integer("n_samples_fit_", low=3)
    f.array("mean_", "f", (h, w, dim), np.float64, finite=True)
    f.array("cholesky_", "f", (h, w, dim, dim), np.float64, finite=True)
    loo = f.array("loo_cholesky_", "f", (dim, dim), np.float64, optional=True, finite=True)
    f.number("offset_")
    _check_calibration(f)
    keys = f.get("train_row_keys_", optional=True)
    if "train_row_samples_" not in stored and isinstance(keys, np.ndarray):
        # Files from before train_row_samples_ kept only the digests. PaDiM's leave-one-out
        # needs to know whether a row is a training row, not which one: any index >= 0 works.
        f.set("train_row_samples_", np.zeros(len(keys), dtype=np.int64))
    _check_training_rows(f)
    if f.get("train_row_keys_") is not None and (loo is None or (h, w) != (1, 1)):
        raise _Invalid(f"{f.label} was fitted on rows (train_row_keys_ is set) but has "
                       f"grid_shape_ {(h, w)} and loo_cholesky_ {_show(loo)}; rows need "
                       "grid_shape_ (1, 1) and a loo_cholesky_ array")


def _check_coreset(f, stored):
    f.integer("n_features_in_")
    f.number("coverage_radius_", low=0.0)
    f.array("sample_indices_", "iu", ("n_rows",), np.int64, bounds=(0, None))


def _is_sha256(text):
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _check_feature_extractor(f, stored):
    from ._geometry import Geometry
    from .backbones import get_backbone_spec
    from .features import check_scales

    est = f.est
    spec = get_backbone_spec(est.backbone)  # the parameter was validated
    layers = f.get("layers_")
    if not (isinstance(layers, list | tuple) and layers
            and all(isinstance(x, str) and x in spec.layers for x in layers)):
        f.fail("layers_", f"a non-empty list of {est.backbone} layers {list(spec.layers)}",
               layers)
    layers = f.set("layers_", list(layers))
    if layers != list(spec.default_layers if est.layers is None else est.layers):
        f.fail("layers_", f"the layers parameter {est.layers!r}", layers)
    stride = f.integer("stride_")
    if stride != min(spec.layers[x][0] for x in layers):
        f.fail("stride_", f"the smallest stride of layers {layers}", stride)
    try:
        scales = f.set("scales_", check_scales(f.get("scales_")))
    except ValueError:
        f.fail("scales_", "distinct scales in (0, 1] starting with 1.0", f.get("scales_"))
    try:
        wanted = check_scales(est.scales)
    except ValueError as exc:
        raise _Invalid(f"{f.label}: invalid parameter: {exc}") from None
    if scales != wanted:
        f.fail("scales_", f"the scales parameter {est.scales!r}", scales)
    dim = f.integer("feature_dim_")
    if dim != sum(spec.layers[x][1] for x in layers) * len(scales):
        f.fail("feature_dim_", f"the channels of layers {layers} times {len(scales)} scales",
               dim)
    try:
        in_h, in_w = Geometry(est.image_size, est.resize_mode, est.crop_size).input_size
    except ValueError as exc:
        raise _Invalid(f"{f.label}: {exc}") from None
    grid = f.pair("grid_shape_")
    if grid != (math.ceil(in_h / stride), math.ceil(in_w / stride)):
        f.fail("grid_shape_", f"the grid of a {in_h}x{in_w} input at stride {stride}", grid)
    border = f.integer("border_", low=0)
    if est.border != "auto" and border != est.border:
        f.fail("border_", f"the border parameter {est.border!r}", border)
    precision = f.get("precision_", optional=True)
    if precision is not _MISSING and precision not in ("float32", "bfloat16"):
        f.fail("precision_", "'float32' or 'bfloat16'", precision)
    if est.patch_size % 2 == 0:
        raise _Invalid(f"{f.label}: patch_size must be odd in a fitted FeatureExtractor, got "
                       f"{est.patch_size}")
    f.text("weights_path_")
    sha = f.text("weights_sha256_", pattern=_is_sha256)
    if sha is None and "network_state" not in stored:
        raise _Invalid(f"{f.label} was fitted with random weights (weights_sha256_ is null) "
                       "but the file holds no network weights (network_state)")
    if sha is not None and "network_state" in stored:
        raise _Invalid(f"{f.label} has network_state, but its weights are rebuilt from "
                       "weights_sha256_; only models with random weights store them")


def _check_trained(f, stored):
    """What every :class:`~skpatchcore._trained.TrainedDetector` holds: the threshold, the
    training record, the trained weights (network_state), the pretrained network's digest and
    the method's own fitted arrays (``_fitted_arrays``)."""
    f.number("offset_")
    f.number("pixel_threshold_")
    _check_calibration(f)
    f.integer("n_train_images_")
    f.integer("n_validation_images_")
    epochs = f.integer("n_epochs_")
    losses = f.get("train_loss_")
    if not (isinstance(losses, list) and len(losses) == epochs and all(
            isinstance(v, Real) and not isinstance(v, bool) for v in losses)):
        f.fail("train_loss_", f"a list of {epochs} numbers (one per epoch)", losses)
    sha = f.text("weights_sha256_", pattern=_is_sha256)
    if (sha is None) != (f.est._pretrained is None):
        f.fail("weights_sha256_", "the SHA-256 of the pretrained weights file"
               if sha is None else "null (this method uses no pretrained network)", sha)
    if "network_state" not in stored:
        raise _Invalid(f"{f.label} is fitted but the file holds no trained weights "
                       "(network_state)")
    for key, (dtype, shape) in f.est._fitted_arrays().items():
        kind = np.dtype(dtype).kind
        f.array(key, "iu" if kind in "iu" else kind, tuple("n" if s is None else s
                                                          for s in shape),
                dtype, finite=kind == "f")


_FITTED_CHECKS = {
    "PatchCoreDetector": _check_patchcore,
    "SPADEDetector": _check_spade,
    "PaDiMDetector": _check_padim,
    "CoresetSampler": _check_coreset,
    "FeatureExtractor": _check_feature_extractor,
}


def _array_ref(value, arrays, where):
    if not (set(value) == {"__array__"} and isinstance(value["__array__"], str)):
        raise _Invalid(f"{where} is {_show(value)}, not a reference to an array")
    key = value["__array__"]
    if key not in arrays:
        raise _Invalid(f"{where} refers to array {key!r}, which is not in the file")
    array = arrays[key]
    if array.dtype.kind == "U":  # str arrays (feature_names_in_) are object arrays in sklearn
        array = array.astype(object)
    return array


def _rebuild(description, arrays, prefix, where, depth=0):
    """JSON description -> estimator, every part checked; :class:`_Invalid` otherwise."""
    classes = _classes()
    if not isinstance(description, dict):
        raise _Invalid(f"{where} must be a JSON object describing an estimator, got "
                       f"{_show(description)}")
    name = description.get("class", _MISSING)
    if name is _MISSING:
        raise _Invalid(f"{where} has no 'class' entry")
    if not isinstance(name, str) or name not in classes:
        shown = repr(name) if isinstance(name, str) else _show(name)
        raise _Invalid(f"{where} names the class {shown}, which is not one of "
                       f"{sorted(classes)}", advice=_OTHER_VERSION)
    cls = _class(name)
    label = f"{where} ({name})"
    if issubclass(cls, Pipeline) or name == "AnomalyEnsemble":
        if depth >= _MAX_NESTING:
            kind = "ensembles" if name == "AnomalyEnsemble" else "pipelines"
            raise _Invalid(f"{label} nests {kind} more than {_MAX_NESTING} deep")
        if name == "AnomalyEnsemble":
            return _rebuild_ensemble(cls, description, arrays, prefix, label, depth)
        return _rebuild_pipeline(cls, description, arrays, prefix, label, depth)

    estimator = _construct(cls, description, label)
    fitted = _set_fitted(estimator, description, arrays, label)
    stored = set(fitted) | ({"network_state"} if "network_state" in description else set())
    if fitted:
        for key, value in _ADDED_FITTED.get(name, {}).items():
            if key not in fitted:
                setattr(estimator, key, value)
        check = _FITTED_CHECKS.get(name, _check_trained)  # trained detectors: one check
        check(_Fitted(estimator, label), stored)
    if "network_state" in description:
        _restore_network(estimator, description["network_state"], arrays, prefix, label,
                         bool(fitted))
    return estimator


def _construct(cls, description, label, **given):
    """``cls`` with the parameters of ``description`` (and ``given``), validated."""
    name = cls.__name__
    params = description.get("params", _MISSING)
    if not isinstance(params, dict):
        raise _Invalid(f"{label}: params must be a JSON object, got {_show(params)}")
    known = cls._get_param_names()
    unknown = sorted(set(params) - set(known) | set(params) & set(given))
    if unknown:
        raise _Invalid(f"{label} has parameters {unknown} that {name} does not take "
                       f"(it takes {known})", advice=_OTHER_VERSION)
    params = {k: _from_json(v, f"{label}: parameter {k!r}") for k, v in params.items()}
    # Parameters added after a file was written take the value that reproduces the old
    # behaviour, not today's default.
    for key, value in _ADDED_PARAMS.get(name, {}).items():
        params.setdefault(key, value)
    estimator = cls(**params, **given)
    try:
        estimator._validate_params()
    except (ValueError, TypeError) as exc:  # sklearn's InvalidParameterError is both
        raise _Invalid(f"{label}: invalid parameter: {exc}") from None
    return estimator


def _set_fitted(estimator, description, arrays, label):
    """Set the fitted attributes of ``description`` on ``estimator``; returns them."""
    fitted = description.get("fitted", _MISSING)
    if not isinstance(fitted, dict):
        raise _Invalid(f"{label}: fitted must be a JSON object, got {_show(fitted)}")
    for key, value in fitted.items():
        if not (key.isidentifier() and key.endswith("_") and not key.startswith("_")):
            raise _Invalid(f"{label}: {key!r} is not a fitted attribute name (fitted "
                           "attributes end in '_' and do not start with '_')")
        if isinstance(value, dict) and "__array__" in value:
            value = _array_ref(value, arrays, f"{label}: {key}")
        else:
            value = _from_json(value, f"{label}: {key}")
        setattr(estimator, key, value)
    return fitted


def _restore_network(estimator, keys, arrays, prefix, label, fitted):
    if not (fitted and hasattr(estimator, "load_network_state")):
        raise _Invalid(f"{label} stores network weights but is "
                       + ("not fitted" if hasattr(estimator, "load_network_state")
                          else "not a FeatureExtractor"))
    if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
        raise _Invalid(f"{label}: network_state must be a list of weight names, got "
                       f"{_show(keys)}")
    state = {}
    for key in keys:
        array = arrays.get(f"{prefix}network/{key}")
        if array is None:
            raise _Invalid(f"{label}: network weight {key!r} is not in the file")
        if array.dtype.kind not in "biuf":
            raise _Invalid(f"{label}: network weight {key!r} is {_show(array)}, not numbers")
        state[key] = array
    try:
        estimator.load_network_state(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _Invalid(f"{label}: the stored network weights cannot be used: {exc}") from None


def _rebuild_pipeline(cls, description, arrays, prefix, label, depth):
    steps = description.get("steps", _MISSING)
    if not (isinstance(steps, list) and steps):
        raise _Invalid(f"{label}: steps must be a non-empty list of [name, estimator] pairs, "
                       f"got {_show(steps)}")
    params = description.get("params", {})
    if not isinstance(params, dict) or set(params) - {"memory", "verbose"}:
        raise _Invalid(f"{label}: params must be a JSON object with 'memory' and 'verbose', "
                       f"got {_show(params)}")
    if params.get("memory") is not None:
        raise _Invalid(f"{label}: memory must be null, got {_show(params['memory'])}")
    verbose = params.get("verbose", False)
    if not isinstance(verbose, bool):
        raise _Invalid(f"{label}: verbose must be true or false, got {_show(verbose)}")
    built = []
    for i, item in enumerate(steps):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise _Invalid(f"{label}: steps[{i}] must be a [name, estimator] pair, got "
                           f"{_show(item)}")
        step_name, step_description = item
        if (not step_name or "__" in step_name or step_name in ("steps", "memory", "verbose",
                                                                "transform_input")
                or step_name in dict(built)):
            raise _Invalid(f"{label}: steps[{i}] has the name {step_name!r}; step names must "
                           "be unique, non-empty, without '__' and not a Pipeline parameter")
        where = f"{label}.steps[{i}] {step_name!r}"
        step = None if step_description is None else _rebuild(
            step_description, arrays, f"{prefix}{step_name}/", where, depth + 1)
        if i < len(steps) - 1 and step is not None and not hasattr(step, "transform"):
            raise _Invalid(f"{where} is a {type(step).__name__}, which has no transform, so "
                           "it can only be the last step of a pipeline")
        built.append((step_name, step))
    pipeline = cls(built, verbose=verbose)
    try:
        pipeline._validate_params()
    except (ValueError, TypeError) as exc:
        raise _Invalid(f"{label}: {exc}") from None
    _check_steps_agree(built, label)
    return pipeline


def _rebuild_members(items, arrays, prefix, label, depth):
    """The ``members`` list of an ensemble: [name, estimator] pairs, unique names."""
    if not (isinstance(items, list) and items):
        raise _Invalid(f"{label}: members must be a non-empty list of [name, estimator] "
                       f"pairs, got {_show(items)}")
    built = []
    for i, item in enumerate(items):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and item[0] and "__" not in item[0] and item[0] not in dict(built)):
            raise _Invalid(f"{label}: members[{i}] must be a [name, estimator] pair with a "
                           f"unique name without '__', got {_show(item)}")
        name, member = item
        built.append((name, _rebuild(member, arrays, f"{prefix}members/{name}/",
                                     f"{label}.members[{i}] {name!r}", depth + 1)))
    return built


def _rebuild_ensemble(cls, description, arrays, prefix, label, depth):
    members = _rebuild_members(description.get("members", _MISSING), arrays, prefix, label,
                               depth)
    ensemble = _construct(cls, description, label, members=members)
    fitted = _set_fitted(ensemble, description, arrays, label)
    items = description.get("fitted_members", _MISSING)
    if not fitted:
        if items is not _MISSING:
            raise _Invalid(f"{label} has fitted members but no fitted attributes")
        return ensemble
    if not (isinstance(items, list) and len(items) == len(members)):
        raise _Invalid(f"{label}: fitted_members must be a list of {len(members)} fitted "
                       f"estimators (one per member), got {_show(items)}")
    ensemble.members_ = [
        _rebuild(item, arrays, f"{prefix}members_/{i}/",
                 f"{label}.fitted_members[{i}] {members[i][0]!r}", depth + 1)
        for i, item in enumerate(items)]
    f = _Fitted(ensemble, label)
    f.number("offset_")
    f.number("pixel_threshold_")
    _check_calibration(f)
    f.integer("n_train_images_")
    f.integer("n_validation_images_", low=2)
    for key in ("score_loc_", "score_scale_", "map_loc_", "map_scale_"):
        f.array(key, "f", (len(members),), np.float64, finite=True)
    for key in ("score_scale_", "map_scale_"):
        if not np.all(getattr(ensemble, key) > 0):
            raise _Invalid(f"{label}: {key} must hold positive spreads")
    return ensemble


def _check_steps_agree(steps, label):
    """Fitted steps after a fitted FeatureExtractor expect its features and grid."""
    source = None
    for name, step in steps:
        state = {} if step is None else vars(step)
        if "feature_dim_" in state:
            source = name, state["feature_dim_"], tuple(state["grid_shape_"])
            continue
        if source is None:
            continue
        if "n_features_in_" in state and state["n_features_in_"] != source[1]:
            raise _Invalid(f"{label}: step {name!r} was fitted on {state['n_features_in_']} "
                           f"features per patch, but step {source[0]!r} makes {source[1]}")
        if "grid_shape_" in state and tuple(state["grid_shape_"]) != source[2]:
            raise _Invalid(f"{label}: step {name!r} was fitted on grid "
                           f"{tuple(state['grid_shape_'])}, but step {source[0]!r} makes "
                           f"{source[2]}")


def _steps(model):
    """Every estimator inside ``model`` (pipelines flattened, passthrough steps left out)."""
    if isinstance(model, Pipeline):
        for _, step in model.steps:
            if step is not None and step != "passthrough":
                yield from _steps(step)
    else:
        yield model


def _model_text(model):
    if isinstance(model, Pipeline):
        inner = " -> ".join(_model_text(step) if step not in (None, "passthrough")
                            else "passthrough" for _, step in model.steps)
        return f"{type(model).__name__}({inner})"
    return type(model).__name__


def _check_can_score(model, path):
    """ValueError unless ``model`` is a fitted detector or a pipeline ending in one, or a
    fitted ensemble of such models."""
    from ._base import BaseDetector
    from ._trained import TrainedDetector
    from .ensemble import AnomalyEnsemble

    final = model
    while isinstance(final, Pipeline):
        final = final.steps[-1][1]
    if isinstance(final, AnomalyEnsemble) and final is model:
        if "members_" not in vars(model):
            raise ValueError(f"{str(path)!r} holds an unfitted AnomalyEnsemble, so it cannot "
                             "score. Fit the model before saving it (or use the file written "
                             "by `skpatchcore fit --ensemble`).")
        for member in model.members_:
            _check_can_score(member, path)
        return
    if not isinstance(final, BaseDetector | TrainedDetector):
        raise ValueError(
            f"{str(path)!r} holds a {_model_text(model)}, which cannot score images: a model "
            "for scoring is a fitted PatchCoreDetector, SPADEDetector or PaDiMDetector, or a "
            "pipeline ending in one, or a fitted StudentTeacherDetector, DistillationDetector "
            "or FocusDistributionDetector, or an AnomalyEnsemble of such models. Use a model "
            "file written by `skpatchcore fit`, or save such a model with save_model."
        )
    for step in _steps(model):
        try:
            check_is_fitted(step)
        except NotFittedError:
            what = (f"an unfitted {type(step).__name__}" if step is model else
                    f"a {_model_text(model)} whose {type(step).__name__} is not fitted")
            raise ValueError(
                f"{str(path)!r} holds {what}, so it cannot score. Fit the model before saving "
                "it (or use the file written by `skpatchcore fit`)."
            ) from None


def _model_file(path):
    """The existing file ``load_model(path)`` reads: ``path``, or ``path`` + '.npz' as
    :func:`save_model` would have written it."""
    raw = _path_text(path, "load_model", "read")
    given = Path(raw)
    if given.is_file():
        return given
    with_npz = None
    if given.suffix != ".npz" and given.name not in ("", ".", ".."):
        with_npz = given.with_name(given.name + ".npz")
        if with_npz.is_file():
            return with_npz
    if given.is_dir():
        raise ValueError(f"Model file {raw!r} is a folder, not a model file; give the .npz "
                         f"file, e.g. {str(given / 'model.npz')!r}.")
    if given.exists():
        raise ValueError(f"Model file {raw!r} is not a regular file; give the .npz file "
                         "written by save_model or `skpatchcore fit -o`.")
    tried = f" (nor does {str(with_npz)!r})" if with_npz is not None else ""
    raise FileNotFoundError(f"Model file {raw!r} does not exist{tried}. Check the path, or "
                            "write the model first (save_model, or `skpatchcore fit ... -o "
                            "FILE`).")


def _sniff(head):
    """What a file that is not a zip archive looks like, from its first bytes."""
    if head.startswith(b"\x93NUMPY"):
        return "a single NumPy array (.npy), not an .npz archive"
    if head[:1] == b"\x80":
        return ("a Python pickle (e.g. joblib.dump), not an .npz archive; load it with "
                "joblib.load only if you trust its source")
    return f"not an .npz (zip) archive at all (it starts with {head!r})"


def _read_arrays(path):
    """Every array in the .npz ``path``; ValueError saying what the file is otherwise."""
    where = str(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"Model file {where!r} cannot be read ({exc.strerror or exc}); check "
                         "that it is a file you may read.") from None
    if not head:
        raise ValueError(f"{where!r} is not a complete skpatchcore model file: it is empty "
                         f"(0 bytes), e.g. from an interrupted copy. {_CHECK_PATH}")
    if not head.startswith(b"PK"):
        raise ValueError(f"{where!r} is not a complete skpatchcore model file: it is "
                         f"{_sniff(head)}. {_CHECK_PATH}")
    names, arrays, key = [], {}, None
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if _META_KEY in names:
                for key in names:
                    arrays[key] = npz[key]
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, NotImplementedError,
            RuntimeError, MemoryError, ValueError) as exc:
        part = "" if key is None else f" (reading {key!r})"
        raise ValueError(f"{where!r} is not a complete skpatchcore model file: the .npz "
                         f"archive is truncated or damaged{part}: {type(exc).__name__}: "
                         f"{exc}. {_CHECK_PATH}") from None
    if _META_KEY not in names:
        raise ValueError(
            f"{where!r} is an .npz (zip) file but not a skpatchcore model (it has no "
            f"{_META_KEY!r} entry; it holds {sorted(names)[:5]}). {_CHECK_PATH}")
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise _damaged(path, f"its entry {key!r} is not a NumPy array")
    return arrays


def _damaged(path, detail, advice=None):
    return ValueError(f"{str(path)!r} is not a valid skpatchcore model file: "
                      f"{detail.rstrip('.')}. "
                      + ("The file is damaged or was changed after it was saved; "
                         + _SAVE_AGAIN if advice is None else advice[0].upper() + advice[1:])
                      + ".")


def _read_metadata(path, arrays):
    raw = arrays.pop(_META_KEY)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _damaged(path, f"its metadata must be a 1-D uint8 array, got {_show(raw)}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _damaged(path, f"its metadata is not valid JSON ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, f"its metadata must be a JSON object, got {_show(meta)}")
    version = meta.get("format_version", _MISSING)
    if version is _MISSING:
        raise _damaged(path, "its metadata has no format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _damaged(path, f"format_version must be a positive integer, got {_show(version)}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was written by skpatchcore {meta.get('skpatchcore')} in model format "
            f"{version}; this skpatchcore ({__version__}) reads format {FORMAT_VERSION} and "
            "older. Upgrade skpatchcore to load it."
        )
    return meta


def load_model(path, *, require_detector=False):
    """Read a model written by :func:`save_model`. No code from the file is executed.

    The whole file is checked before a model is returned: format version, the structure of
    the description, every parameter (each estimator's ``_validate_params``) and the fitted
    attributes each estimator needs (types, dtypes, shapes, finite values, and agreement
    between a pipeline's steps). Parameters and fitted attributes added to skpatchcore after
    a file was written take the values that reproduce the saved model.

    Parameters
    ----------
    path : str or path-like
        The model file. When it does not exist but ``path + '.npz'`` does (what
        ``save_model(model, path)`` writes), that file is read.
    require_detector : bool, default=False
        False returns any saved estimator or pipeline, fitted or not. True also requires a
        model that can score: a fitted :class:`~skpatchcore.PatchCoreDetector`,
        :class:`~skpatchcore.SPADEDetector` or :class:`~skpatchcore.PaDiMDetector`, or a
        pipeline whose final step is one and whose steps are all fitted (what
        ``skpatchcore predict`` needs).

    Returns
    -------
    model : estimator or Pipeline

    Raises
    ------
    FileNotFoundError
        Neither ``path`` nor ``path + '.npz'`` exists.
    ValueError
        The file is not a complete or valid skpatchcore model (the message names the file,
        says what is wrong and what to do), was written in a newer format, or, with
        ``require_detector=True``, holds a model that cannot score.
    """
    path = _model_file(path)
    arrays = _read_arrays(path)
    meta = _read_metadata(path, arrays)
    try:
        if "model" not in meta:
            raise _Invalid("its metadata has no 'model' entry")
        model = _rebuild(meta["model"], arrays, "", "model")
    except _Invalid as exc:
        advice = None
        writer = meta.get("skpatchcore")
        if exc.advice is _OTHER_VERSION and isinstance(writer, str) and writer != __version__:
            advice = (f"it was written by skpatchcore {writer} and this is {__version__}: "
                      f"load it with skpatchcore {writer}, or {_SAVE_AGAIN}")
        raise _damaged(path, exc.detail, advice) from None
    if require_detector:
        _check_can_score(model, path)
    return model
