"""PatchCore's memory-bank detector with IsolationForest's scoring conventions."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import ThresholdMixin, contamination_offset
from ._utils import progress, resolve_device
from .coreset import MemoryBank, normal_mask, validate_features
from .neighbors import make_index

__all__ = ["PatchCoreDetector"]

# n_neighbors='auto' on tabular rows, as LocalOutlierFactor's default.
_TABULAR_NEIGHBORS = 20
# Query rows scored per chunk, in fit and in scoring (65536 x 168 float32 = 44 MB).
_SCORE_CHUNK_ROWS = 65536


class PatchCoreDetector(ThresholdMixin, OutlierMixin, BaseEstimator):
    """Nearest-neighbour anomaly scores against a memory bank of normal patch features.

    Each test patch's score is its true Euclidean distance to the nearest memory-bank row
    (the mean over ``n_neighbors`` nearest rows when that is above 1).
    An image's score is its largest patch score s*, reweighted as in Roth et al. (2022) by how
    isolated the matched bank row m* is:
    ``s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(||t* - m||)) * s*``, where t* is the test patch
    and N_b(m*) are the ``n_reweight_neighbors`` nearest bank rows of m* (itself included).

    Parameters
    ----------
    n_neighbors : 'auto' or int, default='auto'
        Patch score = mean distance to this many nearest bank rows. 'auto' means 1 for feature
        grids (PatchCore's rule) and 20 for 2-D tabular rows (LocalOutlierFactor's default):
        on low-dimensional tabular data a single nearest neighbour is a noisy density estimate,
        and averaging over 20 puts the detector at or above IsolationForest on blob data.
    n_reweight_neighbors : int, default=9
        b in the reweighting above (anomalib's default). ``1`` disables the reweighting, so the
        image score is the plain maximum patch distance.
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from leave-one-out training scores (each training image is scored
        against the bank without its own patches; each tabular sample without itself). A float
        puts the threshold at that quantile, so about ``contamination * n`` training samples
        are predicted -1. 'auto' uses Tukey's fence on the training anomaly scores: a sample is
        an outlier when its anomaly score exceeds Q3 + 1.5 IQR of the leave-one-out training
        anomaly scores (about 0.7% of a normal distribution; more where normal data has a
        heavy tail).
    knn_backend : {'auto', 'exact', 'pynndescent'}, default='auto'
        Nearest-neighbour search. 'exact' is chunked brute force on all cores or the GPU.
        'pynndescent' is approximate (a seeded pynndescent graph on CPU; recall@1 about
        0.996 on patch features, and a missed neighbour makes a distance too large);
        returned distances are still true distances to the returned rows, and
        leave-one-out scoring never matches a sample with itself. 'auto' is exact on CUDA,
        and on CPU pynndescent only for banks of more than 200 000 rows
        (``n_rows > 2e5``), where it measured about 20x faster than exact search per
        query; exact otherwise.
    device : str, default="auto"
        Where the bank lives during search; "auto" uses CUDA when available.
    verbose : bool, default=False
        Show a progress bar while searching.

    Attributes
    ----------
    memory_bank_ : ndarray of shape (m, d), float32
        The normal patch features searched at test time.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    n_features_in_ : int
        d, the feature length.
    feature_names_in_ : ndarray of str
        Column names when fitted on a DataFrame (tabular use).

    See Also
    --------
    sklearn.ensemble.IsolationForest : Same sign conventions.
    CoresetSampler : Builds a smaller bank with the same covering guarantees.

    Notes
    -----
    Accepted X: a :class:`MemoryBank` from :class:`CoresetSampler` (y is then ignored: the
    sampler already applied it), feature grids (n_images, h, w, d) (the whole bank is kept),
    or 2-D rows (n_samples, n_features) for tabular data, one patch per sample. With ``y``,
    samples labelled -1 are left out of the bank.

    Scoring 2-D rows, a row identical to a memory-bank row is taken to be that training
    sample and is matched against the other rows, so ``fit(X).predict(X)`` flags about
    ``contamination * n`` samples, as with IsolationForest. Feature grids are scored as they
    are: an image identical to a training image has anomaly score 0.

    Sign conventions follow :class:`~sklearn.ensemble.IsolationForest`: ``score_samples`` is
    the negated anomaly score (lower = more abnormal), ``decision_function`` is negative for
    outliers, ``predict`` returns +1 for inliers and -1 for outliers.

    References
    ----------
    K. Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> from skpatchcore import PatchCoreDetector
    >>> X, _ = make_blobs(n_samples=200, centers=2, random_state=0)
    >>> det = PatchCoreDetector(contamination=0.1).fit(X)
    >>> int((det.predict(X) == -1).sum())
    20
    """

    _parameter_constraints: dict = {
        "n_neighbors": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left")],
        "n_reweight_neighbors": [Interval(Integral, 1, None, closed="left")],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "knn_backend": [StrOptions({"auto", "exact", "pynndescent"})],
        "device": [str],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        n_neighbors="auto",
        n_reweight_neighbors=9,
        contamination="auto",
        knn_backend="auto",
        device="auto",
        verbose=False,
    ):
        self.n_neighbors = n_neighbors
        self.n_reweight_neighbors = n_reweight_neighbors
        self.contamination = contamination
        self.knn_backend = knn_backend
        self.device = device
        self.verbose = verbose

    # ----------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Store the memory bank and set ``offset_``.

        Parameters
        ----------
        X : MemoryBank, ndarray of shape (n_images, h, w, d), or array-like (n_samples, d)
            Normal training features (see Notes).
        y : array-like of shape (n,), default=None
            Samples labelled -1 are left out of the bank; None means all are normal. Ignored
            for a MemoryBank.

        Returns
        -------
        self : PatchCoreDetector
        """
        if isinstance(X, MemoryBank) and X.groups is not None:
            bank, bank_groups, source = np.asarray(X), X.groups, X.source
            self.n_features_in_ = bank.shape[1]
        else:
            source = self._check_X(X, reset=True)
            keep = normal_mask(y, source.shape[0])
            if keep is not None:
                source = source[keep]
            per_sample = int(np.prod(source.shape[1:-1], dtype=np.int64))
            bank = source.reshape(-1, source.shape[-1])
            bank_groups = np.repeat(np.arange(source.shape[0]), per_sample)
        n_train = source.shape[0]
        if n_train < 2:
            raise ValueError(
                f"PatchCoreDetector needs at least 2 normal training samples (leave-one-out "
                f"training scores set offset_), got n_samples={n_train}."
            )
        self.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)
        self._index = None
        # leave-one-out: each training sample against the bank without its own rows
        train_scores = -self._anomaly_scores(source, np.arange(n_train), bank_groups,
                                             desc="train scores")[0]
        self.offset_ = contamination_offset(train_scores, self.contamination,
                                            "PatchCoreDetector")
        return self

    # ----------------------------------------------------------------- scoring
    def score_samples(self, X):
        """Opposite of the anomaly score: lower means more abnormal.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d) or array-like (n_samples, d)
            Test features.

        Returns
        -------
        scores : ndarray of shape (n,), float64
            ``-s`` with s the (reweighted) maximum nearest-neighbour patch distance.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        if X.ndim == 2:
            return -self._anomaly_scores(X, **self._self_match_groups(X))[0]
        return -self._anomaly_scores(X)[0]

    def score_and_map(self, X):
        """``score_samples(X)`` and ``predict_map(X)`` from one nearest-neighbour search.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d)

        Returns
        -------
        scores : ndarray of shape (n,), float64
            As :meth:`score_samples` (lower = more abnormal).
        maps : ndarray of shape (n, h, w), float32
            As :meth:`predict_map` with ``output_size=None`` (higher = more anomalous).
        """
        check_is_fitted(self)
        X = validate_features(self, X, reset=False)
        if X.ndim != 4:
            raise ValueError(f"Maps need feature grids of shape (n_images, h, w, d), got "
                             f"shape {X.shape}.")
        scores, grids = self._anomaly_scores(X)
        return -scores, grids.astype(np.float32)

    def predict_map(self, X, output_size=None, sigma=4.0):
        """Patch anomaly maps: higher = more anomalous, same units as ``-score_samples``.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d)
            Test feature grids.
        output_size : (int, int) or None, default=None
            None returns the patch-score grids (n, h, w) (nearest-neighbour distances, not
            reweighted). Otherwise each grid is upsampled bilinearly to (H, W) and smoothed
            with a Gaussian of standard deviation ``sigma`` output pixels.
        sigma : float, default=4.0
            Gaussian smoothing in output pixels (0 disables); used only with output_size.

        Returns
        -------
        maps : ndarray of shape (n, h, w) or (n, H, W), float32
        """
        grids = self.score_and_map(X)[1]
        if output_size is None:
            return grids
        return upsample_maps(grids, output_size, sigma)

    # --------------------------------------------------------------- internals
    def _check_X(self, X, reset):
        return validate_features(self, X, reset=reset)

    def _get_index(self):
        if getattr(self, "_index", None) is None:
            device = resolve_device(self.device)
            self._index = make_index(self.memory_bank_, self.knn_backend, device,
                                     random_state=0)
        return self._index

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_index", None)
        return state

    def _self_match_groups(self, X):
        """Tabular rows: treat a row identical to a bank row as that training sample.

        Returns query/bank groups that exclude one exactly matching bank row per query, so that
        ``predict(X_train)`` gives the leave-one-out scores that ``offset_`` was set from.
        """
        dist, nn = self._get_index().query(X, k=1)
        same = dist[:, 0] == 0.0
        if not same.any():
            return {}
        return {
            "query_groups": np.where(same, nn[:, 0], -1),
            "bank_groups": np.arange(self.memory_bank_.shape[0]),
        }

    def _anomaly_scores(self, X, query_groups=None, bank_groups=None, desc="search"):
        """Image anomaly scores s (n,) and patch-distance grids (n, ...) for X.

        With query_groups/bank_groups, bank rows of the query's own group are excluded.
        Samples are scored a bounded number of rows at a time (each sample on its own); X
        may also be a :class:`~skpatchcore.coreset.SpilledFeatures`, read chunk by chunk.
        """
        n = X.shape[0]
        per_row = int(np.prod(X.shape[1:-1], dtype=np.int64))
        step = max(1, _SCORE_CHUNK_ROWS // per_row)
        if n > step or not isinstance(X, np.ndarray):
            parts = []
            bar = progress(total=n, desc=desc, unit="sample",
                           disable=not self.verbose or n == 1)
            verbose, self.verbose = self.verbose, False
            try:
                for a in range(0, n, step):
                    groups = None if query_groups is None else query_groups[a : a + step]
                    chunk = np.asarray(X[a : a + step], dtype=np.float32)
                    parts.append(self._anomaly_scores(chunk, groups, bank_groups))
                    bar.update(len(chunk))
            finally:
                self.verbose = verbose
                bar.close()
            return (np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]))
        index = self._get_index()
        grid_shape = X.shape[1:-1]
        patches = X.reshape(n, -1, X.shape[-1])
        per_sample = patches.shape[1]
        rows = patches.reshape(-1, X.shape[-1])
        q_groups = None if query_groups is None else np.repeat(query_groups, per_sample)
        k = self.n_neighbors
        if k == "auto":
            k = _TABULAR_NEIGHBORS if X.ndim == 2 else 1
        # Cells that repeat the cell before them (FeatureExtractor's border) are searched once
        source = _repeated_cells(X) if X.ndim == 4 else None
        if source is not None:
            unique = np.flatnonzero(source == np.arange(len(source)))
            rows, q_unique = rows[unique], None if q_groups is None else q_groups[unique]
        else:
            q_unique = q_groups
        dist, nn = index.query(rows, k=k, query_groups=q_unique, bank_groups=bank_groups,
                               verbose=self.verbose)
        if k > 1:  # fewer eligible rows than k (tiny banks): average over those that exist
            dist = np.nanmean(np.where(np.isinf(dist), np.nan, dist), axis=1, keepdims=True)
        dist, nn = dist[:, 0], nn[:, 0]
        if source is not None:  # every cell takes the result of the cell it repeats
            position = np.empty(len(source), dtype=np.int64)
            position[unique] = np.arange(len(unique))
            dist, nn = dist[position[source]], nn[position[source]]
        dist = dist.reshape(n, per_sample)
        nn = nn.reshape(n, per_sample)
        worst = np.argmax(dist, axis=1)
        s_star = dist[np.arange(n), worst]
        scores = s_star * self._reweight(
            patches[np.arange(n), worst], nn[np.arange(n), worst], s_star, index,
            query_groups, bank_groups,
        )
        return scores, dist.reshape((n,) + grid_shape)

    def _reweight(self, t_star, m_star, s_star, index, query_groups, bank_groups):
        """1 - softmax weight of m* among its b nearest bank rows (stable; 1 when b == 1)."""
        b = min(self.n_reweight_neighbors, len(index))
        if b <= 1:
            return np.ones_like(s_star)
        bank = self.memory_bank_
        _, neighbours = index.query(
            bank[m_star], k=b, query_groups=query_groups, bank_groups=bank_groups
        )
        valid = neighbours >= 0
        diffs = bank[np.where(valid, neighbours, 0)].astype(np.float64) - t_star[:, None, :]
        d = np.sqrt((diffs**2).sum(axis=2))
        d = np.where(valid, d, -np.inf)
        top = np.maximum(d.max(axis=1), s_star)
        denom = np.exp(d - top[:, None]).sum(axis=1)
        return 1.0 - np.exp(s_star - top) / denom

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def _repeated_cells(X):
    """For grids X (n, h, w, d): the flat index (into ``X.reshape(-1, d)``) of the first
    cell each cell repeats exactly, through whole repeated grid rows and columns (the edge
    rings :class:`~skpatchcore.FeatureExtractor` fills from inner cells). None when no row
    or column repeats its predecessor."""
    n, h, w = X.shape[:3]
    same_row = np.zeros((n, h), dtype=bool)
    same_col = np.zeros((n, w), dtype=bool)
    for a in range(0, n, 64):  # bounded temporaries
        b = min(a + 64, n)
        same_row[a:b, 1:] = (X[a:b, 1:] == X[a:b, :-1]).all(axis=(2, 3))
        same_col[a:b, 1:] = (X[a:b, :, 1:] == X[a:b, :, :-1]).all(axis=(1, 3))
    if not (same_row.any() or same_col.any()):
        return None
    # each row (column) points at the last non-repeating one at or before it
    steps = np.arange(h)[None, :] * ~same_row
    rep_row = np.maximum.accumulate(steps, axis=1)
    steps = np.arange(w)[None, :] * ~same_col
    rep_col = np.maximum.accumulate(steps, axis=1)
    images = np.arange(n)[:, None, None] * (h * w)
    return (images + rep_row[:, :, None] * w + rep_col[:, None, :]).ravel()


def check_sigma(sigma):
    """ValueError unless ``sigma`` (the maps' Gaussian smoothing) is None, 0 or positive."""
    if sigma is not None and not sigma >= 0:
        raise ValueError(f"sigma={sigma!r}: the map smoothing must be 0 (off) or a positive "
                         "standard deviation in pixels.")


def upsample_maps(grids, output_size, sigma):
    """Bilinearly upsample (n, h, w) grids to output_size and Gaussian-smooth them."""
    check_sigma(sigma)
    h, w = output_size
    t = torch.from_numpy(np.ascontiguousarray(grids, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(int(h), int(w)), mode="bilinear", align_corners=False)
    up = up[:, 0].numpy()
    if sigma:
        # truncate=4 sigma, as the reference implementation's blur
        up = np.stack([gaussian_filter(m, sigma=sigma, truncate=4.0) for m in up])
    return up.astype(np.float32)
