"""SPADE: k-nearest-neighbour scores over the full bank of training patch features."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import ThresholdMixin, contamination_offset
from ._utils import resolve_device
from .coreset import MemoryBank, check_features, normal_mask, validate_features
from .detector import upsample_maps
from .neighbors import make_index

__all__ = ["SPADEDetector"]


def _mean_knn(dist):
    """Mean of kNN distances (n, k) over the finite ones (inf marks a missing neighbour)."""
    if dist.shape[1] == 1:
        return dist[:, 0]
    finite = np.isfinite(dist)
    count = finite.sum(axis=1)
    total = np.where(finite, dist, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def _pool(X):
    """Global average pooling of grids (n, h, w, d) -> (n, d); rows (n, d) are kept."""
    if X.ndim == 2:
        return np.ascontiguousarray(X, dtype=np.float32)
    return X.reshape(X.shape[0], -1, X.shape[-1]).mean(axis=1, dtype=np.float64).astype(
        np.float32
    )


class SPADEDetector(ThresholdMixin, OutlierMixin, BaseEstimator):
    """SPADE: nearest-neighbour anomaly scores on pooled images and on patches.

    Semantic Pyramid Anomaly Detection (Cohen & Hoshen, 2020) on the same patch features
    as :class:`PatchCoreDetector`:

    * **patch score** (the anomaly map): mean Euclidean distance of each test patch to its
      ``n_neighbors`` nearest rows of the memory bank, which holds every patch of every
      normal training image (or a :class:`CoresetSampler` bank);
    * **image score**: mean Euclidean distance of the test image's globally average-pooled
      feature (the mean of its grid over h and w) to the ``n_image_neighbors`` nearest pooled
      training images (the paper's image-level kNN), or, with ``image_score='max'``, the
      largest patch score.

    Parameters
    ----------
    n_neighbors : int, default=1
        kappa, the number of nearest bank rows averaged into a patch score. The paper's
        implementation, and the reference re-implementation (SPADE-pytorch), take the single
        nearest feature; with 1 the maps equal PatchCore's maps on the same bank.
    n_image_neighbors : int, default=50
        K, the number of nearest pooled training images averaged into the image score: the
        paper's K = 50 on MVTec AD. With fewer normal training images, all of them are used
        (leave-one-out training scores then average over ``n - 1``).
    image_score : {'pooled', 'max'}, default='pooled'
        'pooled' is the paper's image-level kNN on pooled features. 'max' takes the largest
        patch score instead, which makes ``SPADEDetector(n_neighbors=1, image_score='max')``
        identical to ``PatchCoreDetector(n_reweight_neighbors=1)`` on the same bank, and puts
        ``offset_`` in the units of the anomaly maps (see Notes).
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from leave-one-out training scores (each training image is scored
        without itself: its pooled feature is not among its image neighbours and, with
        ``image_score='max'``, its own patches are not in the bank). A float puts the
        threshold at that quantile of the training scores; 'auto' uses Tukey's fence
        (anomaly score above Q3 + 1.5 IQR of the training anomaly scores), as
        :class:`PatchCoreDetector`.
    knn_backend : {'auto', 'exact', 'pynndescent'}, default='auto'
        Nearest-neighbour search for both banks, as in :class:`PatchCoreDetector` ('auto':
        exact on CUDA, and on CPU exact up to 200 000 bank rows, pynndescent above).
    device : str, default="auto"
        Where the banks live during search; "auto" uses CUDA when available.

    Attributes
    ----------
    memory_bank_ : ndarray of shape (m, d), float32
        The normal patch features searched for the anomaly maps, grouped by training image.
    bank_sample_index_ : ndarray of shape (m,), int64
        The training sample (row of ``image_features_``) each bank row comes from.
    image_features_ : ndarray of shape (n_train, d), float32
        Globally average-pooled feature of every normal training sample.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    n_features_in_ : int
        d, the feature length.
    feature_names_in_ : ndarray of str
        Column names when fitted on a DataFrame (tabular use).

    See Also
    --------
    PatchCoreDetector : Coreset bank and reweighted maximum patch score.
    PaDiMDetector : One Gaussian per grid position.
    CoresetSampler : A smaller bank with the same covering guarantees.

    Notes
    -----
    Accepted X: feature grids (n_images, h, w, d) from :class:`FeatureExtractor`, a
    :class:`MemoryBank` from :class:`CoresetSampler` (its rows become the patch bank; the
    pooled image bank is built from the full normal training grids it keeps in ``source``;
    y is then ignored), or 2-D rows (n_samples, n_features), each row one sample with a
    single patch: the image score is then the mean distance to the ``n_image_neighbors``
    nearest training rows, a plain kNN outlier detector. With ``y``, samples labelled -1 are
    left out of both banks.

    Differences from the paper. The paper pools the last convolutional layer of the network
    for the image-level kNN; here the pooled feature is the mean of the same mid-level patch
    grid that the maps use, so one FeatureExtractor serves both. The paper searches each
    test patch among the patches of the test image's K nearest training images only (its
    "gallery"); as the issue that introduced this class asks, the search here is over the
    full bank, which contains every gallery, so patch scores are never larger than the
    paper's.

    Relation to PatchCore. With ``n_neighbors=1`` and the same bank, :meth:`predict_map`
    returns exactly ``PatchCoreDetector(n_reweight_neighbors=1).predict_map``. The image
    scores differ unless ``image_score='max'``: the default pooled kNN is in units of
    pooled-feature distance, so ``-offset_`` is not a threshold for the anomaly maps
    (``PatchCorePipeline.predict_mask`` uses it when no threshold is given; pass
    ``threshold=`` or use ``image_score='max'`` there).

    Cost: fitting stores the bank (and, with ``image_score='max'``, searches every training
    patch against it leave-one-out); every test patch is searched against the whole bank,
    so test time grows with the number of training images. Use a :class:`CoresetSampler`
    step in front for large training sets.

    Scoring 2-D rows, a row identical to a training row is taken to be that training sample
    and is scored leave-one-out, so ``fit(X).predict(X)`` flags about ``contamination * n``
    samples. Feature grids are scored as they are.

    References
    ----------
    N. Cohen and Y. Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid
    Correspondences", arXiv:2005.02357, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import SPADEDetector
    >>> rng = np.random.RandomState(0)
    >>> train = rng.rand(10, 4, 4, 8).astype(np.float32)
    >>> test = np.concatenate([train[:1] + 0.01, train[:1] + 1.0])
    >>> det = SPADEDetector().fit(train)
    >>> det.predict(test).tolist()
    [1, -1]
    >>> det.predict_map(test).shape
    (2, 4, 4)
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "n_image_neighbors": [Interval(Integral, 1, None, closed="left")],
        "image_score": [StrOptions({"pooled", "max"})],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "knn_backend": [StrOptions({"auto", "exact", "pynndescent"})],
        "device": [str],
    }

    def __init__(
        self,
        *,
        n_neighbors=1,
        n_image_neighbors=50,
        image_score="pooled",
        contamination="auto",
        knn_backend="auto",
        device="auto",
    ):
        self.n_neighbors = n_neighbors
        self.n_image_neighbors = n_image_neighbors
        self.image_score = image_score
        self.contamination = contamination
        self.knn_backend = knn_backend
        self.device = device

    # ----------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Store the patch bank and the pooled image bank; set ``offset_``.

        Parameters
        ----------
        X : MemoryBank, ndarray of shape (n_images, h, w, d), or array-like (n_samples, d)
            Normal training features (see Notes).
        y : array-like of shape (n,), default=None
            Samples labelled -1 are left out; None means all are normal. Ignored for a
            MemoryBank.

        Returns
        -------
        self : SPADEDetector
        """
        if isinstance(X, MemoryBank) and X.groups is not None:
            source = check_features(X.source, "MemoryBank.source")
            bank, groups = np.asarray(X), np.asarray(X.groups, dtype=np.int64)
            self.n_features_in_ = bank.shape[1]
        else:
            source = validate_features(self, X, reset=True)
            keep = normal_mask(y, source.shape[0])
            if keep is not None:
                source = source[keep]
            per_sample = int(np.prod(source.shape[1:-1], dtype=np.int64))
            bank = source.reshape(-1, source.shape[-1])
            groups = np.repeat(np.arange(source.shape[0], dtype=np.int64), per_sample)
        n_train = source.shape[0]
        if n_train < 2:
            raise ValueError(
                f"SPADEDetector needs at least 2 normal training samples (leave-one-out "
                f"training scores set offset_), got n_samples={n_train}."
            )
        if np.any(np.diff(groups) < 0):  # coreset rows: group them by training sample
            order = np.argsort(groups, kind="stable")
            bank, groups = bank[order], groups[order]
        self.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)
        self.bank_sample_index_ = groups
        self.image_features_ = _pool(source)
        self._patch_index = self._image_index = None
        self._get_image_index(), self._get_patch_index()  # built once, here (cheap)
        train_groups = np.arange(n_train)
        train_scores = -self._image_anomaly(source, train_groups)
        self.offset_ = contamination_offset(train_scores, self.contamination, "SPADEDetector")
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
            Minus the mean distance to the nearest pooled training images (or minus the
            largest patch score with ``image_score='max'``).
        """
        check_is_fitted(self)
        X = validate_features(self, X, reset=False)
        groups = self._self_match(X) if X.ndim == 2 else None
        return -self._image_anomaly(X, groups)

    def predict_map(self, X, output_size=None, sigma=4.0):
        """Patch anomaly maps: mean distance to the ``n_neighbors`` nearest bank rows.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d)
            Test feature grids.
        output_size : (int, int) or None, default=None
            None returns the patch-score grids (n, h, w). Otherwise each grid is upsampled
            bilinearly to (H, W) and smoothed with a Gaussian of standard deviation ``sigma``
            output pixels.
        sigma : float, default=4.0
            Gaussian smoothing in output pixels (0 disables); used only with output_size.

        Returns
        -------
        maps : ndarray of shape (n, h, w) or (n, H, W), float32
            Higher = more anomalous.
        """
        check_is_fitted(self)
        X = check_features(X, "X", allow_2d=False)
        validate_features(self, X, reset=False)
        grids = self._patch_scores(X).reshape(X.shape[:-1]).astype(np.float32)
        if output_size is None:
            return grids
        return upsample_maps(grids, output_size, sigma)

    def score_and_map(self, X):
        """``score_samples(X)`` and ``predict_map(X)`` together.

        With ``image_score='max'`` both come from one search of the patch bank.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d)
            Test feature grids.

        Returns
        -------
        scores : ndarray of shape (n,), float64
            As :meth:`score_samples` (lower = more abnormal).
        maps : ndarray of shape (n, h, w), float32
            As :meth:`predict_map` with ``output_size=None`` (higher = more anomalous).
        """
        check_is_fitted(self)
        X = check_features(X, "X", allow_2d=False)
        validate_features(self, X, reset=False)
        patch = self._patch_scores(X)
        if self.image_score == "max":
            scores = -patch.max(axis=1)
        else:
            scores = -self._image_anomaly(X)
        return scores, patch.reshape(X.shape[:-1]).astype(np.float32)

    # --------------------------------------------------------------- internals
    def _get_image_index(self):
        if getattr(self, "_image_index", None) is None:
            device = resolve_device(self.device)
            self._image_index = make_index(self.image_features_, self.knn_backend, device,
                                           random_state=0)
        return self._image_index

    def _get_patch_index(self):
        if getattr(self, "_patch_index", None) is None:
            device = resolve_device(self.device)
            self._patch_index = make_index(self.memory_bank_, self.knn_backend, device,
                                           random_state=0)
        return self._patch_index

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_patch_index", None)
        state.pop("_image_index", None)
        return state

    def _self_match(self, X):
        """Rows identical to a training row: that row's index, else -1 (tabular LOO)."""
        dist, nn = self._get_image_index().query(X, k=1)
        return np.where(dist[:, 0] == 0.0, nn[:, 0], -1)

    def _image_anomaly(self, X, groups=None):
        """Image anomaly scores (n,); ``groups[i]`` is the training sample X[i] must not
        be matched with (leave-one-out), or -1."""
        if self.image_score == "max":
            return self._patch_scores(X, groups).max(axis=1)
        image_index = self._get_image_index()
        k = min(self.n_image_neighbors, len(image_index))
        kw = {}
        if groups is not None:
            kw = {"query_groups": groups, "bank_groups": np.arange(len(image_index))}
        dist, _ = image_index.query(_pool(X), k=k, **kw)
        return _mean_knn(dist)

    def _patch_scores(self, X, groups=None):
        """Patch scores (n, patches per sample), optionally leave-one-out by sample."""
        patch_index = self._get_patch_index()
        n = X.shape[0]
        rows = X.reshape(-1, X.shape[-1])
        per_sample = rows.shape[0] // n
        kw = {}
        if groups is not None:
            kw = {
                "query_groups": np.repeat(groups, per_sample),
                "bank_groups": self.bank_sample_index_,
            }
        dist, _ = patch_index.query(rows, k=self.n_neighbors, **kw)
        return _mean_knn(dist).reshape(n, per_sample)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
