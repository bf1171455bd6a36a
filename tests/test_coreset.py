import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skpatchcore import CoresetSampler, MemoryBank, PatchFeatures


def _covering_radius(points, selected):
    d = np.sqrt(((points[:, None, :] - points[selected][None]) ** 2).sum(-1))
    return d.min(1).max()


def test_fit_transform_returns_selected_rows():
    rng = np.random.RandomState(0)
    F = rng.rand(6, 5, 5, 16).astype(np.float32)
    sampler = CoresetSampler(sampling_ratio=0.1, random_state=0)
    bank = sampler.fit_transform(F)
    assert isinstance(bank, MemoryBank) and bank.rows.dtype == np.float32
    assert bank.shape == (15, 16)
    np.testing.assert_array_equal(bank.rows, F.reshape(-1, 16)[sampler.sample_indices_])
    np.testing.assert_array_equal(np.asarray(bank), bank.rows)
    assert len(set(sampler.sample_indices_.tolist())) == 15
    np.testing.assert_array_equal(bank.sample_index, sampler.sample_indices_ // 25)
    np.testing.assert_array_equal(np.asarray(bank.training_features), F)
    # transform passes test features through untouched
    assert sampler.transform(F) is F
    # fit alone selects the same rows
    again = CoresetSampler(sampling_ratio=0.1, random_state=0).fit(F)
    np.testing.assert_array_equal(again.sample_indices_, sampler.sample_indices_)


def test_sizes_ratio_and_absolute():
    F = np.random.RandomState(0).rand(200, 4).astype(np.float32)
    assert CoresetSampler(sampling_ratio=0.05).fit_transform(F).shape == (10, 4)
    assert CoresetSampler(sampling_ratio=1.0).fit_transform(F).shape == (200, 4)
    assert CoresetSampler(n_samples=7).fit_transform(F).shape == (7, 4)
    assert CoresetSampler(n_samples=500).fit_transform(F).shape == (200, 4)


def test_seeded_and_deterministic():
    F = np.random.RandomState(0).rand(300, 200).astype(np.float32)
    a = CoresetSampler(0.05, random_state=1).fit(F).sample_indices_
    b = CoresetSampler(0.05, random_state=1).fit(F).sample_indices_
    c = CoresetSampler(0.05, random_state=2).fit(F).sample_indices_
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_y_drops_anomalous_images_and_indices_refer_to_input():
    rng = np.random.RandomState(0)
    F = rng.rand(5, 2, 2, 3).astype(np.float32)
    F[1] += 100.0  # anomalous image far away: greedy would pick it first if kept
    y = np.array([1, -1, 1, 1, 1])
    sampler = CoresetSampler(sampling_ratio=0.5, random_state=0)
    bank = sampler.fit_transform(F, y)
    assert bank.shape == (8, 3)
    assert not np.isin(sampler.sample_indices_ // 4, [1]).any()
    np.testing.assert_array_equal(bank.rows, F.reshape(-1, 3)[sampler.sample_indices_])
    # the bank's training features are the normal images, and sample_index points into them
    kept = F[y == 1]
    np.testing.assert_array_equal(np.asarray(bank.training_features), kept)
    np.testing.assert_array_equal(bank.rows, kept.reshape(4, 4, 3)[
        bank.sample_index, sampler.sample_indices_ % 4])


def test_bad_input():
    with pytest.raises(ValueError, match="FeatureExtractor first"):
        CoresetSampler().fit_transform(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        CoresetSampler().fit_transform(np.full((4, 3), np.nan))
    with pytest.raises(ValueError, match="sampling_ratio"):
        CoresetSampler(sampling_ratio=0).fit(np.zeros((4, 3)))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 60),
    d=st.integers(1, 6),
    ratio=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_covering_radius(n, d, ratio, seed):
    """Without projection the reported radius is the true covering radius, and greedy
    k-center is a 2-approximation: no set of the same size covers with less than half."""
    X = np.random.RandomState(seed).rand(n, d).astype(np.float32)
    sampler = CoresetSampler(sampling_ratio=ratio, projection_dim=None, random_state=seed)
    sampler.fit(X)
    r = _covering_radius(X.astype(np.float64), sampler.sample_indices_)
    assert sampler.coverage_radius_ == pytest.approx(r, rel=1e-5, abs=1e-6)
    # the greedy radius never exceeds the distance between any two selected points
    # (farthest-first: each new point was farther than r from all earlier ones)
    sel = X[sampler.sample_indices_].astype(np.float64)
    if len(sel) > 1:
        pair = np.sqrt(((sel[:, None] - sel[None]) ** 2).sum(-1))
        pair[np.diag_indices_from(pair)] = np.inf
        assert r <= pair.min() + 1e-5


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 12),
    batch=st.integers(1, 5),
    ratio=st.floats(0.05, 1.0),
    drop=st.lists(st.integers(0, 11), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_spilled_features_select_like_an_array(n, batch, ratio, drop, seed):
    """Features in a PatchFeatures spilled to disk (appended batch by batch, as
    FeatureExtractor.fit_transform does) select the same rows, radius and bank as the whole
    array at once, with and without labels."""
    F = np.random.RandomState(seed).randn(n, 3, 4, 8).astype(np.float32)
    y = np.ones(n, dtype=int)
    y[[i for i in drop if i < n]] = -1
    if (y == -1).all():
        y[0] = 1
    ref = CoresetSampler(sampling_ratio=ratio, projection_dim=5, random_state=seed)
    bank_ref = ref.fit_transform(F, y)
    feats = PatchFeatures(F.shape[1:], max_memory_mb=0)
    for s in range(0, n, batch):
        feats.append(F[s : s + batch])
    assert feats.spilled
    sampler = CoresetSampler(sampling_ratio=ratio, projection_dim=5, random_state=seed)
    bank = sampler.fit_transform(feats, y)
    np.testing.assert_array_equal(sampler.sample_indices_, ref.sample_indices_)
    assert sampler.coverage_radius_ == ref.coverage_radius_
    np.testing.assert_array_equal(bank.rows, bank_ref.rows)
    np.testing.assert_array_equal(bank.sample_index, bank_ref.sample_index)
    np.testing.assert_array_equal(np.asarray(bank.training_features), F[y == 1])
