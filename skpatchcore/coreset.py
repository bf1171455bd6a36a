"""Greedy k-center coreset of the training patches (PatchCore's memory-bank subsampling)."""

from __future__ import annotations

import math
import tempfile
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from ._kcenter import greedy_kcenter
from ._utils import resolve_device

__all__ = ["CoresetSampler", "MemoryBank", "SpilledFeatures"]

_PROJECT_CHUNK = 65536


class MemoryBank(np.ndarray):
    """Memory-bank rows (m, d) that remember where they came from.

    Returned by :meth:`CoresetSampler.fit_transform`. It is a plain float32 array for every
    purpose; :class:`PatchCoreDetector` additionally reads two attributes so that its
    leave-one-out training scores (used for ``contamination``) never match a training image
    against its own patches:

    * ``groups`` : int array (m,), the training image (or row, for 2-D data) of each bank row,
      indexing ``source``;
    * ``source`` : the normal training features the bank was selected from, (n, h, w, d) or
      (n, d).

    Slices and arithmetic results drop both attributes (they are set to None) and then behave
    like an ordinary 2-D array.
    """

    def __new__(cls, rows, groups=None, source=None):
        obj = np.asarray(rows, dtype=np.float32).view(cls)
        obj.groups = groups
        obj.source = source
        return obj

    def __array_finalize__(self, obj):
        self.groups = None
        self.source = None

    def __reduce__(self):  # pickle as a plain array
        return np.asarray(self).__reduce__()


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


def validate_features(estimator, X, *, reset):
    """Feature grids (n, h, w, d) or rows (n, d) -> float32 ndarray; sets/checks
    ``n_features_in_`` (= d) like scikit-learn's ``validate_data``."""
    if isinstance(X, np.ndarray | torch.Tensor) and X.ndim == 4:
        X = check_features(X, "X", allow_2d=False)
        if reset:
            estimator.n_features_in_ = X.shape[-1]
            if hasattr(estimator, "feature_names_in_"):
                del estimator.feature_names_in_
        elif X.shape[-1] != estimator.n_features_in_:
            raise ValueError(
                f"X has {X.shape[-1]} features per patch, but {type(estimator).__name__} is "
                f"expecting {estimator.n_features_in_} features. Use the same "
                "FeatureExtractor settings as in fit."
            )
        return X
    if getattr(X, "ndim", 2) == 3:
        raise ValueError(f"X must have shape (n_images, h, w, d) or (n_samples, n_features), "
                         f"got {X.shape}. Raw images go through FeatureExtractor first.")
    return validate_data(estimator, X, reset=reset, dtype=np.float32)


def normal_mask(y, n, name="y"):
    """Boolean mask of samples to keep: everything except y == -1. None keeps all."""
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be 1-D with one label per sample ({n}), got shape "
                         f"{y.shape}.")
    keep = y != -1
    if not keep.any():
        raise ValueError(f"Every sample is labelled -1 (anomalous) in {name}; the memory bank "
                         "needs normal samples (y=+1 or y=None).")
    return None if keep.all() else keep


def _projection_matrix(d, dim, random_state, device):
    """Seeded Gaussian matrix (d, dim) scaled by 1/sqrt(dim) (draws one seed from the rng)."""
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d, dim, generator=gen) / math.sqrt(dim)).to(device)


class SpilledFeatures:
    """Feature grids written batch by batch to an anonymous temporary file.

    Streaming fits keep only the random projection in memory; the full float32 rows live
    here, are read back for the selected bank rows (:meth:`take_rows`) and, a few samples at
    a time, for leave-one-out training scores (slicing ``spilled[a:b]`` returns an ndarray).
    The file is deleted when closed or garbage-collected.

    Parameters
    ----------
    sample_shape : tuple of int
        Shape of one sample, ``(h, w, d)`` or ``(d,)``.
    directory : str or None, default=None
        Where the file goes (None: the system's temporary directory).
    """

    def __init__(self, sample_shape, directory=None):
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self._row_bytes = 4 * int(np.prod(self.sample_shape, dtype=np.int64))
        self._file = tempfile.TemporaryFile(dir=directory)
        self._n = 0

    @property
    def shape(self):
        return (self._n,) + self.sample_shape

    @property
    def ndim(self):
        return len(self.sample_shape) + 1

    def __len__(self):
        return self._n

    def append(self, grids):
        """Write samples of shape (b,) + sample_shape at the end of the file."""
        grids = np.ascontiguousarray(grids, dtype=np.float32)
        if grids.shape[1:] != self.sample_shape:
            raise ValueError(f"Expected samples of shape {self.sample_shape}, got "
                             f"{grids.shape[1:]}.")
        self._file.seek(self._n * self._row_bytes)
        grids.tofile(self._file)
        self._n += len(grids)

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SpilledFeatures supports contiguous slices only.")
        start, stop, _ = key.indices(self._n)
        count = max(0, stop - start)
        self._file.seek(start * self._row_bytes)
        out = np.fromfile(self._file, dtype=np.float32, count=count * self._row_bytes // 4)
        return out.reshape((count,) + self.sample_shape)

    def take_rows(self, rows, chunk_samples=256):
        """Rows ``reshape(-1, d)[rows]`` of the stored features, read chunk by chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        d = self.sample_shape[-1]
        per_sample = self._row_bytes // 4 // d
        out = np.empty((len(rows), d), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        bounds = np.arange(0, self._n + chunk_samples, chunk_samples) * per_sample
        cuts = np.searchsorted(sorted_rows, bounds)
        for i, start in enumerate(range(0, self._n, chunk_samples)):
            lo, hi = cuts[i], cuts[i + 1]
            if lo == hi:
                continue
            block = self[start : start + chunk_samples].reshape(-1, d)
            out[order[lo:hi]] = block[sorted_rows[lo:hi] - start * per_sample]
        return out

    def close(self):
        self._file.close()


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

    The returned bank is a :class:`MemoryBank`, a float32 ndarray subclass that remembers
    which training image each row came from.

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
        F : ndarray of shape (n_images, h, w, d) or (n_samples, d)
            Training features.
        y : array-like of shape (n,), default=None
            Samples labelled -1 are left out; None means every sample is normal.

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
        F : ndarray of shape (n_images, h, w, d) or (n_samples, d)
            Training features.
        y : array-like of shape (n,), default=None
            Samples labelled -1 are left out; None means every sample is normal.

        Returns
        -------
        bank : MemoryBank of shape (m, d), float32
            The selected rows, ``F.reshape(-1, d)[sample_indices_]``.
        """
        self._validate_params()
        return self._select(F, y)

    def _select(self, F, y):
        F = validate_features(self, F, reset=True)
        keep = normal_mask(y, F.shape[0])
        source = F if keep is None else F[keep]
        d = F.shape[-1]
        rows = source.reshape(-1, d)
        chunks = (rows[i : i + _PROJECT_CHUNK] for i in range(0, len(rows), _PROJECT_CHUNK))
        selected = self._select_rows(chunks, rows.shape[0], d)
        per_sample = self._set_indices(selected, keep, F.shape[1:-1])
        return MemoryBank(rows[selected], groups=selected // per_sample, source=source)

    def _fit_stream(self, batches, n_samples, sample_shape, y=None):
        """Select from features that arrive in batches, holding only their projection.

        ``batches`` yields ``(start, grids)`` with grids of shape (b,) + sample_shape for
        samples ``start:start + b``. Full rows are spilled to a temporary file
        (:class:`SpilledFeatures`), which becomes the returned bank's ``source``; the caller
        closes it when done.
        """
        self._validate_params()
        sample_shape = tuple(sample_shape)
        d = sample_shape[-1]
        self.n_features_in_ = d
        keep = normal_mask(y, n_samples)
        n_kept = n_samples if keep is None else int(keep.sum())
        per_sample = int(np.prod(sample_shape[:-1], dtype=np.int64))
        spill = SpilledFeatures(sample_shape)

        def rows():
            for start, grids in batches:
                if keep is not None:
                    grids = grids[keep[start : start + len(grids)]]
                spill.append(grids)
                yield np.ascontiguousarray(grids, dtype=np.float32).reshape(-1, d)

        try:
            selected = self._select_rows(rows(), n_kept * per_sample, d)
            self._set_indices(selected, keep, sample_shape[:-1])
            bank = spill.take_rows(selected)
        except BaseException:
            spill.close()
            raise
        return MemoryBank(bank, groups=selected // per_sample, source=spill)

    def _select_rows(self, row_batches, n_rows, d):
        """Project the rows as they come, run greedy k-center, set coverage_radius_."""
        if self.n_samples is not None:
            m = min(self.n_samples, n_rows)
        else:
            m = max(1, math.ceil(self.sampling_ratio * n_rows))
        device = resolve_device(self.device)
        rng = check_random_state(self.random_state)
        project = self.projection_dim is not None and self.projection_dim < d
        matrix = _projection_matrix(d, self.projection_dim, rng, device) if project else None
        points = torch.empty((n_rows, self.projection_dim if project else d),
                             dtype=torch.float32, device=device)
        filled = 0
        for rows in row_batches:
            chunk = torch.from_numpy(rows).to(device)
            points[filled : filled + len(chunk)] = chunk @ matrix if project else chunk
            filled += len(chunk)
        if filled != n_rows:
            raise ValueError(f"Expected {n_rows} feature rows, received {filled}.")
        start = int(rng.randint(n_rows))
        selected, radius = greedy_kcenter(points, m, start_index=start, verbose=self.verbose)
        del points
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
