"""The two containers that carry data between the fitting steps.

:class:`PatchFeatures` is what :meth:`FeatureExtractor.fit_transform` returns: the training
images' feature grids, in memory up to a budget and in a temporary file beyond it, read back
a bounded number of samples at a time. :class:`MemoryBank` is what
:meth:`CoresetSampler.fit_transform` returns: the selected rows, the training sample each row
came from, and the normal training features they were drawn from (a detector scores each
training sample against the bank without its own rows to set ``offset_``).

Both are ordinary Python objects whose state is their documented attributes: ``copy``,
``pickle``, ``joblib`` (``Pipeline(memory=...)``) and process boundaries keep everything.
Both convert to a numpy array with ``np.asarray`` (all grids, or the bank rows).
"""

from __future__ import annotations

import copy
import tempfile

import numpy as np

__all__ = ["MemoryBank", "PatchFeatures"]


class _Store:
    """Samples appended in order; held as in-memory parts until ``max_bytes`` is exceeded,
    then all of them in an anonymous temporary file (deleted when closed or collected)."""

    def __init__(self, sample_shape, max_bytes):
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.sample_bytes = 4 * int(np.prod(self.sample_shape, dtype=np.int64))
        self.max_bytes = max_bytes
        self.parts, self.starts = [], []
        self.file = None
        self.n = 0

    def append(self, grids):
        grids = np.asarray(grids, dtype=np.float32)
        if grids.shape[1:] != self.sample_shape:
            raise ValueError(f"Expected samples of shape {self.sample_shape}, got "
                             f"{grids.shape[1:]}.")
        if (self.file is None and self.max_bytes is not None
                and (self.n + len(grids)) * self.sample_bytes > self.max_bytes):
            self.file = tempfile.TemporaryFile(prefix="skpatchcore-features-")
            for part in self.parts:
                np.ascontiguousarray(part).tofile(self.file)
            self.parts, self.starts = [], []
        if self.file is not None:
            self.file.seek(self.n * self.sample_bytes)
            np.ascontiguousarray(grids).tofile(self.file)
        else:
            self.parts.append(grids)
            self.starts.append(self.n)
        self.n += len(grids)

    def read(self, start, stop):
        """Samples ``start:stop`` as an ndarray (a view when they lie in one memory part)."""
        count = max(0, stop - start)
        if self.file is not None:
            self.file.seek(start * self.sample_bytes)
            out = np.fromfile(self.file, dtype=np.float32,
                              count=count * self.sample_bytes // 4)
            return out.reshape((count,) + self.sample_shape)
        pieces = []
        for part, first in zip(self.parts, self.starts, strict=True):
            lo, hi = max(start, first), min(stop, first + len(part))
            if lo < hi:
                pieces.append(part[lo - first : hi - first])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty((0,) + self.sample_shape, dtype=np.float32)
        return np.concatenate(pieces)

    def close(self):
        if self.file is not None:
            self.file.close()


class PatchFeatures:
    """Feature grids of many samples, held in memory up to a budget, in a temporary file
    beyond it.

    :meth:`FeatureExtractor.fit_transform` returns one, and :class:`CoresetSampler` and the
    detectors read it a bounded number of samples at a time, so a fit never holds every
    training feature in memory at once. It behaves as a read-only array of shape
    ``(n_samples,) + sample_shape`` for slicing (``features[a:b]`` is an ndarray) and for
    ``np.asarray(features)`` (which reads everything).

    Parameters
    ----------
    sample_shape : tuple of int
        Shape of one sample: ``(h, w, d)`` for a feature grid, ``(d,)`` for a row.
    max_memory_mb : float or None, default=128
        MiB held in memory; once the samples appended exceed it, all of them move to an
        anonymous temporary file in the system's temporary directory (``TMPDIR``), deleted
        when this object is closed or garbage-collected. None never spills.

    Attributes
    ----------
    shape : tuple of int
        ``(n_samples,) + sample_shape``.
    spilled : bool
        Whether the samples live in a temporary file.

    Notes
    -----
    Copying or pickling reads the samples into the copy (which spills again past its budget),
    so a copy never shares a file with the original: closing one leaves the other intact.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchFeatures
    >>> feats = PatchFeatures((2, 2, 3), max_memory_mb=None)
    >>> feats.append(np.ones((4, 2, 2, 3), dtype=np.float32))
    >>> feats.shape, feats[1:3].shape, float(np.asarray(feats).sum())
    ((4, 2, 2, 3), (2, 2, 2, 3), 48.0)
    """

    def __init__(self, sample_shape, max_memory_mb=128):
        max_bytes = None if max_memory_mb is None else int(max_memory_mb * 2**20)
        self._store = _Store(sample_shape, max_bytes)
        self._index = None  # a view: which samples of the store, ascending
        self._max_memory_mb = max_memory_mb

    @classmethod
    def from_array(cls, X):
        """Wrap an in-memory array ``(n,) + sample_shape`` (no copy)."""
        X = np.asarray(X, dtype=np.float32)
        feats = cls(X.shape[1:], max_memory_mb=None)
        feats.append(X)
        return feats

    # ------------------------------------------------------------------ shape
    @property
    def sample_shape(self):
        return self._store.sample_shape

    @property
    def shape(self):
        return (len(self),) + self.sample_shape

    @property
    def ndim(self):
        return len(self.sample_shape) + 1

    @property
    def dtype(self):
        return np.dtype(np.float32)

    @property
    def spilled(self):
        return self._store.file is not None

    def __len__(self):
        return self._store.n if self._index is None else len(self._index)

    def __repr__(self):
        where = "in a temporary file" if self.spilled else "in memory"
        return f"PatchFeatures(shape={self.shape}, {where})"

    # ---------------------------------------------------------------- writing
    def append(self, grids):
        """Append samples of shape ``(b,) + sample_shape`` (converted to float32)."""
        if self._index is not None:
            raise ValueError("A PatchFeatures view made by take() is read-only.")
        self._store.append(grids)

    # ---------------------------------------------------------------- reading
    def __getitem__(self, key):
        """Index like a numpy array; the result is always an ndarray (read from the file
        when spilled). Contiguous slices read one block; other keys read only the samples
        they name."""
        rest = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = len(self)
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(n)
            out = self._read(start, stop)
        elif isinstance(key, int | np.integer):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of bounds for {n} samples")
            return self._read(i, i + 1)[0][rest]
        else:
            out = self._gather(_sample_indices(key, n))
        return out[(slice(None),) + rest] if rest else out

    def _read(self, start, stop):
        """Samples ``start:stop`` (0 <= start <= stop <= len) as an ndarray."""
        if self._index is None:
            return self._store.read(start, stop)
        return self._store_gather(self._index[start:stop])

    def _gather(self, indices):
        """Samples at ``indices`` (any order, repeats allowed) as a new ndarray."""
        store_idx = indices if self._index is None else self._index[indices]
        return self._store_gather(store_idx)

    def _store_gather(self, idx):
        """Store samples ``idx`` as an ndarray, reading each run of consecutive ones once."""
        if len(idx) == 0:
            return np.empty((0,) + self.sample_shape, dtype=np.float32)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi - lo == len(idx) and np.all(np.diff(idx) == 1):
            return self._store.read(lo, hi)
        out = np.empty((len(idx),) + self.sample_shape, dtype=np.float32)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        breaks = np.flatnonzero(np.diff(sorted_idx) > 1) + 1
        for run in np.split(np.arange(len(idx)), breaks):
            first, last = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]])
            block = self._store.read(first, last + 1)
            out[order[run]] = block[sorted_idx[run] - first]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def iter_chunks(self, max_rows=65536):
        """Yield ``(start, samples)`` with at most ``max(1, max_rows // cells)`` samples at a
        time (``cells`` = h * w for grids, 1 for rows)."""
        step = max(1, int(max_rows) // self.cells_per_sample)
        for start in range(0, len(self), step):
            yield start, self[start : start + step]

    @property
    def cells_per_sample(self):
        return int(np.prod(self.sample_shape[:-1], dtype=np.int64))

    def take(self, indices):
        """A read-only view of the samples ``indices`` (ascending), sharing the storage."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) > 1 and np.any(np.diff(indices) <= 0)):
            raise ValueError("take() needs strictly ascending sample indices.")
        if len(indices) and (indices[0] < 0 or indices[-1] >= len(self)):
            raise IndexError(f"Sample index out of range for {len(self)} samples.")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._index = indices if self._index is None else self._index[indices]
        return view

    def take_rows(self, rows, max_rows=65536):
        """Rows ``np.asarray(self).reshape(-1, d)[rows]``, read chunk by chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        d = self.sample_shape[-1]
        cells = self.cells_per_sample
        out = np.empty((len(rows), d), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for start, block in self.iter_chunks(max_rows):
            lo = np.searchsorted(sorted_rows, start * cells)
            hi = np.searchsorted(sorted_rows, (start + len(block)) * cells)
            if lo < hi:
                out[order[lo:hi]] = block.reshape(-1, d)[sorted_rows[lo:hi] - start * cells]
        return out

    def close(self):
        """Delete the temporary file now (views of it become unreadable)."""
        self._store.close()

    # ------------------------------------------------------------ copy/pickle
    def __reduce__(self):
        return (_restore_features, (self[:], self._max_memory_mb))

    def __deepcopy__(self, memo):
        return _restore_features(np.array(self[:]), self._max_memory_mb)


def _sample_indices(key, n):
    """A fancy index along the sample axis (slice with a step, ints, booleans) -> int64
    indices in [0, n)."""
    if isinstance(key, slice):
        return np.arange(n)[key]
    key = np.asarray(key)
    if key.dtype == bool:
        if key.shape != (n,):
            raise IndexError(f"boolean index of shape {key.shape} does not match {n} samples")
        return np.flatnonzero(key)
    if key.dtype.kind not in "iu" or key.ndim != 1:
        raise IndexError("PatchFeatures takes ints, slices, 1-D int arrays or boolean masks "
                         "along the sample axis; use np.asarray(features) for anything else.")
    key = key.astype(np.int64)
    if len(key) and (key.min() < -n or key.max() >= n):
        raise IndexError(f"index out of bounds for {n} samples")
    return np.where(key < 0, key + n, key)


def _restore_features(array, max_memory_mb):
    feats = PatchFeatures(array.shape[1:], max_memory_mb=max_memory_mb)
    feats.append(array)
    return feats


class MemoryBank:
    """The fit-time hand-over from a sampler to a memory-bank detector.

    :meth:`CoresetSampler.fit_transform` returns one; :class:`PatchCoreDetector` and
    :class:`SPADEDetector` accept it in ``fit``. Everything a detector needs travels as an
    explicit attribute, so the bank survives ``copy``, ``pickle``, ``clone`` of the
    steps, ``Pipeline(memory=...)`` caching and process boundaries unchanged.

    Parameters
    ----------
    rows : array-like of shape (m, d)
        The memory-bank rows (stored as float32).
    sample_index : array-like of shape (m,), int
        For each row, the training sample it came from: an index into
        ``training_features``.
    training_features : PatchFeatures or array-like of shape (n, h, w, d) or (n, d)
        Every normal training sample the bank was drawn from. Detectors score each of them
        against the bank without its own rows (leave-one-out) to set ``offset_``.

    Notes
    -----
    ``np.asarray(bank)`` gives the rows alone: fitting a detector on that array treats each
    row as an independent tabular sample, which is a different model.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import MemoryBank, PatchCoreDetector
    >>> train = np.random.RandomState(0).rand(3, 2, 2, 4).astype(np.float32)
    >>> bank = MemoryBank(train[:, 0, 0], sample_index=[0, 1, 2], training_features=train)
    >>> bank.shape, bank.training_features.shape
    ((3, 4), (3, 2, 2, 4))
    >>> PatchCoreDetector().fit(bank).memory_bank_.shape
    (3, 4)
    """

    def __init__(self, rows, sample_index, training_features):
        rows = np.asarray(rows, dtype=np.float32)
        sample_index = np.asarray(sample_index, dtype=np.int64)
        if not isinstance(training_features, PatchFeatures):
            training_features = PatchFeatures.from_array(training_features)
        if rows.ndim != 2 or sample_index.shape != (rows.shape[0],):
            raise ValueError(f"MemoryBank needs rows (m, d) and one sample index per row; got "
                             f"rows {rows.shape} and sample_index {sample_index.shape}.")
        if training_features.sample_shape[-1] != rows.shape[1]:
            raise ValueError(f"MemoryBank rows have {rows.shape[1]} features but the training "
                             f"features have {training_features.sample_shape[-1]}.")
        n = len(training_features)
        if len(sample_index) and (sample_index.min() < 0 or sample_index.max() >= n):
            raise ValueError(f"MemoryBank sample_index must lie in [0, {n}).")
        self.rows = rows
        self.sample_index = sample_index
        self.training_features = training_features

    @property
    def shape(self):
        return self.rows.shape

    @property
    def dtype(self):
        return self.rows.dtype

    @property
    def ndim(self):
        return 2

    def __len__(self):
        return self.rows.shape[0]

    def __array__(self, dtype=None, copy=None):
        return self.rows if dtype is None else self.rows.astype(dtype, copy=False)

    def __repr__(self):
        return (f"MemoryBank(rows={self.rows.shape}, training_features="
                f"{self.training_features!r})")

    def copy(self):
        """A deep copy (rows, indices and training features)."""
        return copy.deepcopy(self)
