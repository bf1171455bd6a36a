"""Greedy k-center coreset of the training patches (PatchCore's memory-bank subsampling)."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._base import SCORE_CHUNK_ROWS
from ._containers import MemoryBank, PatchFeatures
from ._kcenter import greedy_kcenter
from ._utils import resolve_device
from ._validation import normal_mask, validate_features

__all__ = ["CoresetSampler"]

# Rows projected per block: the scoring chunk, so that a part of the training set that starts
# at a multiple of the search chunk (skpatchcore.distributed) starts one here too.
_PROJECT_CHUNK = SCORE_CHUNK_ROWS


def _projection_matrix(d, dim, random_state, device):
    """Seeded Gaussian matrix (d, dim) scaled by 1/sqrt(dim) (draws one seed from the rng)."""
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d, dim, generator=gen) / math.sqrt(dim)).to(device)


def iter_projections(features, matrix, device):
    """Yield the projected rows of ``features`` (:class:`PatchFeatures`) in order, as
    tensors on ``device`` (the rows themselves when ``matrix`` is None), one chunk of at
    most ``SCORE_CHUNK_ROWS`` rows (whole samples) at a time: what selection reads, in
    :class:`CoresetSampler` and on the workers of :mod:`skpatchcore.distributed`. Each chunk
    is one matrix product, so a part of a training set that starts at a multiple of the
    chunk's samples is projected into the same bits as the whole. ValueError when a row
    holds NaN or infinity."""
    d = features.sample_shape[-1]
    for _, grids in features.iter_chunks(_PROJECT_CHUNK):
        rows = grids.reshape(-1, d)
        if not np.isfinite(rows).all():
            raise ValueError("F contains NaN or infinite values.")
        chunk = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device)
        yield chunk if matrix is None else chunk @ matrix.to(device)


class CoresetSampler(TransformerMixin, BaseEstimator):
    """Greedy k-center coreset of training patch features; acts only while fitting.

    ``fit_transform(F)`` flattens the patches of the (normal) training grids, projects them
    with a seeded Gaussian random projection to ``projection_dim`` dimensions, and selects
    rows by greedy k-center (start from one row, repeatedly add the row farthest from the
    selected set), which minimises the covering radius up to a factor 2. The selected rows
    keep their full features and are returned as the memory bank. ``transform(F)`` returns
    F untouched, so test features pass through a fitted pipeline unchanged.

    Parameters
    ----------
    sampling_ratio : float in (0, 1], default=0.1
        Fraction of the training patches kept (the paper uses 0.01-0.25).
    n_samples : int or None, default=None
        Absolute bank size; overrides ``sampling_ratio`` when given (clipped to the number of
        patches).
    projection_dim : int or None, default=128
        Dimension of the random projection used for distances during selection; None, or a
        value not below the feature dimension, selects on the raw features.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the starting row.
    device : str, default="auto"
        Where selection runs; "auto" uses CUDA when available.
    verbose : bool, default=False
        Show a progress bar.

    Attributes
    ----------
    sample_indices_ : ndarray of shape (m,), int64
        Selected rows of ``F.reshape(-1, d)`` (indices into the input as given, including
        images labelled -1), in selection order.
    coverage_radius_ : float
        Covering radius of the selection in the projected space: every normal training patch
        lies within this distance of a selected one.
    n_features_in_ : int
        d.

    Notes
    -----
    ``fit_transform(F)`` differs from ``fit(F).transform(F)`` on purpose: the first returns
    the memory bank, the second returns F (a sampler is a fit-time step, like imbalanced-learn's
    samplers). When ``y`` is given, samples labelled -1 are left out of the selection.

    The returned bank is a :class:`MemoryBank`: the selected rows, the training sample each
    came from, and the normal training features they were drawn from (which the detector
    scores leave-one-out to set ``offset_``). Features arrive as an array or as the
    :class:`PatchFeatures` that :meth:`FeatureExtractor.fit_transform` returns; they are read
    and projected a bounded number of rows at a time, so only their ``projection_dim``-wide
    projection is held in memory while selecting.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import CoresetSampler
    >>> F = np.random.RandomState(0).rand(4, 8, 8, 16).astype(np.float32)
    >>> bank = CoresetSampler(sampling_ratio=0.1, random_state=0).fit_transform(F)
    >>> bank.shape
    (26, 16)
    """

    _parameter_constraints: dict = {
        "sampling_ratio": [Interval(Real, 0, 1, closed="right")],
        "n_samples": [Interval(Integral, 1, None, closed="left"), None],
        "projection_dim": [Interval(Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "device": [str],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        sampling_ratio=0.1,
        *,
        n_samples=None,
        projection_dim=128,
        random_state=None,
        device="auto",
        verbose=False,
    ):
        self.sampling_ratio = sampling_ratio
        self.n_samples = n_samples
        self.projection_dim = projection_dim
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, F, y=None):
        """Select the coreset.

        Parameters
        ----------
        F : ndarray of shape (n_images, h, w, d) or (n_samples, d), or PatchFeatures
            Training features.
        y : array-like of shape (n,), default=None
            +1 normal, -1 anomalous (left out); None means every sample is normal.

        Returns
        -------
        self : CoresetSampler
        """
        self._select(F, y)
        return self

    def fit_transform(self, F, y=None):
        """Select the coreset and return the memory bank.

        Parameters
        ----------
        F : ndarray of shape (n_images, h, w, d) or (n_samples, d), or PatchFeatures
            Training features.
        y : array-like of shape (n,), default=None
            +1 normal, -1 anomalous (left out); None means every sample is normal.

        Returns
        -------
        bank : MemoryBank
            ``bank.rows`` (m, d) float32 are ``F.reshape(-1, d)[sample_indices_]``;
            ``bank.sample_index`` and ``bank.training_features`` say where they came from.
        """
        self._validate_params()
        return self._select(F, y)

    def _select(self, F, y):
        F = validate_features(self, F, reset=True)
        if not isinstance(F, PatchFeatures):
            F = PatchFeatures.from_array(F)
        keep = normal_mask(y, len(F))
        source = F if keep is None else F.take(np.flatnonzero(keep))
        d = F.sample_shape[-1]
        rng, matrix = self._projection(d)
        n_rows = len(source) * source.cells_per_sample
        points = torch.empty((n_rows, d if matrix is None else matrix.shape[1]),
                             dtype=torch.float32, device=resolve_device(self.device))
        filled = 0
        for chunk in iter_projections(source, matrix, points.device):
            points[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        selected = self._select_points(points, rng)
        del points
        per_sample = self._set_indices(selected, keep, F.sample_shape[:-1])
        return MemoryBank(source.take_rows(selected), selected // per_sample, source)

    def _projection(self, d):
        """The seeded random state and the projection matrix (d, projection_dim) on the
        selection device, or None when selection runs on the raw features. The rng has
        drawn the projection's seed and goes on to draw the starting row
        (:meth:`_select_points`), so the two calls must come in this order."""
        rng = check_random_state(self.random_state)
        if self.projection_dim is None or self.projection_dim >= d:
            return rng, None
        return rng, _projection_matrix(d, self.projection_dim, rng, resolve_device(self.device))

    def _select_points(self, points, rng):
        """Greedy k-center on the projected points (a tensor (n_rows, d')); sets
        coverage_radius_ and returns the selected rows in selection order."""
        n_rows = points.shape[0]
        if self.n_samples is not None:
            m = min(self.n_samples, n_rows)
        else:
            m = max(1, math.ceil(self.sampling_ratio * n_rows))
        start = int(rng.randint(n_rows))
        selected, radius = greedy_kcenter(points, m, start_index=start, verbose=self.verbose)
        self.coverage_radius_ = float(radius)
        return np.asarray(selected, dtype=np.int64)

    def _set_indices(self, selected, keep, grid_shape):
        """Map positions among the kept rows back to rows of the input as given."""
        per_sample = int(np.prod(grid_shape, dtype=np.int64))
        if keep is None:
            self.sample_indices_ = selected
        else:
            kept_samples = np.flatnonzero(keep)
            self.sample_indices_ = (
                kept_samples[selected // per_sample] * per_sample + selected % per_sample
            )
        return per_sample

    def transform(self, F):
        """Return F unchanged: the coreset only shrinks the training bank.

        Parameters
        ----------
        F : array-like
            Test features.

        Returns
        -------
        F : the same object
        """
        check_is_fitted(self)
        validate_features(self, F, reset=False)
        return F

    def set_output(self, *, transform=None):
        """Accept ``transform=None`` or ``"default"`` (features pass through unchanged)."""
        if transform not in (None, "default"):
            raise ValueError(f"CoresetSampler passes features through and cannot output "
                             f"{transform!r}; use 'default' or None.")
        return self
