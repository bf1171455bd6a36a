"""Every method by name: one place that the CLI, evaluate and the report ask (it imports
neither torch nor scikit-learn, so that the report of an exported model needs neither).

Two families share one interface (fit on good images; ``score_and_map``,
``iter_score_and_grids``, ``predict_map``, ``calibrate``, ``offset_``):

* the memory-bank and density methods on frozen features, 'patchcore', 'spade' and 'padim':
  a :class:`~skpatchcore.PatchCorePipeline` of a :class:`~skpatchcore.FeatureExtractor` and
  a detector (:func:`~skpatchcore.make_anomaly_pipeline`);
* the methods that train networks on the good images, 'students', 'mkd' and 'fyd': one
  estimator from images to scores and maps (:class:`~skpatchcore._trained.TrainedDetector`).
"""

from __future__ import annotations

import importlib

from ._checks import check_model

__all__ = ["METHODS", "METHOD_OF_CLASS", "TRAINED_METHODS", "check_model", "final_estimator",
           "is_trained", "make_model", "map_geometry", "method_of", "pixel_threshold"]

#: method name -> (module, class) of the methods that train networks.
TRAINED_METHODS = {
    "students": ("skpatchcore.students", "StudentTeacherDetector"),
    "mkd": ("skpatchcore.mkd", "DistillationDetector"),
    "fyd": ("skpatchcore.fyd", "FocusDistributionDetector"),
}
#: Every method name, the feature-based ones first.
METHODS = ("patchcore", "spade", "padim", *TRAINED_METHODS)
#: final estimator's class name -> method name.
METHOD_OF_CLASS = {"PatchCoreDetector": "patchcore", "SPADEDetector": "spade",
                   "PaDiMDetector": "padim",
                   **{name: method for method, (_, name) in TRAINED_METHODS.items()}}


def trained_class(method):
    """The estimator class of a trained method."""
    module, name = TRAINED_METHODS[method]
    return getattr(importlib.import_module(module), name)


def make_model(method="patchcore", *, ensemble=False, **params):
    """An unfitted model of ``method``, with parameters by plain name.

    Parameters
    ----------
    method : str, default='patchcore'
        One of :data:`METHODS`.
    ensemble : bool, default=False
        'patchcore' only: :func:`~skpatchcore.make_ensemble`, two PatchCore pipelines whose
        standardised scores and maps are averaged (``params`` go to both members, or to the
        ensemble for its own parameters).
    **params
        For 'patchcore', 'spade' and 'padim', parameters of the pipeline's steps (see
        :func:`~skpatchcore.make_anomaly_pipeline`); for the trained methods, the
        estimator's own parameters. Unknown names raise TypeError naming the valid ones.

    Returns
    -------
    model : PatchCorePipeline, TrainedDetector or AnomalyEnsemble

    Examples
    --------
    >>> from skpatchcore.methods import make_model
    >>> type(make_model("mkd", max_epochs=5)).__name__
    'DistillationDetector'
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}.")
    if ensemble:
        if method != "patchcore":
            raise ValueError(f"ensemble=True combines PatchCore models, not {method!r}.")
        from .ensemble import make_ensemble

        return make_ensemble(**params)
    if method not in TRAINED_METHODS:
        from .pipeline import make_anomaly_pipeline

        return make_anomaly_pipeline(method, **params)
    cls = trained_class(method)
    unknown = sorted(set(params) - set(cls._get_param_names()))
    if unknown:
        raise TypeError(f"Unknown parameters {unknown} for method {method!r}; valid names are "
                        f"{cls._get_param_names()}.")
    return cls(**params)


def final_estimator(model):
    """The estimator holding ``offset_``: the last step of a pipeline (or of a list standing
    in for one, as an exported model's description), or the model itself."""
    return model[-1] if hasattr(model, "steps") or isinstance(model, list | tuple) else model


def pixel_threshold(model):
    """The default threshold of a fitted model's maps (masks, overlay outlines):
    ``pixel_threshold_`` of a trained detector (its maps need not be in the scores' units),
    else ``-offset_``, the image threshold."""
    final = final_estimator(model)
    return getattr(final, "pixel_threshold_", -final.offset_)


def map_geometry(model):
    """The :class:`~skpatchcore._geometry.Geometry` that puts a fitted model's maps from
    ``iter_score_and_grids`` back on the images' pixels."""
    if hasattr(model, "steps"):
        return model._extractor()._geometry
    return model._geometry


def is_trained(model):
    """Whether a model is one of the trained methods (an estimator from images, not a
    pipeline of features)."""
    return method_of(model) in TRAINED_METHODS


def method_of(model):
    """The method name of a model, from its final estimator's class name (None when it is
    none of :data:`METHODS`)."""
    return METHOD_OF_CLASS.get(type(final_estimator(model)).__name__)
