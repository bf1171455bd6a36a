"""Checks shared by the steps: feature arrays, ``n_features_in_`` and fit-time labels."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.validation import validate_data

from ._containers import PatchFeatures

__all__ = ["check_features", "normal_mask", "validate_features"]


def check_features(F, name="F", allow_2d=True):
    """Validate feature grids (n, h, w, d) or rows (n, d); return a float32 ndarray."""
    if isinstance(F, torch.Tensor):
        F = F.detach().cpu().numpy()
    try:
        F = np.asarray(F, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric array of feature grids (n, h, w, d)"
                         + (" or rows (n, d)" if allow_2d else "") + ".") from None
    shapes = "(n_images, h, w, d)" + (" or (n_samples, n_features)" if allow_2d else "")
    if F.ndim not in ((2, 4) if allow_2d else (4,)):
        hint = (" Raw images go through FeatureExtractor first." if F.ndim == 3 else "")
        raise ValueError(f"{name} must have shape {shapes}, got {F.shape}.{hint}")
    if F.shape[0] == 0 or F.shape[-1] == 0:
        raise ValueError(f"{name} of shape {F.shape} is empty.")
    if not np.isfinite(F).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return F


def _check_n_features(estimator, d, reset):
    if reset:
        estimator.n_features_in_ = int(d)
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif d != estimator.n_features_in_:
        raise ValueError(
            f"X has {d} features per patch, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features. Use the same FeatureExtractor settings "
            "as in fit."
        )


def validate_features(estimator, X, *, reset):
    """Feature grids (n, h, w, d), rows (n, d) or :class:`PatchFeatures` -> float32 ndarray
    (PatchFeatures are returned as they are, unread); sets/checks ``n_features_in_`` (= d)
    like scikit-learn's ``validate_data``."""
    if isinstance(X, PatchFeatures):
        if len(X) == 0:
            raise ValueError("X holds no samples.")
        _check_n_features(estimator, X.sample_shape[-1], reset)
        return X
    if isinstance(X, np.ndarray | torch.Tensor) and X.ndim == 4:
        X = check_features(X, "X", allow_2d=False)
        _check_n_features(estimator, X.shape[-1], reset)
        return X
    if getattr(X, "ndim", 2) == 3:
        raise ValueError(f"X must have shape (n_images, h, w, d) or (n_samples, n_features), "
                         f"got {X.shape}. Raw images go through FeatureExtractor first.")
    return validate_data(estimator, X, reset=reset, dtype=np.float32)


def normal_mask(y, n, name="y"):
    """Boolean mask of the samples to fit on: everything except y == -1. None keeps all.

    Labels follow IsolationForest's convention: +1 normal, -1 anomalous (left out of the
    fit). Any other label (0/1 labels, class labels) is refused: it cannot mean that
    convention, and silently keeping every sample would fit on the defects a user meant to
    exclude.
    """
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be 1-D with one label per sample ({n}), got shape "
                         f"{y.shape}.")
    try:
        values = set(np.unique(y).tolist())
    except TypeError:  # unorderable mixtures
        values = {repr(v) for v in y.tolist()}
    other = sorted(map(repr, values - {1, -1}))
    if other:
        raise ValueError(
            f"{name} holds labels {', '.join(other[:5])}; fit takes y=None (every sample "
            "normal) or IsolationForest's convention, +1 for normal and -1 for anomalous "
            "samples (left out of the fit). For 0/1 labels with 1 = defect pass "
            "np.where(y == 1, -1, 1).")
    keep = y != -1
    if not keep.any():
        raise ValueError(f"Every sample is labelled -1 (anomalous) in {name}; the memory bank "
                         "needs normal samples (y=+1 or y=None).")
    return None if keep.all() else keep
