"""PaDiM: one multivariate Gaussian per feature-grid position, Mahalanobis patch scores."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import BaseDetector, contamination_offset
from ._containers import MemoryBank, PatchFeatures
from ._utils import resolve_device
from ._validation import check_features, normal_mask, validate_features

__all__ = ["PaDiMDetector", "fit_gaussians", "mahalanobis_distances"]

# Bytes of float64 work arrays per block of grid positions (fit and predict).
_BLOCK_BYTES = 1 << 27


def _as_grids(X):
    """A list or tuple of per-image grids (h, w, d) -> one array; differing sizes raise."""
    if isinstance(X, list | tuple) and X and all(getattr(g, "ndim", 0) == 3 for g in X):
        shapes = sorted({tuple(g.shape[:2]) for g in X})
        if len(shapes) > 1:
            raise ValueError(
                f"PaDiM needs aligned images of one size; got grids of shapes {shapes}. Use "
                "one FeatureExtractor image_size for all images (its resize_mode 'letterbox' "
                "or 'stretch' gives every image the same grid)."
            )
        return np.stack([np.asarray(g) for g in X])
    if isinstance(X, PatchFeatures):  # every position needs every image: read them all
        return np.asarray(X)
    return X


def _positions_per_block(n_samples, dim):
    per_position = 8 * (n_samples * dim + 3 * dim * dim)
    return max(1, _BLOCK_BYTES // per_position)


def _loo_distance(a, n):
    """Leave-one-out Mahalanobis distance from ``a = u^T (C + (n - 2) reg I)^{-1} u``.

    See the Notes of :class:`PaDiMDetector` for the derivation.
    """
    c = n / (n - 1.0)
    denom = torch.clamp(1.0 - c * a, min=torch.finfo(a.dtype).tiny)
    return torch.sqrt(torch.clamp((n - 2.0) * c * c * a / denom, min=0.0))


def _cholesky(matrices, start, grid_shape, reg):
    """Batched Cholesky factors; a singular matrix raises, naming its grid position."""
    factor, info = torch.linalg.cholesky_ex(matrices)
    bad = torch.nonzero(info).flatten()
    if bad.numel():
        pos = start + int(bad[0])
        where = np.unravel_index(pos, grid_shape) if tuple(grid_shape) != (1, 1) else ()
        at = f" at grid position {tuple(int(i) for i in where)}" if where else ""
        raise ValueError(
            f"The covariance{at} is singular (fewer distinct training samples than "
            f"features); use reg > 0 (got reg={reg}) or fewer n_features."
        )
    return factor


def fit_gaussians(rows, feature_indices, reg, *, device, grid_shape, leave_one_out=True):
    """One regularised Gaussian per position (PaDiM's model), in float64.

    Parameters
    ----------
    rows : ndarray of shape (n, positions, d)
        The training features of every position.
    feature_indices : ndarray of shape (dim,), int64
        The channels kept.
    reg : float
        Added to the diagonal of every covariance (``S + reg * I``, S with 1 / (n - 1)).
    device : torch.device
    grid_shape : tuple of (int, int)
        (h, w) with h * w = positions, for the error naming a singular position.
    leave_one_out : bool, default=True
        Also compute every training sample's leave-one-out distance (see
        :class:`PaDiMDetector`'s Notes).

    Returns
    -------
    means : ndarray (positions, dim), float64
    factors : ndarray (positions, dim, dim), float64
        Lower Cholesky factors of ``S + reg * I``.
    loo : ndarray (n, positions), float64, or None without ``leave_one_out``
    single : ndarray (dim, dim) or None
        For a single position with ``leave_one_out``, the factor that gives ``loo``.
    """
    n, n_pos, _ = rows.shape
    idx = torch.from_numpy(np.asarray(feature_indices, dtype=np.int64)).to(device)
    dim = idx.shape[0]
    lam = float(reg)
    eye = torch.eye(dim, dtype=torch.float64, device=device)
    means = np.empty((n_pos, dim), dtype=np.float64)
    factors = np.empty((n_pos, dim, dim), dtype=np.float64)
    loo = np.empty((n, n_pos), dtype=np.float64) if leave_one_out else None
    single = None
    step = _positions_per_block(n, dim)
    for start in range(0, n_pos, step):
        stop = min(start + step, n_pos)
        block = torch.from_numpy(np.ascontiguousarray(rows[:, start:stop])).to(device)
        z = block.index_select(2, idx).to(torch.float64).transpose(0, 1)  # (p, n, dim)
        mu = z.mean(dim=1, keepdim=True)
        u = z - mu
        scatter = torch.bmm(u.transpose(1, 2), u)  # C, (p, dim, dim)
        factor = _cholesky(scatter / (n - 1) + lam * eye, start, grid_shape, reg)
        if leave_one_out:
            loo_factor = _cholesky(scatter + (n - 2) * lam * eye, start, grid_shape, reg)
            sol = torch.linalg.solve_triangular(loo_factor, u.transpose(1, 2), upper=False)
            a = (sol * sol).sum(dim=1)  # (p, n)
            loo[:, start:stop] = _loo_distance(a, n).T.cpu().numpy()
            if n_pos == 1:
                single = loo_factor[0].cpu().numpy()
        means[start:stop] = mu[:, 0].cpu().numpy()
        factors[start:stop] = factor.cpu().numpy()
    return means, factors, loo, single


def mahalanobis_distances(rows, feature_indices, means, factors, *, device):
    """Mahalanobis distance of every row to its position's Gaussian (from
    :func:`fit_gaussians`): ndarray (n, positions), float64, a block of positions at a time.

    ``rows`` is (n, positions, d); ``means`` and ``factors`` may have any leading shape
    that flattens to (positions, dim) and (positions, dim, dim).
    """
    n, n_pos, _ = rows.shape
    idx = torch.from_numpy(np.asarray(feature_indices, dtype=np.int64)).to(device)
    dim = idx.shape[0]
    means = torch.from_numpy(np.asarray(means).reshape(n_pos, dim))
    factors = torch.from_numpy(np.asarray(factors).reshape(n_pos, dim, dim))
    out = np.empty((n, n_pos), dtype=np.float64)
    step = _positions_per_block(n, dim)
    for start in range(0, n_pos, step):
        stop = min(start + step, n_pos)
        block = torch.from_numpy(np.ascontiguousarray(rows[:, start:stop])).to(device)
        z = block.index_select(2, idx).to(torch.float64).permute(1, 2, 0)  # (p, dim, n)
        u = z - means[start:stop, :, None].to(device)
        sol = torch.linalg.solve_triangular(factors[start:stop].to(device), u, upper=False)
        out[:, start:stop] = torch.linalg.vector_norm(sol, dim=1).T.cpu().numpy()
    return out


class PaDiMDetector(BaseDetector):
    """PaDiM: a Gaussian per feature-grid position; Mahalanobis distance as patch score.

    Patch Distribution Modeling (Defard et al., 2020) on the same patch features as
    :class:`PatchCoreDetector`. At every grid position (i, j) the features of the normal
    training images are modelled by one multivariate Gaussian, with mean mu_ij and sample
    covariance S_ij + ``reg`` * I. A test patch's score is its Mahalanobis distance
    ``sqrt((x - mu_ij)^T (S_ij + reg I)^{-1} (x - mu_ij))`` at the same position; the image
    score is the largest patch score.

    Parameters
    ----------
    n_features : int or None, default=100
        Number of feature channels kept, drawn at random once (seeded by ``random_state``)
        and shared by all positions, as in the paper. The paper keeps 100 of ResNet-18's 448
        channels and 550 of Wide-ResNet-50's 1792. 100 is the default because the model
        stores one d x d Cholesky factor per position (h * w * d^2 * 8 bytes: 128 MB for a
        40 x 40 grid at d = 100, 3.9 GB at d = 550) and costs d^2 per patch at test time.
        With EfficientNet-Lite0 (152 channels) on MTD at 320 px, 100 channels gave image
        AUROC 0.922 against 0.923 with all 152, and 50 gave 0.868. None (or a value not
        below the feature length) keeps every channel.
    reg : float >= 0, default=0.01
        Added to the diagonal of every covariance (the paper's 0.01). It keeps the
        covariance invertible when there are fewer training images than channels. It is an
        absolute amount: on FeatureExtractor's features (each layer scaled by
        1/sqrt(channels)) a channel's variance at one position is typically 0.02-0.3 (MTD,
        320 px), so 0.01 is a mild regulariser there; 0.1 and 1 lowered every metric on MTD,
        0.001 gave a slightly higher image AUROC and a lower AUPRO. Features of another
        scale may need another value.
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from leave-one-out training scores: each training image is scored
        against the Gaussians of the other training images (exactly, see Notes). A float
        puts the threshold at that quantile of the training scores; 'auto' uses Tukey's
        fence (anomaly score above Q3 + 1.5 IQR of the training anomaly scores), as
        :class:`PatchCoreDetector`.
    random_state : int, RandomState instance or None, default=None
        Seeds the channel selection.
    device : str, default="auto"
        Where the covariances are factorised and distances computed ("auto" uses CUDA when
        available); results are numpy arrays.

    Attributes
    ----------
    feature_indices_ : ndarray of shape (n_selected,), int64
        The kept channels, in increasing order.
    grid_shape_ : tuple of (int, int)
        (h, w) of the training grids; (1, 1) for 2-D rows.
    mean_ : ndarray of shape (h, w, n_selected), float64
        Per-position mean of the kept channels.
    cholesky_ : ndarray of shape (h, w, n_selected, n_selected), float64
        Lower-triangular Cholesky factor L of each position's regularised covariance
        ``S + reg * I = L L^T`` (S with the 1 / (n - 1) normalisation, as ``np.cov``).
    n_samples_fit_ : int
        Number of normal training samples.
    loo_cholesky_ : ndarray of shape (n_selected, n_selected) or None
        For 2-D rows only: Cholesky factor of ``C + (n - 2) * reg * I`` (see Notes), which
        scores a training row leave-one-out; None for feature grids.
    train_row_keys_, train_row_samples_ : ndarray of shape (n_samples_fit_,) or None
        For 2-D rows only: sorted 64-bit BLAKE2 digests of the training rows and the sample
        each belongs to, which recognise a training row at predict time; None for feature
        grids.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    n_features_in_ : int
        d, the feature length before channel selection.
    feature_names_in_ : ndarray of str
        Column names when fitted on a DataFrame (tabular use).

    See Also
    --------
    PatchCoreDetector : Nearest neighbours in a coreset memory bank.
    SPADEDetector : Nearest neighbours in the full bank.
    sklearn.covariance.EllipticEnvelope : A robust single Gaussian for tabular data.

    Notes
    -----
    Accepted X: feature grids (n_images, h, w, d) that share one (h, w) (PaDiM assumes
    aligned images: position (i, j) must show the same part of every object), or 2-D rows
    (n_samples, d), treated as (n_samples, 1, 1, d): a single position, which makes this a
    plain regularised Gaussian (Mahalanobis) outlier detector. A :class:`MemoryBank` from
    :class:`CoresetSampler` is refused: PaDiM needs every image at every position. With
    ``y``, samples labelled -1 are left out.

    Distances are true distances (the square root of the quadratic form), computed in
    float64 by batched Cholesky factorisations and triangular solves, one block of positions
    at a time; no inverse is formed.

    Leave-one-out distances in closed form. Let x_1..x_n be one position's training
    features, m their mean, u_i = x_i - m, C = sum_j u_j u_j^T (so S = C / (n - 1)) and
    lambda = ``reg``. Without sample i the mean is m - u_i / (n - 1), so
    x_i - m_(-i) = c u_i with c = n / (n - 1), and the scatter matrix is C - c u_i u_i^T.
    The leave-one-out covariance is therefore
    S_(-i) + lambda I = (A - c u_i u_i^T) / (n - 2) with A = C + (n - 2) lambda I, and by
    the Sherman-Morrison formula, with a_i = u_i^T A^{-1} u_i,

        D_i^2 = (n - 2) c^2 u_i^T (A - c u_i u_i^T)^{-1} u_i = (n - 2) c^2 a_i / (1 - c a_i).

    One extra Cholesky factorisation of A per position gives every D_i without refitting.
    With lambda = 0, a_i = d_i^2 / (n - 1) for the in-sample distance d_i and this is the
    classical identity D_i^2 = n^2 (n - 2) d_i^2 / ((n - 1) ((n - 1)^2 - n d_i^2)).
    ``reg`` is the same for the full and the leave-one-out fits. Each training image's
    leave-one-out score is the largest of its D_i over positions; n >= 3 is required.

    Differences from the paper: the paper's image score is the maximum of the upsampled and
    smoothed map, normalised over the test set; here it is the maximum patch distance, a
    score of one image alone.

    Scoring 2-D rows, a row identical to a training row is taken to be that training sample
    and is scored leave-one-out, so ``fit(X).predict(X)`` flags about ``contamination * n``
    samples. Feature grids are scored as they are.

    References
    ----------
    T. Defard, A. Setkaluri, C. Loesch and R. Audigier, "PaDiM: a Patch Distribution
    Modeling Framework for Anomaly Detection and Localization", ICPR Workshops 2020
    (arXiv:2011.08785).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PaDiMDetector
    >>> rng = np.random.RandomState(0)
    >>> train = rng.normal(size=(30, 4, 4, 8)).astype(np.float32)
    >>> test = np.concatenate([train[:1] * 0.5, train[:1] + 5.0])
    >>> det = PaDiMDetector(random_state=0).fit(train)
    >>> det.predict(test).tolist()
    [1, -1]
    >>> det.predict_map(test).shape
    (2, 4, 4)
    """

    _parameter_constraints: dict = {
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "reg": [Interval(Real, 0, None, closed="left")],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "random_state": ["random_state"],
        "device": [str],
    }

    def __init__(
        self,
        *,
        n_features=100,
        reg=0.01,
        contamination="auto",
        random_state=None,
        device="auto",
    ):
        self.n_features = n_features
        self.reg = reg
        self.contamination = contamination
        self.random_state = random_state
        self.device = device

    # ----------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit one Gaussian per grid position and set ``offset_``.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d), or array-like (n_samples, d)
            Normal training features (see Notes).
        y : array-like of shape (n,), default=None
            Samples labelled -1 are left out; None means all are normal.

        Returns
        -------
        self : PaDiMDetector
        """
        if isinstance(X, MemoryBank):
            raise ValueError(
                "PaDiMDetector models every grid position of every training image and cannot "
                "use a coreset memory bank; remove the CoresetSampler step in front of it."
            )
        X = validate_features(self, _as_grids(X), reset=True)
        keep = normal_mask(y, X.shape[0])
        if keep is not None:
            X = X[keep]
        n, d = X.shape[0], X.shape[-1]
        if n < 3:
            raise ValueError(
                f"PaDiMDetector needs at least 3 normal training samples (a covariance per "
                f"position, and leave-one-out training scores for offset_), got n_samples={n}."
            )
        self.grid_shape_ = tuple(int(s) for s in X.shape[1:-1]) if X.ndim == 4 else (1, 1)
        rng = check_random_state(self.random_state)
        if self.n_features is None or self.n_features >= d:
            self.feature_indices_ = np.arange(d, dtype=np.int64)
        else:
            chosen = rng.choice(d, size=self.n_features, replace=False)
            self.feature_indices_ = np.sort(chosen).astype(np.int64)
        self.n_samples_fit_ = n
        rows = X.reshape(n, -1, d)
        means, factors, loo, loo_factor = self._fit_positions(rows)
        h, w = self.grid_shape_
        dim = self.feature_indices_.shape[0]
        self.mean_ = means.reshape(h, w, dim)
        self.cholesky_ = factors.reshape(h, w, dim, dim)
        if X.ndim == 2:
            self.loo_cholesky_ = loo_factor
            self._remember_training_rows(X)
        else:
            self.loo_cholesky_ = None
            self._remember_training_rows(None)
        train_scores = -loo.max(axis=1)
        self.offset_ = contamination_offset(train_scores, self.contamination, "PaDiMDetector")
        return self

    def _fit_positions(self, rows):
        """Means, Cholesky factors, leave-one-out distances (n, positions) and, for a
        single position, the factor that gives them."""
        return fit_gaussians(rows, self.feature_indices_, self.reg,
                             device=resolve_device(self.device), grid_shape=self.grid_shape_)

    # ----------------------------------------------------------------- scoring
    def score_samples(self, X):
        """Opposite of the anomaly score: lower means more abnormal.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d) or array-like (n_samples, d)
            Test features, on the grid seen in fit.

        Returns
        -------
        scores : ndarray of shape (n,), float64
            Minus the largest Mahalanobis distance over the grid positions.
        """
        check_is_fitted(self)
        X = self._check_X(X)
        dist = self._distances(X)
        samples = self._training_samples_of(X)
        if samples is not None:  # the tabular leave-one-out rule (BaseDetector)
            seen = samples >= 0
            dist[seen, 0] = self._loo_rows(X[seen])
        return -dist.max(axis=1)

    def score_and_map(self, X):
        """``score_samples(X)`` and ``predict_map(X)`` from one pass over the positions.

        Parameters
        ----------
        X : ndarray of shape (n_images, h, w, d)
            Test feature grids, on the grid seen in fit.

        Returns
        -------
        scores : ndarray of shape (n,), float64
            As :meth:`score_samples` (lower = more abnormal).
        maps : ndarray of shape (n, h, w), float32
            As :meth:`predict_map` with ``output_size=None`` (higher = more anomalous).
        """
        check_is_fitted(self)
        X = self._check_grids(X)
        dist = self._distances(X)
        return -dist.max(axis=1), dist.reshape(X.shape[:-1]).astype(np.float32)

    # --------------------------------------------------------------- internals
    def _check_grids(self, X):
        return self._check_X(check_features(_as_grids(X), "X", allow_2d=False))

    def _patch_grids(self, X):
        return self._distances(X).reshape(X.shape[:-1]).astype(np.float32)

    def _check_X(self, X):
        X = validate_features(self, _as_grids(X), reset=False)
        grid = tuple(int(s) for s in X.shape[1:-1]) if X.ndim == 4 else (1, 1)
        if grid != self.grid_shape_:
            raise ValueError(
                f"PaDiM needs aligned images of one size; got grid {grid} but fitted on "
                f"{self.grid_shape_}; use the same FeatureExtractor image_size (and "
                "crop_size) as in fit."
            )
        return X

    def _distances(self, X):
        """Mahalanobis distances (n, positions), float64, a block of positions at a time."""
        n, d = X.shape[0], X.shape[-1]
        return mahalanobis_distances(X.reshape(n, -1, d), self.feature_indices_, self.mean_,
                                     self.cholesky_, device=resolve_device(self.device))

    def _loo_rows(self, X):
        """Leave-one-out distances of training rows (single position)."""
        z = torch.from_numpy(X[:, self.feature_indices_].astype(np.float64))
        u = (z - torch.from_numpy(self.mean_.reshape(1, -1))).T
        sol = torch.linalg.solve_triangular(torch.from_numpy(self.loo_cholesky_), u, upper=False)
        return _loo_distance((sol * sol).sum(dim=0), self.n_samples_fit_).numpy()
