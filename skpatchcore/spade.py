"""SPADE: k-nearest-neighbour scores over the full bank of training patch features."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import MemoryBankDetector, contamination_offset, mean_finite
from ._validation import validate_features

__all__ = ["SPADEDetector"]


def _pool(X):
    """Global average pooling of grids (n, h, w, d) -> (n, d); rows (n, d) are kept."""
    if X.ndim == 2:
        return np.ascontiguousarray(X, dtype=np.float32)
    return X.reshape(X.shape[0], -1, X.shape[-1]).mean(axis=1, dtype=np.float64).astype(
        np.float32
    )


class SPADEDetector(MemoryBankDetector):
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
    train_row_keys_, train_row_samples_ : ndarray of shape (n_train,) or None
        For 2-D rows only: the tabular leave-one-out record (see Notes).
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
    pooled image bank is built from the full normal training grids it carries in
    ``training_features``; y is then ignored), :class:`PatchFeatures`, or 2-D rows
    (n_samples, n_features), each row one sample with a single patch: the image score is
    then the mean distance to the ``n_image_neighbors`` nearest training rows, a plain kNN
    outlier detector. With ``y``, samples labelled -1 are left out of both banks.

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
        X : MemoryBank, PatchFeatures, ndarray of shape (n_images, h, w, d), or array-like \
(n_samples, d)
            Normal training features (see Notes).
        y : array-like of shape (n,), default=None
            +1 normal, -1 anomalous (left out); None means all are normal. Ignored for a
            MemoryBank (its sampler applied it).

        Returns
        -------
        self : SPADEDetector
        """
        bank = self._bank_from(X, y)
        rows, groups = bank.rows, bank.sample_index
        if np.any(np.diff(groups) < 0):  # coreset rows: group them by training sample
            order = np.argsort(groups, kind="stable")
            rows, groups = rows[order], groups[order]
        self.memory_bank_ = np.ascontiguousarray(rows, dtype=np.float32)
        self.bank_sample_index_ = groups
        features = bank.training_features
        self.image_features_ = self._map_chunks(lambda chunk, _: _pool(chunk), features)
        self._reset_indexes()
        train_scores = -self._map_chunks(self._image_anomaly, features,
                                         np.arange(len(features)), desc="train scores")
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
        return -self._map_chunks(self._image_anomaly, X, self._training_samples_of(X))

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
        X = self._check_grids(X)

        def both(chunk, _):
            patch = self._patch_scores(chunk)
            image = patch.max(axis=1) if self.image_score == "max" else self._image_anomaly(
                chunk)
            return image, patch.reshape(chunk.shape[:-1])

        image, grids = self._map_chunks(both, X)
        return -image, grids.astype(np.float32)

    # --------------------------------------------------------------- internals
    def _patch_grids(self, X):
        return self._map_chunks(
            lambda chunk, _: self._patch_scores(chunk).reshape(chunk.shape[:-1]), X
        ).astype(np.float32)

    def _image_anomaly(self, X, groups=None):
        """Image anomaly scores (n,); ``groups[i]`` is the training sample X[i] must not
        be matched with (leave-one-out), or -1."""
        if self.image_score == "max":
            return self._patch_scores(X, groups).max(axis=1)
        image_index = self._index("images", self.image_features_)
        k = min(self.n_image_neighbors, len(image_index))
        kw = {}
        if groups is not None:
            kw = {"query_groups": groups, "bank_groups": np.arange(len(image_index))}
        dist, _ = image_index.query(_pool(X), k=k, **kw)
        return mean_finite(dist)

    def _patch_scores(self, X, groups=None):
        """Patch scores (n, patches per sample), optionally leave-one-out by sample."""
        patch_index = self._index("bank", self.memory_bank_)
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
        return mean_finite(dist).reshape(n, per_sample)
