"""PatchCore's memory-bank detector with IsolationForest's scoring conventions."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import MemoryBankDetector, contamination_offset, mean_finite
from ._validation import validate_features
from .neighbors import ExactIndex

__all__ = ["PatchCoreDetector"]

# n_neighbors='auto' on tabular rows, as LocalOutlierFactor's default.
_TABULAR_NEIGHBORS = 20
# Image scores: the cells of each image searched exactly first.
_FIRST_CELLS = 8


class PatchCoreDetector(MemoryBankDetector):
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
    bank_sample_index_ : ndarray of shape (m,), int64
        The training sample each bank row came from (leave-one-out scoring).
    train_row_keys_, train_row_samples_ : ndarray of shape (n_train,) or None
        For 2-D rows only: digests of the training rows, sorted, and the sample each belongs
        to (the tabular leave-one-out rule, see Notes); None for feature grids.
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
    Accepted X in ``fit``: a :class:`MemoryBank` from :class:`CoresetSampler` (y is then
    ignored: the sampler already applied it), feature grids (n_images, h, w, d) or
    :class:`PatchFeatures` (the whole bank is kept), or 2-D rows (n_samples, n_features) for
    tabular data, one patch per sample. With ``y``, samples labelled -1 are left out of the
    bank. However the bank arrives, the model is the same: fitting on a bank, its copy, or a
    bank restored from a pickle or a ``Pipeline(memory=...)`` cache gives identical
    ``offset_``, scores and maps.

    Tabular leave-one-out (the rule every detector applies): scoring 2-D rows, a row whose
    values equal a training row's is taken to be that training sample and is scored
    against the bank without its rows, exactly as in fit, so ``fit(X).predict(X)`` flags
    about ``contamination * n`` samples, as with IsolationForest. A genuinely new sample
    equal to a training row therefore gets that row's leave-one-out score. Feature grids
    are scored as they are: an image identical to a training image has anomaly score 0.
    When no bank row is eligible (a bank made only of the query's own rows), the distance
    is infinite and the sample is an outlier.

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
        X : MemoryBank, PatchFeatures, ndarray of shape (n_images, h, w, d), or array-like \
(n_samples, d)
            Normal training features (see Notes).
        y : array-like of shape (n,), default=None
            +1 normal, -1 anomalous: samples labelled -1 are left out of the bank; None
            means all are normal. Ignored for a MemoryBank (its sampler applied it).

        Returns
        -------
        self : PatchCoreDetector
        """
        bank = self._bank_from(X, y)
        self._set_bank(bank.rows, bank.sample_index)
        self._set_offset(self._loo_anomaly(bank.training_features))
        return self

    def _set_bank(self, rows, sample_index):
        """Store the memory bank: rows (m, d) and the training sample of each row."""
        self.memory_bank_ = np.ascontiguousarray(rows, dtype=np.float32)
        self.bank_sample_index_ = np.asarray(sample_index, dtype=np.int64)
        self._reset_indexes()

    def _loo_anomaly(self, features, first=0):
        """Leave-one-out anomaly scores (n,) of training samples ``first`` to
        ``first + n - 1`` (``features``: their grids), each against the bank without its
        own rows. The training set may be scored in parts (the workers of
        :mod:`skpatchcore.distributed` do): a part starting at a multiple of the search
        chunk is searched in the same chunks as the whole."""
        return self._map_chunks(
            lambda chunk, groups: self._scores(chunk, groups, self.bank_sample_index_),
            features, np.arange(first, first + len(features)), desc="train scores")

    def _set_offset(self, anomaly):
        """``offset_`` from the leave-one-out anomaly scores of every training sample."""
        self.offset_ = contamination_offset(-anomaly, self.contamination, "PatchCoreDetector")

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
        X = validate_features(self, X, reset=False)
        return -self._map_chunks(
            lambda chunk, groups: self._scores(chunk, groups, self.bank_sample_index_),
            X, self._training_samples_of(X))

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
        X = self._check_grids(X)
        scores, grids = self._map_chunks(lambda chunk, _: self._search(chunk), X)
        return -scores, grids.astype(np.float32)

    # --------------------------------------------------------------- internals
    def _patch_grids(self, X):
        return self._map_chunks(
            lambda chunk, _: self._search(chunk, reweight=False)[1], X).astype(np.float32)

    def _scores(self, X, query_groups=None, bank_groups=None):
        """Image anomaly scores (n,) of one chunk, equal to ``_search(X)[0]``.

        For feature grids with exact search, only the cells that can hold an image's
        largest patch distance are searched exactly. Every cell gets an upper bound on its
        distance (:meth:`_upper_bounds`: the true distance to its nearest rows within the
        k-means cluster of the bank whose centre is nearest). Cells are then searched
        exactly from the largest bound down, until the largest exact distance found exceeds
        every remaining cell's bound. A remaining cell's distance is at most its bound, so
        it can neither be the maximum nor tie with it: the maximum, the cell that holds it
        (the first of equals) and its nearest bank row are those of the full search, and so
        is the reweighted score.
        """
        index = self._index("bank", self.memory_bank_)
        d = X.shape[-1]
        if X.ndim != 4 or not isinstance(index, ExactIndex):
            return self._search(X, query_groups, bank_groups)[0]
        if query_groups is None:
            bank_groups = None
        n = X.shape[0]
        patches = X.reshape(n, -1, d)
        per_sample = patches.shape[1]
        k = self._k(X)
        _, unique = _distinct_cells(X)
        if unique is None:
            unique = np.arange(n * per_sample)
        rows = patches.reshape(-1, d)[unique]
        image = unique // per_sample
        q_groups = None if query_groups is None else np.asarray(query_groups)[image]
        bound = self._upper_bounds(rows, k, q_groups, bank_groups)
        exact = np.full(len(rows), -np.inf)
        nn = np.full(len(rows), -1, dtype=np.int64)
        done = np.zeros(len(rows), dtype=bool)
        # first the few cells of each image with the largest bounds
        order = np.lexsort((-bound, image))
        rank = np.arange(len(rows)) - np.searchsorted(image[order], image[order])
        pick = order[rank < _FIRST_CELLS]
        while len(pick):
            dist, idx = index.query(rows[pick], k=k, bank_groups=bank_groups,
                                    query_groups=None if q_groups is None else q_groups[pick])
            exact[pick], nn[pick], done[pick] = mean_finite(dist), idx[:, 0], True
            best = np.full(n, -np.inf)
            np.maximum.at(best, image, exact)
            pick = np.flatnonzero(~done & (bound >= best[image]))
        best = np.full(n, -np.inf)
        np.maximum.at(best, image, exact)
        # the first cell (in grid order) holding each image's maximum
        at_max = np.flatnonzero(exact == best[image])
        first = np.full(n, len(rows))
        np.minimum.at(first, image[at_max], at_max)
        s_star = best
        worst_rows = rows[first]
        return s_star * self._reweight(worst_rows, nn[first], s_star, index, query_groups,
                                       bank_groups)

    def _upper_bounds(self, rows, k, query_groups, bank_groups):
        """For each row, a distance at least its true k-nearest-neighbour distance: the mean
        true distance to its k nearest rows within the bank cluster whose centre is nearest
        (an inverted-file probe), measured in float32 and enlarged by a margin that covers
        its rounding (relative ``d * 2**-23`` on the squared distance, far below the 1e-4
        used); inf without k eligible rows in that cluster."""
        centres, members, starts = self._bound_clusters()
        q = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        centre_sq = (centres * centres).sum(dim=1)
        assign = torch.addmm(centre_sq[None, :], q, centres.T, alpha=-2.0).argmin(dim=1)
        assign = assign.numpy()
        by_centre = np.argsort(assign, kind="stable")
        cuts = np.searchsorted(assign[by_centre], np.arange(len(centres) + 1))
        bank = torch.from_numpy(self.memory_bank_)
        masked = query_groups is not None and bank_groups is not None
        bound = np.full(len(rows), np.inf)
        for c in np.flatnonzero(np.diff(cuts)):
            qi = by_centre[cuts[c] : cuts[c + 1]]
            bi = members[starts[c] : starts[c + 1]]
            if len(bi) < k:
                continue
            qc, bc = q[qi], bank[bi]
            rank = torch.addmm((bc * bc).sum(dim=1)[None, :], qc, bc.T, alpha=-2.0)
            if masked:
                own = np.asarray(query_groups)[qi][:, None] == np.asarray(bank_groups)[bi][None]
                rank[torch.from_numpy(own)] = torch.inf
            low, cand = torch.topk(rank, k, dim=1, largest=False)
            diff = bc[cand] - qc[:, None, :]
            dist = torch.linalg.vector_norm(diff, dim=2).double()
            dist = torch.where(torch.isinf(low), torch.inf, dist).mean(dim=1)
            bound[qi] = dist.numpy()
        return bound * (1.0 + 1e-4) + 1e-12

    def _bound_clusters(self):
        """k-means clusters of the bank (about sqrt(m) of them): centres, the bank rows
        sorted by cluster and where each cluster starts; computed once per fitted model
        (not pickled), seeded."""
        cache = self.__dict__.setdefault("_indexes", {})
        if "clusters" not in cache:
            from sklearn.cluster import KMeans
            from sklearn.exceptions import ConvergenceWarning

            bank = self.memory_bank_
            n_clusters = max(1, round(np.sqrt(len(bank))))
            with warnings.catch_warnings():  # fewer distinct rows than clusters: still valid
                warnings.simplefilter("ignore", ConvergenceWarning)
                km = KMeans(n_clusters, n_init=1, max_iter=10, random_state=0).fit(bank)
            members = np.argsort(km.labels_, kind="stable")
            starts = np.searchsorted(km.labels_[members], np.arange(n_clusters + 1))
            centres = torch.from_numpy(np.ascontiguousarray(km.cluster_centers_,
                                                            dtype=np.float32))
            cache["clusters"] = (centres, members, starts)
        return cache["clusters"]

    def _k(self, X):
        """Neighbours averaged into a patch score ('auto': 1 for grids, 20 for rows)."""
        if self.n_neighbors == "auto":
            return _TABULAR_NEIGHBORS if X.ndim == 2 else 1
        return self.n_neighbors

    def _search(self, X, query_groups=None, bank_groups=None, reweight=True):
        """Image anomaly scores s (n,) (None unless ``reweight``) and patch-distance grids
        (n, ...) for one chunk X; with query/bank groups, bank rows of the query's own
        group are excluded (leave-one-out)."""
        index = self._index("bank", self.memory_bank_)
        n = X.shape[0]
        grid_shape = X.shape[1:-1]
        patches = X.reshape(n, -1, X.shape[-1])
        per_sample = patches.shape[1]
        rows = patches.reshape(-1, X.shape[-1])
        if query_groups is None:
            bank_groups = None
        q_groups = None if query_groups is None else np.repeat(query_groups, per_sample)
        k = self._k(X)
        # Cells that repeat the cell before them (FeatureExtractor's border) are searched once
        source, unique = _distinct_cells(X) if X.ndim == 4 else (None, None)
        if source is not None:
            rows, q_unique = rows[unique], None if q_groups is None else q_groups[unique]
        else:
            q_unique = q_groups
        dist, nn = index.query(rows, k=k, query_groups=q_unique, bank_groups=bank_groups)
        # fewer eligible rows than k (tiny banks): average those that exist (inf if none)
        dist, nn = mean_finite(dist), nn[:, 0]
        if source is not None:  # every cell takes the result of the cell it repeats
            position = np.empty(len(source), dtype=np.int64)
            position[unique] = np.arange(len(unique))
            dist, nn = dist[position[source]], nn[position[source]]
        dist = dist.reshape(n, per_sample)
        grids = dist.reshape((n,) + grid_shape)
        if not reweight:
            return None, grids
        nn = nn.reshape(n, per_sample)
        worst = np.argmax(dist, axis=1)
        s_star = dist[np.arange(n), worst]
        scores = s_star * self._reweight(
            patches[np.arange(n), worst], nn[np.arange(n), worst], s_star, index,
            query_groups, bank_groups,
        )
        return scores, grids

    def _reweight(self, t_star, m_star, s_star, index, query_groups, bank_groups):
        """1 - softmax weight of m* among its b nearest bank rows (stable; 1 when b == 1 or
        when there is no finite s*)."""
        b = min(self.n_reweight_neighbors, len(index))
        finite = np.isfinite(s_star)
        if b <= 1 or not finite.any():
            return np.ones_like(s_star)
        bank = self.memory_bank_
        m_star = np.where(finite & (m_star >= 0), m_star, 0)
        _, neighbours = index.query(
            bank[m_star], k=b, query_groups=query_groups, bank_groups=bank_groups
        )
        valid = neighbours >= 0
        diffs = bank[np.where(valid, neighbours, 0)].astype(np.float64) - t_star[:, None, :]
        d = np.sqrt((diffs**2).sum(axis=2))
        d = np.where(valid, d, -np.inf)
        s = np.where(finite, s_star, 0.0)
        top = np.maximum(d.max(axis=1), s)
        denom = np.exp(d - top[:, None]).sum(axis=1)
        return np.where(finite, 1.0 - np.exp(s - top) / denom, 1.0)


def _distinct_cells(X):
    """For grids X: ``(source, unique)``, where ``source`` is :func:`_repeated_cells` and
    ``unique`` the flat indices of the cells that repeat no earlier one; (None, None) when
    no cell repeats."""
    source = _repeated_cells(X)
    if source is None:
        return None, None
    return source, np.flatnonzero(source == np.arange(len(source)))


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
