"""Tests of the greedy k-center kernels (skpatchcore._kcenter).

Three implementations must agree exactly: the fast ``greedy_kcenter`` (its CPU algorithm
``_greedy_batched``, also run with tiny batches so that every code path is taken, and the
GPU loop ``_greedy_dense``, run here on CPU), the plain ``greedy_kcenter_reference`` and an
independent float64 numpy brute force written below.

Comparing float32 selections with a float64 brute force is only sound when no rounding can
reorder two distances. On *grid* data (small integers times a power of two) every squared
distance is an integer below 2**24 times a power of two, so it is exact in float32 whatever
the summation order, and the float32 and float64 selections must be identical, ties
included (grid data has many ties, which tests the lowest-index rule). On continuous data
the fast path must still equal the reference (same arithmetic), and the float64 checks are
made with a tolerance: the covering radius (relative 1e-5) and the greedy property (each
selected point is, to 1e-5, the farthest from those before it).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skpatchcore._kcenter import (
    _greedy_batched,
    _greedy_dense,
    _sq_dists,
    greedy_kcenter,
    greedy_kcenter_reference,
)

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)


def brute_force_greedy(X, n_centers, start_index):
    """Greedy k-center in float64 numpy on the full distance matrix (the rule, spelled out)."""
    X = np.asarray(X, dtype=np.float64)
    n_centers = min(n_centers, len(X))
    sq = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    min_sq = np.full(len(X), np.inf)
    selected = []
    new = start_index
    for _ in range(n_centers):
        selected.append(new)
        min_sq = np.minimum(min_sq, sq[new])
        min_sq[selected] = -1.0  # a selected point is never chosen again
        new = int(np.argmax(min_sq))  # first maximum: ties go to the lowest index
    return np.array(selected, dtype=np.int64), math.sqrt(max(min_sq.max(), 0.0))


def covering_radius(X, indices):
    """max over points of the distance to the nearest selected point, in float64."""
    X = np.asarray(X, dtype=np.float64)
    sq = ((X[:, None, :] - X[None, indices, :]) ** 2).sum(-1)
    return math.sqrt(sq.min(1).max())


def all_selections(X, n_centers, start_index):
    """(name, (indices, radius)) of every implementation, on CPU."""
    X_t = torch.as_tensor(X)
    n = min(n_centers, len(X))
    return [
        ("fast", greedy_kcenter(X_t, n_centers, start_index=start_index)),
        ("reference", greedy_kcenter_reference(X_t, n_centers, start_index=start_index)),
        ("dense", _greedy_dense(X_t, n, start_index)),
        # Tiny candidate sets and batches: many phases, centers taken nearest-first in
        # chunks (with pruning), rows dropped early.
        ("batched-small", _greedy_batched(X_t, n, start_index, n_candidates=3,
                                          chunk_elements=1, column_chunk=2, n_threads=2)),
        ("batched-one", _greedy_batched(X_t, n, start_index, n_candidates=1,
                                        chunk_elements=64, column_chunk=5, n_threads=1)),
    ]


@st.composite
def grid_problems(draw):
    """Exact-arithmetic data: integers (at most 66 in size) times a power of two."""
    n_samples = draw(st.integers(1, 300))
    n_features = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["grid", "clustered", "duplicates", "identical"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "grid":
        X = rng.integers(-8, 9, (n_samples, n_features))
    elif kind == "clustered":
        centres = rng.integers(-4, 5, (draw(st.integers(1, 10)), n_features)) * 16
        X = centres[rng.integers(0, len(centres), n_samples)]
        X = X + rng.integers(-2, 3, (n_samples, n_features))
    elif kind == "duplicates":
        base = rng.integers(-8, 9, (draw(st.integers(1, 6)), n_features))
        X = base[rng.integers(0, len(base), n_samples)]
    else:
        X = np.repeat(rng.integers(-8, 9, (1, n_features)), n_samples, axis=0)
    X = (X * 2.0 ** draw(st.integers(-6, 6))).astype(np.float32)
    n_centers = draw(st.integers(1, n_samples + 3))
    start_index = draw(st.integers(0, n_samples - 1))
    return X, n_centers, start_index


@st.composite
def float_problems(draw):
    """Continuous float32 data: Gaussian, clustered, with copied rows, offset or skewed."""
    n_samples = draw(st.integers(1, 300))
    n_features = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["normal", "clustered", "copies", "offset", "skewed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.standard_normal((n_samples, n_features))
    if kind == "clustered":
        centres = 20.0 * rng.standard_normal((draw(st.integers(1, 10)), n_features))
        spread = 10.0 ** rng.uniform(-3, 0, len(centres))
        labels = rng.integers(0, len(centres), n_samples)
        X = centres[labels] + spread[labels, None] * X
    elif kind == "copies":
        X = X[rng.integers(0, max(1, n_samples // 4), n_samples)]
    elif kind == "offset":  # large norms, small distances: stresses the Gram-form bound
        X = 1000.0 + 1e-2 * X
    elif kind == "skewed":
        X = X * 10.0 ** rng.uniform(-3, 3, n_features)
    n_centers = draw(st.integers(1, n_samples + 3))
    start_index = draw(st.integers(0, n_samples - 1))
    return X.astype(np.float32), n_centers, start_index


@PROPERTY_SETTINGS
@given(grid_problems())
def test_exact_data_matches_float64_brute_force(problem):
    X, n_centers, start_index = problem
    expected, expected_radius = brute_force_greedy(X, n_centers, start_index)
    assert expected_radius == covering_radius(X, expected)
    for name, (indices, radius) in all_selections(X, n_centers, start_index):
        assert indices.dtype == np.int64, name
        np.testing.assert_array_equal(indices, expected, err_msg=name)
        assert radius == expected_radius, name


@PROPERTY_SETTINGS
@given(float_problems())
def test_float_data_matches_reference(problem):
    X, n_centers, start_index = problem
    results = all_selections(X, n_centers, start_index)
    reference, reference_radius = results[1][1]
    for name, (indices, radius) in results:
        np.testing.assert_array_equal(indices, reference, err_msg=name)
        assert radius == reference_radius, name
    # Against float64, with a tolerance (see the module docstring).
    assert reference[0] == start_index
    assert len(np.unique(reference)) == len(reference) == min(n_centers, len(X))
    assert math.isclose(reference_radius, covering_radius(X, reference), rel_tol=1e-5,
                        abs_tol=1e-30)
    X64 = X.astype(np.float64)
    min_sq = np.full(len(X), np.inf)
    for t in range(1, len(reference)):
        min_sq = np.minimum(min_sq, ((X64 - X64[reference[t - 1]]) ** 2).sum(1))
        assert min_sq[reference[t]] >= min_sq.max() * (1 - 1e-5)


def test_sq_dists_rows_do_not_depend_on_the_batch():
    """The exactness argument: a row's distance is the same bits in any batch on CPU."""
    rng = np.random.default_rng(0)
    for n_features in (3, 16, 128, 130):
        X = torch.from_numpy(rng.standard_normal((5000, n_features)).astype(np.float32))
        q = X[17]
        full = _sq_dists(X, q)
        rows = torch.from_numpy(rng.permutation(5000)[:700])
        assert torch.equal(_sq_dists(X[rows], q), full[rows])
        assert torch.equal(_sq_dists(X[rows], X[[17] * 700]), full[rows])
        for lo, hi in ((0, 1), (3, 4), (100, 117), (1000, 4999)):
            assert torch.equal(_sq_dists(X[lo:hi], q), full[lo:hi])
        out, work = torch.empty(300), torch.empty(300, n_features)
        assert torch.equal(_sq_dists(X[:300], q, out=out, work=work), full[:300])


@pytest.fixture
def one_thread():
    """One intra-op thread: the reference's many small parallel ops stall on a busy machine."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def clustered_points(n_samples, n_features, n_clusters, seed):
    rng = np.random.default_rng(seed)
    centres = 5.0 * rng.standard_normal((n_clusters, n_features))
    spread = 10.0 ** rng.uniform(-1.5, 0, n_clusters)
    labels = rng.integers(0, n_clusters, n_samples)
    X = centres[labels] + spread[labels, None] * rng.standard_normal((n_samples, n_features))
    return torch.from_numpy(X.astype(np.float32))


@pytest.mark.parametrize(
    "n_samples, n_features, n_centers",
    [(20_000, 16, 500), (6_000, 128, 300)],
)
def test_mid_size_matches_reference(n_samples, n_features, n_centers, one_thread):
    X = clustered_points(n_samples, n_features, 200, seed=n_features)
    stats = {}
    fast, fast_radius = _greedy_batched(X, n_centers, 123, n_candidates=256, column_chunk=32,
                                        stats=stats)
    reference, reference_radius = greedy_kcenter_reference(X, n_centers, start_index=123)
    np.testing.assert_array_equal(fast, reference)
    assert fast_radius == reference_radius
    public, public_radius = greedy_kcenter(X, n_centers, start_index=123)
    np.testing.assert_array_equal(public, reference)
    assert public_radius == reference_radius
    # The run went through several phases, and some rows were left stale below the cut.
    assert stats["settles"] > 2
    assert stats["dropped early"] > 0 and stats["pruned"] > 0
    assert stats["exact"] < stats["pairs"]


def test_prefix_and_monotone_radius():
    X = clustered_points(3000, 8, 40, seed=1)
    indices, radius = greedy_kcenter(X, 400, start_index=5)
    previous = math.inf
    for k in (1, 2, 10, 39, 40, 41, 150, 400):
        prefix, prefix_radius = greedy_kcenter(X, k, start_index=5)
        np.testing.assert_array_equal(prefix, indices[:k])
        assert prefix_radius <= previous
        previous = prefix_radius
    assert previous == radius


def test_every_point_is_covered():
    X = clustered_points(2000, 6, 30, seed=2)
    indices, radius = greedy_kcenter(X, 100, start_index=0)
    X64 = X.double()
    nearest = torch.cdist(X64, X64[torch.from_numpy(indices)]).min(1).values
    assert float(nearest.max()) <= radius * (1 + 1e-6)
    assert math.isclose(float(nearest.max()), radius, rel_tol=1e-6)


def test_one_center():
    X = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    indices, radius = greedy_kcenter(X, 1, start_index=2)
    assert indices.tolist() == [2]
    assert radius == pytest.approx(math.sqrt(13.0))  # (1, 1) to (3, 4)


@pytest.mark.parametrize("n_centers", [50, 51, 1000])
def test_all_points(n_centers):
    X = clustered_points(50, 3, 4, seed=3)
    indices, radius = greedy_kcenter(X, n_centers, start_index=7)
    assert len(indices) == 50 and indices[0] == 7
    assert sorted(indices.tolist()) == list(range(50))
    assert radius == 0.0
    np.testing.assert_array_equal(indices, greedy_kcenter_reference(X, n_centers,
                                                                   start_index=7)[0])


def test_single_point():
    indices, radius = greedy_kcenter(torch.ones(1, 4), 3)
    assert indices.tolist() == [0] and radius == 0.0


def test_identical_points_follow_the_index_order():
    X = torch.full((10, 3), 2.5)
    indices, radius = greedy_kcenter(X, 6, start_index=4)
    assert indices.tolist() == [4, 0, 1, 2, 3, 5]
    assert radius == 0.0


def test_duplicates_then_index_order():
    # Two distinct locations, each repeated: after one point of each, all distances are 0.
    X = torch.tensor([[0.0], [5.0], [0.0], [5.0], [0.0]])
    indices, radius = greedy_kcenter(X, 5, start_index=2)
    assert indices.tolist() == [2, 1, 0, 3, 4]
    assert radius == 0.0


def test_input_types():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((200, 5))
    expected = greedy_kcenter_reference(X.astype(np.float32), 20)[0]
    np.testing.assert_array_equal(greedy_kcenter(X.astype(np.float32), 20)[0], expected)
    # float64 is kept: compared with the float64 reference.
    indices64, radius64 = greedy_kcenter(torch.from_numpy(X), 20)
    reference64, reference_radius64 = greedy_kcenter_reference(X, 20)
    np.testing.assert_array_equal(indices64, reference64)
    assert radius64 == reference_radius64
    # Integers and half precision are converted to float32.
    ints = rng.integers(-5, 6, (100, 3))
    np.testing.assert_array_equal(greedy_kcenter(ints, 10)[0],
                                  brute_force_greedy(ints, 10, 0)[0])
    half = torch.from_numpy(ints).half()
    np.testing.assert_array_equal(greedy_kcenter(half, 10)[0],
                                  brute_force_greedy(ints, 10, 0)[0])
    # A Python list works too.
    assert greedy_kcenter([[0.0], [1.0], [3.0]], 2)[0].tolist() == [0, 2]


def test_large_finite_values_are_accepted():
    # The sum of X overflows to inf here: the finiteness check must look closer.
    X = np.full((6, 3), 3e38, dtype=np.float32)
    indices, radius = greedy_kcenter(X, 3)
    assert indices.tolist() == [0, 1, 2] and radius == 0.0


def test_return_radius_false_returns_indices_only():
    X = clustered_points(500, 4, 5, seed=5)
    indices = greedy_kcenter(X, 30, return_radius=False)
    assert isinstance(indices, np.ndarray)
    np.testing.assert_array_equal(indices, greedy_kcenter(X, 30)[0])


def test_verbose_progress_bar(capsys):
    X = clustered_points(300, 4, 5, seed=6)
    indices, _ = greedy_kcenter(X, 20, verbose=True)
    assert len(indices) == 20


def test_global_settings_are_restored():
    n_threads = torch.get_num_threads()
    greedy_kcenter(clustered_points(500, 4, 5, seed=7), 20)
    assert torch.get_num_threads() == n_threads


def test_thread_counts_agree():
    X = clustered_points(5000, 8, 50, seed=8)
    one = _greedy_batched(X, 300, 0, n_threads=1, n_candidates=64, chunk_elements=4096)
    two = _greedy_batched(X, 300, 0, n_threads=2, n_candidates=64, chunk_elements=4096)
    np.testing.assert_array_equal(one[0], two[0])
    assert one[1] == two[1]


@pytest.mark.parametrize(
    "X, n_centers, start_index, match",
    [
        (np.zeros(5), 2, 0, "2-D"),
        (np.zeros((2, 3, 4)), 2, 0, "2-D"),
        (np.zeros((0, 4)), 2, 0, "at least one sample"),
        (np.zeros((4, 0)), 2, 0, "at least one sample"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), 1, 0, "NaN or infinity"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), 1, 0, "NaN or infinity"),
        (np.zeros((4, 2)), 0, 0, "n_centers must be >= 1"),
        (np.zeros((4, 2)), -3, 0, "n_centers must be >= 1"),
        (np.zeros((4, 2)), 2.5, 0, "n_centers must be an integer"),
        (np.zeros((4, 2)), True, 0, "n_centers must be an integer"),
        (np.zeros((4, 2)), "2", 0, "n_centers must be an integer"),
        (np.zeros((4, 2)), 2, 4, r"start_index must be in \[0, 3\]"),
        (np.zeros((4, 2)), 2, -1, r"start_index must be in \[0, 3\]"),
        (np.zeros((4, 2)), 2, 1.0, "start_index must be an integer"),
    ],
)
def test_invalid_inputs(X, n_centers, start_index, match):
    for function in (greedy_kcenter, greedy_kcenter_reference):
        with pytest.raises(ValueError, match=match):
            function(X, n_centers, start_index=start_index)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference():
    X = clustered_points(20_000, 32, 100, seed=9)
    expected, expected_radius = greedy_kcenter_reference(X.cuda(), 300, start_index=11)
    indices, radius = greedy_kcenter(X.cuda(), 300, start_index=11)
    np.testing.assert_array_equal(indices, expected)
    assert radius == expected_radius
    assert indices[0] == 11 and len(np.unique(indices)) == 300
