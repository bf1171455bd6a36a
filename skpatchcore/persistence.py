"""A safe model file: arrays in a NumPy ``.npz`` and everything else as JSON.

``save_model(model, path)`` writes one ``.npz`` file; ``load_model(path)`` reads it back
with ``allow_pickle=False``, so loading never executes code from the file. Only skpatchcore's
own estimator classes (and scikit-learn's ``Pipeline``) can be rebuilt, by name, from an
allow-list. Network weights are not stored: they are rebuilt from the backbone name and checked
by SHA-256 (random weights, ``weights=None``, are stored since they cannot be rebuilt).

joblib/pickle also work for every estimator and pipeline; prefer this format for models that
travel between machines or people.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.pipeline import Pipeline

from ._version import __version__

__all__ = ["load_model", "save_model"]

FORMAT_VERSION = 1
# class -> {parameter: value that reproduces models saved before it existed}
_ADDED_PARAMS = {"FeatureExtractor": {"border": 0, "scales": (1.0,)}}
_ADDED_FITTED = {
    "FeatureExtractor": {"border_": 0, "scales_": (1.0,)},
    # the tabular leave-one-out record: older files score rows without it
    "PatchCoreDetector": {"bank_sample_index_": None, "train_row_keys_": None,
                          "train_row_samples_": None},
    "SPADEDetector": {"train_row_keys_": None, "train_row_samples_": None},
    "PaDiMDetector": {"train_row_samples_": None},
}
_META_KEY = "__skpatchcore_meta__"


def _classes():
    from .coreset import CoresetSampler
    from .detector import PatchCoreDetector
    from .features import FeatureExtractor
    from .pipeline import PatchCorePipeline

    classes = {c.__name__: c for c in (FeatureExtractor, CoresetSampler, PatchCoreDetector,
                                       PatchCorePipeline, Pipeline)}
    for module, name in (("spade", "SPADEDetector"), ("padim", "PaDiMDetector")):
        try:
            mod = __import__(f"skpatchcore.{module}", fromlist=[name])
            classes[name] = getattr(mod, name)
        except (ImportError, AttributeError):
            pass
    return classes


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


def _from_json(value):
    if isinstance(value, dict) and "items" in value:
        items = [_from_json(v) for v in value["items"]]
        return tuple(items) if value["__tuple__"] else items
    return value


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
    params = {k: _jsonable(v, f"{name}.{k}") for k, v in estimator.get_params(deep=False).items()}
    fitted = {}
    for key, value in vars(estimator).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, np.ndarray):
            arrays[f"{prefix}{key}"] = value
            fitted[key] = {"__array__": f"{prefix}{key}"}
        else:
            fitted[key] = _jsonable(value, f"{name}.{key}")
    description = {"class": name, "params": params, "fitted": fitted}
    state = estimator.network_state() if fitted and hasattr(estimator, "network_state") else None
    if state is not None:
        for k, v in state.items():
            arrays[f"{prefix}network/{k}"] = v
        description["network_state"] = list(state)
    return description


def _rebuild(description, arrays, prefix):
    classes = _classes()
    name = description.get("class")
    if name not in classes:
        raise ValueError(f"The model file names an unknown class {name!r}; it was written by a "
                         "different skpatchcore. Refit, or load it with that version.")
    cls = classes[name]
    if "steps" in description:
        steps = [(step_name, None if d is None else _rebuild(d, arrays, f"{prefix}{step_name}/"))
                 for step_name, d in description["steps"]]
        return cls(steps)
    params = {k: _from_json(v) for k, v in description["params"].items()}
    # Parameters added after a file was written take the value that reproduces the old
    # behaviour, not today's default.
    for key, value in _ADDED_PARAMS.get(name, {}).items():
        params.setdefault(key, value)
    try:
        estimator = cls(**params)
    except TypeError as exc:
        raise ValueError(f"The saved {name} parameters do not fit this skpatchcore "
                         f"({__version__}): {exc}. Refit the model.") from None
    for key, value in description["fitted"].items():
        if isinstance(value, dict) and "__array__" in value:
            value = arrays[value["__array__"]]
        else:
            value = _from_json(value)
        setattr(estimator, key, value)
    if description["fitted"]:
        for key, value in _ADDED_FITTED.get(name, {}).items():
            if key not in description["fitted"]:
                setattr(estimator, key, value)
    if "network_state" in description:
        estimator.load_network_state({k: arrays[f"{prefix}network/{k}"]
                                      for k in description["network_state"]})
    return estimator


def save_model(model, path):
    """Write a fitted estimator or pipeline to ``path`` (a ``.npz`` file) safely.

    Parameters
    ----------
    model : estimator or Pipeline
        Any skpatchcore estimator or a Pipeline of them, fitted or not.
    path : str or Path
        Destination; '.npz' is appended when missing.

    Returns
    -------
    path : Path
        The file written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(path)  # never leave a half-written model under the real name
    return path


def load_model(path):
    """Read a model written by :func:`save_model`. No code from the file is executed.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a complete skpatchcore model, or was written by a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file {str(path)!r} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} is not a complete skpatchcore model file "
                         f"({type(exc).__name__}: {exc}). Save the model again.") from None
    if _META_KEY not in arrays:
        raise ValueError(f"{str(path)!r} is an .npz file but not a skpatchcore model (no "
                         "metadata). Save models with skpatchcore.save_model.")
    try:
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} has corrupt metadata ({exc}).") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} was written by skpatchcore {meta.get('skpatchcore')} in model format "
            f"{meta.get('format_version')}; this skpatchcore ({__version__}) reads format "
            f"{FORMAT_VERSION} and older. Upgrade skpatchcore to load it."
        )
    try:
        return _rebuild(meta["model"], arrays, "")
    except KeyError as exc:
        raise ValueError(f"{str(path)!r} is missing {exc}; the file is incomplete. Save the "
                         "model again.") from None
