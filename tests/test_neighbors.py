"""Exact and approximate nearest-neighbour search (skpatchcore.neighbors)."""

import pickle
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import spearmanr
from sklearn.neighbors import NearestNeighbors
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import PatchCoreDetector, SPADEDetector, neighbors
from skpatchcore.neighbors import (
    AUTO_NNDESCENT_MIN_ROWS,
    ExactIndex,
    NNDescentIndex,
    _auto_backend,
    make_index,
)


def brute_force(bank, Q, k, query_groups=None, bank_groups=None):
    """float64 k-NN with the same contract as ExactIndex.query (stable order on ties)."""
    bank, Q = np.asarray(bank, np.float64), np.asarray(Q, np.float64)
    d = np.sqrt(((Q[:, None, :] - bank[None, :, :]) ** 2).sum(axis=2))
    if query_groups is not None:
        d[np.asarray(query_groups)[:, None] == np.asarray(bank_groups)[None, :]] = np.inf
    k = min(k, bank.shape[0])
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, idx, axis=1)
    return dist, np.where(np.isinf(dist), -1, idx)


def check_knn(bank, Q, dist, idx, ref_dist, query_groups=None, bank_groups=None):
    """Same sorted distances as the reference; indices may differ only between ties."""
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-12)
    assert np.all(dist[:, 1:] >= dist[:, :-1])  # ascending (inf >= inf)
    valid = idx >= 0
    np.testing.assert_array_equal(valid, np.isfinite(ref_dist))
    rows, cols = np.nonzero(valid)
    measured = np.linalg.norm(
        np.asarray(bank, np.float64)[idx[rows, cols]] - np.asarray(Q, np.float64)[rows], axis=1
    )
    np.testing.assert_allclose(dist[rows, cols], measured, rtol=1e-9, atol=1e-12)
    for row in range(idx.shape[0]):
        found = idx[row][idx[row] >= 0]
        assert len(set(found.tolist())) == found.size
    if query_groups is not None:
        same = np.asarray(bank_groups)[idx[rows, cols]] == np.asarray(query_groups)[rows]
        assert not same.any()


def clustered(n, dim, n_centers, seed, spread=0.3):
    rng = np.random.RandomState(seed)
    centres = rng.normal(scale=3.0, size=(n_centers, dim))
    labels = rng.randint(n_centers, size=n)
    X = centres[labels] + spread * rng.normal(size=(n, dim))
    return X.astype(np.float32), labels


# ------------------------------------------------------------------------------ ExactIndex
# Grid values (multiples of 1/4, |x| <= 4) make float32 arithmetic exact, so ties are exact
# ties and every distance is comparable to the float64 reference to rounding.
grid_values = st.integers(-16, 16).map(lambda v: v / 4)


@st.composite
def search_problems(draw):
    d = draw(st.integers(1, 6))
    m = draw(st.integers(1, 30))
    n = draw(st.integers(1, 12))
    bank = draw(arrays(np.float32, (m, d), elements=grid_values))
    Q = draw(arrays(np.float32, (n, d), elements=grid_values))
    k = draw(st.integers(1, m + 2))
    groups = None
    if draw(st.booleans()):
        n_groups = draw(st.integers(1, 4))
        groups = (draw(arrays(np.int64, n, elements=st.integers(0, n_groups - 1))),
                  draw(arrays(np.int64, m, elements=st.integers(0, n_groups - 1))))
    return bank, Q, k, groups


@settings(max_examples=25, deadline=None)
@given(search_problems())
def test_exact_index_matches_float64_brute_force(problem):
    bank, Q, k, groups = problem
    kw = {} if groups is None else {"query_groups": groups[0], "bank_groups": groups[1]}
    dist, idx = ExactIndex(bank).query(Q, k, **kw)
    assert dist.dtype == np.float64 and idx.dtype == np.int64
    assert dist.shape == idx.shape == (Q.shape[0], min(k, bank.shape[0]))
    ref_dist, _ = brute_force(bank, Q, k, **kw)
    check_knn(bank, Q, dist, idx, ref_dist, **kw)


@pytest.mark.parametrize("k", [1, 5])
def test_exact_index_matches_sklearn_brute(k):
    rng = np.random.RandomState(0)
    bank = rng.normal(size=(500, 24)).astype(np.float32)
    Q = np.concatenate([rng.normal(size=(200, 24)).astype(np.float32), bank[:20]])
    dist, idx = ExactIndex(bank).query(Q, k)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank).kneighbors(Q)
    np.testing.assert_array_equal(idx, ref_idx)  # continuous data: no ties
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=1e-6)  # sklearn: float32
    check_knn(bank, Q, dist, idx, brute_force(bank, Q, k)[0])
    assert np.all(dist[-20:, 0] == 0.0)  # a query equal to a bank row is at exactly 0


def test_exact_index_groups_with_too_few_eligible_rows():
    bank = np.arange(12, dtype=np.float32).reshape(6, 2)
    bank_groups = np.array([0, 0, 0, 0, 1, 1])
    dist, idx = ExactIndex(bank).query(bank[[0, 5]], 4, query_groups=[0, 1],
                                       bank_groups=bank_groups)
    assert idx[0].tolist() == [4, 5, -1, -1] and np.isinf(dist[0, 2:]).all()
    assert idx[1].tolist() == [3, 2, 1, 0]


# -------------------------------------------------------------------------- NNDescentIndex
@pytest.fixture(scope="module")
def nnd():
    """One pynndescent index over clustered data (pays numba's compilation once)."""
    bank, labels = clustered(3000, 24, 40, seed=0)
    rng = np.random.RandomState(1)  # queries near bank rows, as test patches near normal ones
    Q = bank[rng.choice(3000, 600, replace=False)] + 0.2 * rng.normal(size=(600, 24))
    return bank, labels, Q.astype(np.float32), NNDescentIndex(bank, random_state=0)


def test_nndescent_recall_and_true_distances(nnd):
    bank, _, Q, index = nnd
    assert index.graph is not None and len(index) == 3000
    ref_dist, ref_idx = ExactIndex(bank).query(Q, 1)
    for k in (1, 5):
        dist, idx = index.query(Q, k)
        assert dist.shape == idx.shape == (600, k) and dist.dtype == np.float64
        assert np.all(np.diff(dist, axis=1) >= 0)
        true = np.linalg.norm(bank[idx].astype(np.float64) - Q[:, None].astype(np.float64),
                              axis=2)
        np.testing.assert_allclose(dist, true, rtol=1e-12)
        assert all(len(set(row)) == k for row in idx.tolist())
        assert np.all(dist[:, 0] >= ref_dist[:, 0] - 1e-12)  # never better than exact
        assert np.mean(idx[:, 0] == ref_idx[:, 0]) >= 0.95


def test_nndescent_groups_fall_back_to_exact(nnd, monkeypatch):
    """Same-group rows are never returned; short rows are searched exactly."""
    bank, labels, _, index = nnd
    calls = []
    original = ExactIndex.query

    def spy(self, Q, k=1, **kw):
        calls.append(len(Q))
        return original(self, Q, k, **kw)

    monkeypatch.setattr(ExactIndex, "query", spy)
    # Leave-one-cluster-out: nearly every graph candidate is in the query's own group.
    Q = bank[:400]
    dist, idx = index.query(Q, 3, query_groups=labels[:400], bank_groups=labels)
    assert calls and 0 < sum(calls) <= 400
    assert not np.any(labels[idx] == labels[:400, None]) and np.all(idx >= 0)
    ref_dist, _ = brute_force(bank, Q, 3, labels[:400], labels)
    assert np.all(dist >= ref_dist - 1e-9)
    # Leave-one-out by row (tabular scoring): exactly one row excluded per query.
    rows = np.arange(400)
    dist, idx = index.query(Q, 2, query_groups=rows, bank_groups=np.arange(len(bank)))
    assert not np.any(idx == rows[:, None])
    ref_dist, _ = brute_force(bank, Q, 2, rows, np.arange(len(bank)))
    assert np.mean(np.isclose(dist[:, 0], ref_dist[:, 0])) >= 0.95


def test_nndescent_too_few_eligible_rows_matches_exact(nnd):
    bank, _, Q, index = nnd
    bank_groups = np.zeros(len(bank), dtype=np.int64)
    bank_groups[[7, 11]] = 1
    query_groups = np.zeros(50, dtype=np.int64)
    dist, idx = index.query(Q[:50], 4, query_groups=query_groups, bank_groups=bank_groups)
    ref = ExactIndex(bank).query(Q[:50], 4, query_groups=query_groups,
                                 bank_groups=bank_groups)
    np.testing.assert_array_equal(idx, ref[1])
    np.testing.assert_array_equal(dist, ref[0])
    assert np.isinf(dist[:, 2:]).all() and (idx[:, 2:] == -1).all()


def test_nndescent_duplicate_rows(nnd):
    """Identical rows are one graph node that stands for all its copies."""
    bank, labels, Q, _ = nnd
    rows = np.concatenate([np.arange(1000), np.arange(0, 1000, 2), np.arange(0, 1000, 3)])
    rows = rows[np.random.RandomState(3).permutation(rows.size)]
    dup, groups = bank[rows], np.arange(rows.size) % 7
    index = NNDescentIndex(dup, random_state=0)
    assert index.graph is not None and index._nodes.size == 1000
    dist, idx = index.query(Q, 3)
    ref_dist, _ = brute_force(dup, Q, 3)
    assert np.mean(np.isclose(dist, ref_dist).all(axis=1)) >= 0.95
    # Never below exact; unique, sorted, true L2 distances.
    check_knn(dup, Q, dist, idx, np.maximum(dist, ref_dist))
    # A row with three copies: all three at distance exactly 0.
    copies = np.flatnonzero(rows == 0)
    dist, idx = index.query(bank[:1], 3)
    assert dist[0].tolist() == [0.0, 0.0, 0.0] and sorted(idx[0]) == sorted(copies)
    # Leave-one-group-out: copies in other groups remain eligible, same-group ones never.
    q_groups = groups[copies[:1]]
    dist, idx = index.query(bank[:1], 2, query_groups=q_groups, bank_groups=groups)
    assert not np.any(groups[idx] == q_groups[0])
    ref_dist, _ = brute_force(dup, bank[:1], 2, q_groups, groups)
    np.testing.assert_allclose(dist, ref_dist)
    dist, idx = index.query(dup, 1, query_groups=groups, bank_groups=groups)
    assert not np.any(groups[idx[:, 0]] == groups)


def test_nndescent_small_bank_is_searched_exactly():
    bank, _ = clustered(50, 4, 3, seed=2)
    index = NNDescentIndex(bank, random_state=0)
    assert index.graph is None
    Q = bank[:10] + 0.1
    for got, want in zip(index.query(Q, 3), ExactIndex(bank).query(Q, 3), strict=True):
        np.testing.assert_array_equal(got, want)


def test_nndescent_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynndescent", None)
    with pytest.raises(ImportError, match=r"pip install pynndescent.*knn_backend='exact'"):
        NNDescentIndex(np.zeros((500, 2), dtype=np.float32))
    monkeypatch.setattr(neighbors, "AUTO_NNDESCENT_MIN_ROWS", 10)
    with pytest.warns(UserWarning, match="Falling back to exact search"):
        index = make_index(np.zeros((500, 2), dtype=np.float32), "auto")
    assert isinstance(index, ExactIndex)


# ------------------------------------------------------------------------------ make_index
def test_auto_rule_threshold():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert AUTO_NNDESCENT_MIN_ROWS == 200_000
    assert _auto_backend(AUTO_NNDESCENT_MIN_ROWS, cpu) == "exact"  # at the threshold: exact
    assert _auto_backend(AUTO_NNDESCENT_MIN_ROWS + 1, cpu) == "pynndescent"
    assert _auto_backend(AUTO_NNDESCENT_MIN_ROWS + 1, "cpu") == "pynndescent"
    assert _auto_backend(10**7, cuda) == "exact"  # CUDA: always exact
    for rows in (10_000, 100_000):  # default PatchCore banks stay exact
        assert _auto_backend(rows, cpu) == "exact"


def test_make_index_dispatch(nnd, monkeypatch):
    bank = nnd[0]
    assert isinstance(make_index(bank, "exact"), ExactIndex)
    assert isinstance(make_index(bank, "auto"), ExactIndex)
    assert isinstance(make_index(bank, "pynndescent", random_state=0), NNDescentIndex)
    monkeypatch.setattr(neighbors, "AUTO_NNDESCENT_MIN_ROWS", len(bank))
    assert isinstance(make_index(bank, "auto"), ExactIndex)  # at the threshold
    monkeypatch.setattr(neighbors, "AUTO_NNDESCENT_MIN_ROWS", len(bank) - 1)
    assert isinstance(make_index(bank, "auto"), NNDescentIndex)
    with pytest.raises(ValueError, match="'auto', 'exact', 'pynndescent'"):
        make_index(bank, "faiss")


# ------------------------------------------------------------------------------ detectors
def make_grids(n, seed, shift=0.0):
    """Grids (n, 6, 6, 16) whose patches come from 20 clusters; ``shift`` moves some."""
    X, _ = clustered(n * 36, 16, 20, seed=0, spread=0.4)
    X = X[np.random.RandomState(seed).permutation(len(X))].reshape(n, 6, 6, 16)
    if shift:
        X[:, 2:4, 2:4] += shift
    return X.astype(np.float32)


def test_detectors_accept_pynndescent(nnd):
    train = make_grids(30, seed=1)  # 1080 bank rows: a real graph
    test = np.concatenate([make_grids(12, seed=2), make_grids(6, seed=3, shift=1.5)])
    exact = PatchCoreDetector(knn_backend="exact").fit(train)
    approx = PatchCoreDetector(knn_backend="pynndescent").fit(train)
    assert isinstance(approx._index("bank", approx.memory_bank_), NNDescentIndex)
    s_exact, s_approx = exact.score_samples(test), approx.score_samples(test)
    assert spearmanr(s_exact, s_approx).statistic > 0.99
    np.testing.assert_allclose(s_approx, s_exact, rtol=0.05)
    assert approx.offset_ == pytest.approx(exact.offset_, rel=0.05)
    maps_exact, maps_approx = exact.predict_map(test), approx.predict_map(test)
    assert np.mean(np.isclose(maps_exact, maps_approx)) > 0.95
    assert np.all(maps_approx >= maps_exact - 1e-5)  # approximate: never closer than exact
    # Indices are not pickled: the index is rebuilt (same seed) after loading.
    loaded = pickle.loads(pickle.dumps(approx))
    np.testing.assert_allclose(loaded.score_samples(test), s_approx, rtol=0.05)

    spade = SPADEDetector(knn_backend="pynndescent", n_image_neighbors=5).fit(train)
    spade_exact = SPADEDetector(knn_backend="exact", n_image_neighbors=5).fit(train)
    assert np.mean(np.isclose(spade.predict_map(test), spade_exact.predict_map(test))) > 0.95


@pytest.mark.parametrize("Detector", [PatchCoreDetector, SPADEDetector])
def test_detectors_reject_unknown_backend(Detector):
    with pytest.raises(InvalidParameterError, match="knn_backend"):
        Detector(knn_backend="faiss").fit(np.random.RandomState(0).rand(10, 3))


def test_group_masks_by_runs_equal_masks_by_comparison():
    """Leave-one-out queries come sorted by group and are masked run by run; shuffled (or
    interleaved) groups use an elementwise comparison. Both must exclude exactly the same
    rows, and match a float64 brute force."""
    rng = np.random.RandomState(3)
    bank = rng.randn(700, 12).astype(np.float32)
    bank_groups = rng.randint(0, 25, 700)
    Q = rng.randn(400, 12).astype(np.float32)
    q_groups = np.sort(rng.randint(0, 25, 400))
    index = ExactIndex(bank)
    d_runs, i_runs = index.query(Q, 4, query_groups=q_groups, bank_groups=bank_groups)
    perm = rng.permutation(400)
    d_cmp, i_cmp = index.query(Q[perm], 4, query_groups=q_groups[perm],
                               bank_groups=bank_groups)
    np.testing.assert_array_equal(i_runs[perm], i_cmp)
    np.testing.assert_array_equal(d_runs[perm], d_cmp)
    brute = np.sqrt(((Q[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1))
    brute[q_groups[:, None] == bank_groups[None]] = np.inf
    np.testing.assert_allclose(d_runs, np.sort(brute, 1)[:, :4], rtol=1e-12)
    assert not (bank_groups[i_runs] == q_groups[:, None]).any()


@pytest.mark.parametrize("k", [1, 3])
def test_skipped_remeasures_change_nothing(k):
    """Candidates that float32 rounding bounds prove farther than k others are not
    re-measured in float64; near-ties (rows 1e-4 apart, three per centre, within the k + 4
    candidates float32 ranking pre-selects) must come out exactly as when every candidate
    is re-measured, and as a float64 brute force."""
    rng = np.random.RandomState(7)
    centres = rng.randn(300, 24).astype(np.float32) * 5
    bank = (np.repeat(centres, 3, axis=0) + 1e-4 * rng.randn(900, 24)).astype(np.float32)
    Q = (centres[rng.randint(0, 300, 600)] + 1e-3 * rng.randn(600, 24)).astype(np.float32)
    index = ExactIndex(bank)
    d, i = index.query(Q, k)

    def remeasure_all(q, cand, cand_rank, k):
        exact = torch.linalg.vector_norm(index.bank[cand].double() - q.double()[:, None], dim=2)
        return torch.where(torch.isinf(cand_rank), torch.inf, exact)

    index._remeasure = remeasure_all
    d_all, i_all = index.query(Q, k)
    np.testing.assert_array_equal(d, d_all)
    np.testing.assert_array_equal(i, i_all)
    brute = np.sqrt(((Q[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d, np.sort(brute, axis=1)[:, :k], rtol=1e-12)
