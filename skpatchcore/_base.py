"""What every skpatchcore detector shares: thresholds, decisions, labels, calibration."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.utils.validation import check_is_fitted


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
        """+1 for inliers, -1 for outliers (``decision_function(X) < 0``).

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d) or array-like (n_samples, d)

        Returns
        -------
        labels : ndarray of shape (n,), int
        """
        decision = self.decision_function(X)
        labels = np.ones(decision.shape[0], dtype=int)
        labels[decision < 0] = -1
        return labels

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
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must be in (0, 1), got {fpr!r}.")
        scores = self.score_samples(X)
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
