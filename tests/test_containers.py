"""PatchFeatures and MemoryBank: the containers between the fitting steps."""

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skpatchcore import MemoryBank, PatchFeatures


def _features(F, batch, max_memory_mb):
    feats = PatchFeatures(F.shape[1:], max_memory_mb=max_memory_mb)
    for s in range(0, len(F), batch):
        feats.append(F[s : s + batch])
    return feats


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), batch=st.integers(1, 4), spill=st.booleans(),
       picks=st.lists(st.integers(-9, 8), max_size=6), seed=st.integers(0, 1000))
def test_property_reads_equal_numpy_indexing(n, batch, spill, picks, seed):
    """In memory or spilled to a file, every read equals the same numpy indexing."""
    F = np.random.RandomState(seed).randn(n, 2, 3, 4).astype(np.float32)
    feats = _features(F, batch, 0 if spill else None)
    assert feats.spilled == spill and feats.shape == F.shape and len(feats) == n
    np.testing.assert_array_equal(np.asarray(feats), F)
    np.testing.assert_array_equal(feats[1:], F[1:])
    np.testing.assert_array_equal(feats[::2], F[::2])
    np.testing.assert_array_equal(feats[:, 1, 2], F[:, 1, 2])
    np.testing.assert_array_equal(feats[-1], F[-1])
    np.testing.assert_array_equal(feats[F[:, 0, 0, 0] > 0], F[F[:, 0, 0, 0] > 0])
    picks = [p for p in picks if -n <= p < n]
    np.testing.assert_array_equal(feats[np.array(picks, dtype=int)], F[picks])
    rows = np.random.RandomState(seed).randint(0, n * 6, size=7)
    np.testing.assert_array_equal(feats.take_rows(rows, max_rows=6), F.reshape(-1, 4)[rows])
    keep = np.flatnonzero(np.random.RandomState(seed + 1).rand(n) < 0.6)
    view = feats.take(keep)
    np.testing.assert_array_equal(np.asarray(view), F[keep])
    np.testing.assert_array_equal(np.concatenate([c for _, c in view.iter_chunks(12)] or [
        F[:0]]), F[keep])


def test_copies_and_pickles_are_independent_of_the_file():
    F = np.random.RandomState(0).rand(5, 2, 2, 3).astype(np.float32)
    feats = _features(F, 2, 0)
    clones = [copy.copy(feats), copy.deepcopy(feats), pickle.loads(pickle.dumps(feats))]
    feats.close()
    for other in clones:
        assert other.spilled  # restored past its budget: spilled again, to its own file
        np.testing.assert_array_equal(np.asarray(other), F)


def test_errors_say_what_to_do():
    feats = PatchFeatures((2, 3))
    with pytest.raises(ValueError, match="shape"):
        feats.append(np.zeros((1, 2, 4), np.float32))
    feats.append(np.zeros((3, 2, 3), np.float32))
    with pytest.raises(IndexError, match="out of bounds"):
        feats[3]
    with pytest.raises(ValueError, match="read-only"):
        feats.take([0, 1]).append(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match="ascending"):
        feats.take([1, 0])


@given(arrays(np.float32, (4, 3), elements=st.floats(-5, 5, width=32)))
def test_memory_bank_keeps_everything_through_copy_and_pickle(rows):
    training = np.concatenate([rows, rows + 1]).reshape(4, 2, 3)
    bank = MemoryBank(rows, [0, 1, 3, 3], training)
    for other in (bank.copy(), copy.copy(bank), pickle.loads(pickle.dumps(bank))):
        np.testing.assert_array_equal(other.rows, rows)
        np.testing.assert_array_equal(other.sample_index, [0, 1, 3, 3])
        np.testing.assert_array_equal(np.asarray(other.training_features), training)
    np.testing.assert_array_equal(np.asarray(bank), rows)
    assert bank.shape == (4, 3) and len(bank) == 4
    with pytest.raises(ValueError, match="sample_index"):
        MemoryBank(rows, [0, 1, 2, 4], training)
    with pytest.raises(ValueError, match="features"):
        MemoryBank(rows[:, :2], [0, 1, 2, 3], training)
