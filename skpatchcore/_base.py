"""What every skpatchcore detector shares, written once.

* :class:`ThresholdMixin`: ``decision_function``, ``predict`` and ``calibrate`` on top of
  ``score_samples`` and ``offset_``, with :func:`contamination_offset` for ``offset_``.
* :class:`BaseDetector`: anomaly maps from patch-score grids (``predict_map``), input checks,
  and the one rule for tabular leave-one-out scoring (:class:`TrainingRows`).
* :class:`MemoryBankDetector`: what PatchCore and SPADE share (as scikit-learn's
  ``NeighborsBase`` does for its neighbour estimators): turning any fit input into a
  :class:`~skpatchcore.MemoryBank`, cached search indexes that are never pickled, and
  leave-one-out training scores read a bounded number of samples at a time.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted

from ._containers import MemoryBank, PatchFeatures
from ._geometry import upsample_maps
from ._utils import labels_from_decision, masks_above, progress, resolve_device
from ._validation import check_features, normal_mask, validate_features
from .neighbors import make_index

__all__ = ["BaseDetector", "MemoryBankDetector", "PixelThresholdMixin", "ThresholdMixin",
           "contamination_offset"]

# Query rows scored per chunk, in fit and in scoring (65536 x 168 float32 = 44 MB).
SCORE_CHUNK_ROWS = 65536


def contamination_offset(train_scores, contamination, name):
    """``offset_`` from leave-one-out training ``score_samples`` values (higher = normal).

    'auto' is Tukey's fence on the anomaly scores: an outlier has an anomaly score above
    Q3 + 1.5 IQR of the training anomaly scores. A float is that quantile of the training
    scores. Non-finite scores (a sample with no eligible neighbour) are left out.
    """
    train_scores = np.asarray(train_scores, dtype=np.float64)
    train_scores = train_scores[np.isfinite(train_scores)]
    if train_scores.size == 0:
        raise ValueError(
            f"{name} could not score any training sample leave-one-out (every sample's "
            "neighbours are its own rows); use a larger coreset (sampling_ratio or n_samples)."
        )
    if contamination == "auto":
        q1, q3 = np.percentile(train_scores, [25.0, 75.0])
        return float(q1 - 1.5 * (q3 - q1))
    return float(np.percentile(train_scores, 100.0 * contamination))


#: Fewer held-out good images than this set a threshold only roughly (a warning says so).
FEW_HELD_OUT = 10


def warn_if_few_held_out(n_held, what):
    """Warn that ``what`` (set from ``n_held`` held-out good images) is rough when they
    are fewer than :data:`FEW_HELD_OUT`."""
    if n_held < FEW_HELD_OUT:
        warnings.warn(
            f"Only {n_held} held-out good images set {what}: a rough estimate; hold out more "
            f"(validation_fraction, or more training images: at least {FEW_HELD_OUT} held "
            "out), or calibrate(X_good_more) afterwards.", stacklevel=3)


def mean_finite(dist):
    """Mean over axis 1 of distances (n, k), skipping inf (a neighbour that does not exist);
    inf when none exists. The one rule every detector applies to missing neighbours."""
    if dist.shape[1] == 1:
        return dist[:, 0]
    finite = np.isfinite(dist)
    count = finite.sum(axis=1)
    total = np.where(finite, dist, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


class ThresholdMixin:
    """decision_function, predict and calibrate on top of ``score_samples`` and ``offset_``."""

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for outliers, positive for inliers.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d) or array-like (n_samples, d)

        Returns
        -------
        decision : ndarray of shape (n,), float64
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for inliers, -1 for outliers (``decision_function(X) < 0``, or not a number).

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d) or array-like (n_samples, d)

        Returns
        -------
        labels : ndarray of shape (n,), int
        """
        return labels_from_decision(self.decision_function(X))  # NaN never says "good"

    def calibrate(self, X, fpr=0.01):
        """Set the operating threshold from held-out normal samples only.

        ``offset_`` becomes the ``fpr`` quantile of ``score_samples(X)``, so about a fraction
        ``fpr`` of normal samples like X are predicted -1. No labelled defects are needed.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d) or (n_samples, d)
            Features of normal samples that were not used in fit.
        fpr : float in (0, 1), default=0.01
            Target false-positive rate on normal data.

        Returns
        -------
        self : estimator
        """
        check_is_fitted(self)
        check_fpr(fpr)
        scores = self.score_samples(X)
        if not np.isfinite(scores).all():
            raise ValueError("Some calibration samples score NaN or infinity; calibrate on "
                             "normal samples that the model can score.")
        if len(scores) * fpr < 1:
            warnings.warn(
                f"Calibrating fpr={fpr} on {len(scores)} samples: fewer than one false positive "
                f"is expected, so the threshold is the lowest normal score; use at least "
                f"{int(np.ceil(1 / fpr))} normal samples for a meaningful estimate.",
                stacklevel=2,
            )
        self.offset_ = float(np.quantile(scores, fpr))
        self.calibration_fpr_ = float(fpr)
        self.calibration_n_samples_ = int(len(scores))
        return self


class PixelThresholdMixin:
    """``predict_mask`` for models whose maps are not in the units of their image scores:
    the default threshold is their own ``pixel_threshold_``."""

    def predict_mask(self, X, threshold=None, sigma=4.0):
        """Boolean defect masks: map values above ``threshold``.

        Parameters
        ----------
        X : images
        threshold : float or None, default=None
            Threshold on :meth:`predict_map` values. None: ``pixel_threshold_``, the
            ``contamination`` rule applied to the peaks of the held-out good images' maps
            at ``sigma`` = 4.
        sigma : float, default=4.0
            As in :meth:`predict_map`.

        Returns
        -------
        masks : ndarray of bool (n, H, W), or a list when sizes differ.
        """
        check_is_fitted(self)
        threshold = self.pixel_threshold_ if threshold is None else threshold
        return masks_above(self.predict_map(X, sigma), threshold)


def check_fpr(fpr):
    """ValueError unless ``fpr`` is a number in the open interval (0, 1)."""
    if isinstance(fpr, bool) or not isinstance(fpr, int | float | np.number) or not (
            0.0 < fpr < 1.0):
        raise ValueError(f"fpr must be a number in (0, 1), got {fpr!r}.")


def _row_keys(X):
    """64-bit BLAKE2 digests of float32 rows (-0.0 counted as 0.0), stable across
    processes."""
    X = np.ascontiguousarray(X, dtype=np.float32) + np.float32(0.0)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
         for row in X),
        dtype=np.uint64, count=X.shape[0],
    )


class BaseDetector(ThresholdMixin, OutlierMixin, BaseEstimator):
    """Maps, input checks and the tabular leave-one-out rule, for every detector.

    Subclasses implement ``score_samples`` and ``_patch_grids(X)`` (patch-score grids
    (n, h, w), higher = more anomalous, for validated grids X) and call
    :meth:`_remember_training_rows` in ``fit``.

    The tabular leave-one-out rule: on 2-D input, a query row whose float32 values equal a
    training row's (``-0.0 == 0.0``) is taken to be that training sample and is scored as in
    fit, without its own contribution. So ``fit(X).predict(X)`` flags about
    ``contamination * n`` samples, as with IsolationForest; a genuinely new sample that
    happens to equal a training row gets that row's leave-one-out score. Training rows are
    recognised by a 64-bit digest (``train_row_keys_``), so the data need not be kept.
    Feature grids are always scored as they are: a copy of a training image scores as a
    perfect match.
    """

    def _remember_training_rows(self, rows):
        """Record the training rows (2-D, in sample order) for the tabular rule; None for
        grids."""
        if rows is None:
            self.train_row_keys_ = self.train_row_samples_ = None
            return
        keys = _row_keys(rows)
        order = np.argsort(keys, kind="stable")
        self.train_row_keys_ = keys[order]
        self.train_row_samples_ = order.astype(np.int64)

    def _training_samples_of(self, X):
        """For 2-D X: the training sample each row equals, or -1; None when none does."""
        known = getattr(self, "train_row_keys_", None)
        if X.ndim != 2 or known is None or len(known) == 0:
            return None
        keys = _row_keys(X)
        pos = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        seen = known[pos] == keys
        if not seen.any():
            return None
        return np.where(seen, self.train_row_samples_[pos], -1)

    def _check_grids(self, X):
        """Validated test feature grids (n, h, w, d), float32."""
        X = check_features(X, "X", allow_2d=False)
        return validate_features(self, X, reset=False)

    def predict_map(self, X, output_size=None, sigma=4.0):
        """Patch anomaly maps: higher = more anomalous, in the units of ``-score_samples``.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d)
            Test feature grids.
        output_size : (int, int) or None, default=None
            None returns the patch-score grids (n, h, w). Otherwise each grid is upsampled
            bilinearly to (H, W) and smoothed with a Gaussian of standard deviation ``sigma``
            output pixels. (To get maps on each original image's own pixels, use
            :meth:`PatchCorePipeline.predict_map`.)
        sigma : float, default=4.0
            Gaussian smoothing in output pixels (0 disables); used only with output_size.

        Returns
        -------
        maps : ndarray of shape (n, h, w) or (n, H, W), float32
        """
        check_is_fitted(self)
        grids = self._patch_grids(self._check_grids(X))
        if output_size is None:
            return grids
        return upsample_maps(grids, output_size, sigma)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class MemoryBankDetector(BaseDetector):
    """Shared fit and search logic of the detectors that keep a bank of normal patches.

    Subclasses set ``_min_train_samples`` and use :meth:`_bank_from`, :meth:`_index` and
    :meth:`_map_chunks`.
    """

    _min_train_samples = 2

    def _bank_from(self, X, y):
        """Any fit input -> a :class:`MemoryBank` of normal samples; sets ``n_features_in_``
        and the tabular training-row record.

        A MemoryBank is taken as it is (its sampler already applied y). Feature grids
        (n, h, w, d), :class:`PatchFeatures` and 2-D rows become the full bank of their
        normal samples (y == -1 left out).
        """
        if isinstance(X, MemoryBank):
            bank = X
            validate_features(self, bank.training_features, reset=True)
        else:
            if not isinstance(X, PatchFeatures):
                X = validate_features(self, X, reset=True)
                X = PatchFeatures.from_array(X)
            else:
                validate_features(self, X, reset=True)
            keep = normal_mask(y, len(X))
            if keep is not None:
                X = X.take(np.flatnonzero(keep))
            per_sample = X.cells_per_sample
            rows = np.ascontiguousarray(np.asarray(X).reshape(-1, X.sample_shape[-1]))
            bank = MemoryBank(rows, np.repeat(np.arange(len(X)), per_sample), X)
        tabular = bank.training_features.ndim == 2
        self._begin_bank_fit(len(bank.training_features),
                             np.asarray(bank.training_features) if tabular else None)
        return bank

    def _begin_bank_fit(self, n_train, training_rows=None):
        """Check the number of normal training samples and record the tabular training rows
        (``training_rows``: the 2-D rows in sample order; None for feature grids)."""
        if n_train < self._min_train_samples:
            raise ValueError(
                f"{type(self).__name__} needs at least {self._min_train_samples} normal "
                f"training samples (leave-one-out training scores set offset_), got "
                f"n_samples={n_train}."
            )
        self._remember_training_rows(training_rows)

    def _index(self, name, rows):
        """The search index over ``rows``, built once per fitted model (not pickled)."""
        cache = self.__dict__.setdefault("_indexes", {})
        if name not in cache:
            cache[name] = make_index(rows, self.knn_backend, resolve_device(self.device),
                                     random_state=0)
        return cache[name]

    def _reset_indexes(self):
        self.__dict__.pop("_indexes", None)

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: pickling keeps this object's indexes
        state.pop("_indexes", None)
        return state

    def _map_chunks(self, fn, X, query_groups=None, desc="search"):
        """``fn(chunk, groups)`` over a bounded number of rows of X at a time, results
        concatenated along axis 0 (one tuple element at a time).

        X is an ndarray (n, h, w, d) / (n, d) or a :class:`PatchFeatures`; ``groups`` is the
        slice of ``query_groups`` for the chunk (None without).
        """
        n = X.shape[0]
        per_sample = int(np.prod(X.shape[1:-1], dtype=np.int64))
        step = max(1, SCORE_CHUNK_ROWS // per_sample)
        verbose = getattr(self, "verbose", False) and n > 1
        if n <= step and isinstance(X, np.ndarray) and not verbose:
            return fn(X, query_groups)
        parts = []
        bar = progress(total=n, desc=desc, unit="sample", disable=not verbose)
        try:
            for a in range(0, n, step):
                groups = None if query_groups is None else query_groups[a : a + step]
                chunk = np.asarray(X[a : a + step], dtype=np.float32)
                parts.append(fn(chunk, groups))
                bar.update(len(chunk))
        finally:
            bar.close()
        if isinstance(parts[0], tuple):
            return tuple(np.concatenate(p) for p in zip(*parts, strict=True))
        return np.concatenate(parts)
