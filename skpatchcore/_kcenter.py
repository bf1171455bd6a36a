"""Exact greedy k-center (farthest-point) selection, the coreset kernel of PatchCore.

Two public functions:

- :func:`greedy_kcenter_reference` is the plain greedy of the public PatchCore
  implementations (one distance update over all points per selected center). It is the
  semantic definition and the benchmark baseline.
- :func:`greedy_kcenter` selects exactly the same points, much faster on CPU: it keeps only
  a small candidate set exactly up to date and applies the selected centers to the other
  points lazily, in batches, as matrix products screened by rigorous floating-point bounds
  (see its Notes).

The selection rule, shared by both
----------------------------------
Let ``D(x, s) = fl(sum((x - s) ** 2))`` be the squared Euclidean distance computed in the
dtype of ``X`` by :func:`_sq_dists` (elementwise subtract, square, sum over features).
Starting from ``selected = [start_index]``, repeatedly add the point maximising
``min_{s in selected} D(x, s)``, where an already selected point counts as ``-1`` so it is
never chosen again; ties go to the lowest index. Once every remaining point is at distance 0
(duplicates), the rule therefore picks the lowest-index unselected points, in order.
Comparisons are made on squared distances: the square root can merge two different values
into one and so change which point wins a tie.
"""

import contextlib
import math
import numbers
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._utils import progress

__all__ = ["greedy_kcenter", "greedy_kcenter_reference"]


def _sq_dists(A, b, out=None, work=None):
    """Squared distances ``fl(sum((A - b) ** 2, axis=-1))``: the one arithmetic used.

    Every distance that decides a selection, in the reference and in the fast paths, is
    computed by this function on rows of ``X``, so equal inputs give bit-identical values:
    the elementwise subtract and square are correctly rounded, and PyTorch reduces each
    contiguous row of length ``d`` the same way whatever the number of rows (checked by the
    tests on CPU). ``out`` and ``work`` (the shape of ``A - b``) are optional buffers.
    """
    diff = torch.sub(A, b, out=work)
    return torch.sum(diff.square_(), -1, out=out)


def _all_finite(X, chunk=1 << 16):
    """Whether X has no NaN or infinity, without a temporary the size of X."""
    if math.isfinite(float(X.sum())):
        return True  # NaN and infinities propagate into the sum
    return all(bool(torch.isfinite(X[i : i + chunk]).all()) for i in range(0, len(X), chunk))


def _check_inputs(X, n_centers, start_index):
    """Validate and convert the arguments; return (X, n_centers, start_index)."""
    if not torch.is_tensor(X):
        X = torch.as_tensor(np.asarray(X))
    if X.ndim != 2:
        raise ValueError(
            f"X must be a 2-D array of shape (n_samples, n_features); got a {X.ndim}-D array "
            f"of shape {tuple(X.shape)}. Reshape it with X.reshape(-1, n_features)."
        )
    n_samples, n_features = X.shape
    if n_samples < 1 or n_features < 1:
        raise ValueError(
            f"X must contain at least one sample and one feature; got shape {tuple(X.shape)}."
        )
    if X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float32)
    if not _all_finite(X):
        raise ValueError("X contains NaN or infinity; k-center distances need finite values.")
    if isinstance(n_centers, bool) or not isinstance(n_centers, numbers.Integral):
        raise ValueError(f"n_centers must be an integer >= 1; got {n_centers!r}.")
    if n_centers < 1:
        raise ValueError(f"n_centers must be >= 1; got {n_centers}.")
    if isinstance(start_index, bool) or not isinstance(start_index, numbers.Integral):
        raise ValueError(f"start_index must be an integer; got {start_index!r}.")
    if not 0 <= start_index < n_samples:
        raise ValueError(
            f"start_index must be in [0, {n_samples - 1}] for X with {n_samples} samples; "
            f"got {start_index}."
        )
    return X.contiguous(), min(int(n_centers), n_samples), int(start_index)


def _radius(max_sq):
    """Covering radius from the largest minimum squared distance (-1 marks selected)."""
    return math.sqrt(max(float(max_sq), 0.0))


def greedy_kcenter_reference(X, n_centers, *, start_index=0):
    """Plain greedy k-center selection, as in the public PatchCore implementations.

    One distance update over all points per selected center,
    ``min_dist = minimum(min_dist, ||X - X[new]||^2)``, then ``argmax``. This is the
    definition that :func:`greedy_kcenter` reproduces exactly, and its benchmark baseline.
    Time O(n_centers * n_samples * n_features), memory O(n_samples * n_features).

    Parameters
    ----------
    X : torch.Tensor or ndarray of shape (n_samples, n_features)
        Points, usually randomly projected patch features. float32 and float64 are used as
        they are; other dtypes are converted to float32.
    n_centers : int
        Number of points to select; values above ``n_samples`` are clipped to it.
    start_index : int, default=0
        The first selected point.

    Returns
    -------
    indices : ndarray of shape (min(n_centers, n_samples),), dtype int64
        Selected rows of ``X`` in selection order; ``indices[0] == start_index``.
    radius : float
        Covering radius ``max_i min_{j in indices} ||X[i] - X[j]||``.

    See Also
    --------
    greedy_kcenter : The same selection, fast.

    Notes
    -----
    The rule, with its tie-breaking and the handling of duplicate points, is stated in the
    module docstring of ``skpatchcore._kcenter``.
    """
    X, n_centers, start_index = _check_inputs(X, n_centers, start_index)
    min_sq = torch.full((X.shape[0],), math.inf, dtype=X.dtype, device=X.device)
    indices = np.empty(n_centers, dtype=np.int64)
    new = start_index
    for t in range(n_centers):
        indices[t] = new
        min_sq = torch.minimum(min_sq, _sq_dists(X, X[new]))
        min_sq[new] = -1.0
        new = int(torch.argmax(min_sq))
    return indices, _radius(min_sq.max())


def _greedy_dense(X, n_centers, start_index, verbose=False):
    """Plain greedy without host synchronisation inside the loop (for GPUs).

    The same operations as :func:`greedy_kcenter_reference` on the same shapes, so the same
    values and the same selection; the next index stays on the device and the buffers are
    reused, so a GPU never waits for the host.
    """
    n_samples = X.shape[0]
    device = X.device
    min_sq = torch.full((n_samples,), math.inf, dtype=X.dtype, device=device)
    diff = torch.empty_like(X)
    sq = torch.empty_like(min_sq)
    selected = torch.empty(n_centers, dtype=torch.long, device=device)
    new = torch.full((1,), start_index, dtype=torch.long, device=device)
    with progress(n_centers, "k-center", unit="center", disable=not verbose) as bar:
        for t in range(n_centers):
            selected[t : t + 1] = new
            torch.sub(X, X.index_select(0, new), out=diff)
            torch.sum(diff.square_(), -1, out=sq)
            torch.minimum(min_sq, sq, out=min_sq)
            min_sq.index_fill_(0, new, -1.0)
            new = torch.argmax(min_sq).view(1)
            bar.update()
    return selected.cpu().numpy(), _radius(min_sq.max())


@contextlib.contextmanager
def _cpu_settings():
    """Full-precision float32 matrix products and one intra-op thread, restored on exit.

    The Gram-form error bound assumes IEEE float32 products, so a reduced-precision setting
    (``torch.backends.mkldnn.matmul.fp32_precision`` = "bf16" or "tf32") is lifted for the
    call. The intra-op thread count is set to 1 because the parallel work is spread over a
    thread pool instead (see :class:`_LazyGreedy`).
    """
    n_threads = torch.get_num_threads()
    mkldnn_matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(mkldnn_matmul, "fp32_precision", None)
    try:
        if precision not in (None, "none", "ieee"):
            mkldnn_matmul.fp32_precision = "ieee"
        torch.set_num_threads(1)
        yield n_threads
    finally:
        torch.set_num_threads(n_threads)
        if precision not in (None, "none", "ieee"):
            mkldnn_matmul.fp32_precision = precision


def _kth_largest(values, k):
    """The k-th largest entry of a 1-D tensor, as a float."""
    if 8 * k <= values.numel():
        return float(torch.topk(values, k, sorted=False).values.min())
    return float(torch.kthvalue(values, values.numel() - k + 1).values)


def _spatial_rank(X, leaf_size=2048, n_components=32, n_probe=256, n_power=3):
    """Rank of each point in a locality-preserving order (a balanced principal-axis tree).

    The points are projected on their top principal components (from a subsample), then
    recursively split at the median of the projection on each node's principal direction
    (power iteration on a strided subsample of the node), down to ``leaf_size`` points.
    Sorting rows by this rank makes batches of rows spatially compact. Only the speed of
    :func:`greedy_kcenter` depends on it, never its result.
    """
    n_samples, n_features = X.shape
    n_levels = max(0, math.ceil(math.log2(n_samples / leaf_size)))
    if n_levels == 0:
        return torch.arange(n_samples)
    sample = X[:: max(1, n_samples // 20_000)].double()
    sample -= sample.mean(0)
    components = torch.linalg.eigh(sample.T @ sample).eigenvectors[:, -n_components:]
    Y = X @ components.to(X.dtype)
    n_nodes_last = 1 << n_levels
    n_pad = n_nodes_last * -(-n_samples // n_nodes_last)  # n_pad - n_samples < n_samples
    key = torch.arange(n_pad)  # key >= n_samples: a padding duplicate of key - n_samples
    if n_pad > n_samples:
        Y = Y.index_select(0, key % n_samples)
    gen = torch.Generator().manual_seed(0)
    dim = Y.shape[1]
    for level in range(n_levels):
        n_nodes = 1 << level
        m = n_pad // n_nodes
        Yv = Y.view(n_nodes, m, dim)
        probe = Yv[:, :: max(1, m // n_probe)]
        probe = probe - probe.mean(1, keepdim=True)
        v = torch.randn(n_nodes, dim, 1, generator=gen, dtype=Y.dtype)
        for _ in range(n_power):
            v = torch.bmm(probe.transpose(1, 2), torch.bmm(probe, v))
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        order = torch.bmm(Yv, v).squeeze(2).argsort(1)
        key = torch.take_along_dim(key.view(n_nodes, m), order, 1).reshape(-1)
        if level + 1 < n_levels:
            Y = Y.index_select(0, (order + torch.arange(0, n_pad, m).unsqueeze(1)).reshape(-1))
    perm = key[key < n_samples]
    rank = torch.empty(n_samples, dtype=torch.long)
    rank[perm] = torch.arange(n_samples)
    return rank


class _LazyGreedy:
    """Exact greedy k-center on CPU: candidate phases and lazily batched updates.

    See :func:`greedy_kcenter`, Notes, for the algorithm and why it is exact.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features), float32 or float64, on CPU
    n_centers : int, at most n_samples
    n_candidates : int
        Size of the candidate set of each phase.
    chunk_elements : int
        Size of the (rows x centers) blocks of the batched updates.
    column_chunk : int
        Centers taken at a time in a batched update, between pruning and dropping checks.
    pool : concurrent.futures.Executor or None
        Runs the blocks of a batched update in parallel; None runs them in order.
    stats : dict or None
        Receives counters: settles, refreshed rows, pairs (screened by the Gram form),
        exact (pairs given the reference arithmetic), dropped early (rows left stale once
        below the cut), pruned (pairs skipped by the triangle inequality).
    """

    def __init__(self, X, n_centers, *, n_candidates=2048, chunk_elements=1 << 20,
                 column_chunk=256, pool=None, stats=None):
        n_samples, n_features = X.shape
        self.X, self.n_centers, self.n_samples = X, n_centers, n_samples
        self.n_candidates = min(n_candidates, n_samples)
        self.chunk_elements, self.column_chunk, self.pool = chunk_elements, column_chunk, pool
        self.stats = {} if stats is None else stats
        dtype = X.dtype
        u = torch.finfo(dtype).eps / 2  # unit roundoff
        # A computed squared distance has relative error below (d + 8) u (subtract, square,
        # a d-term sum of non-negative terms in any order); the Gram form |x|^2 + |q|^2 -
        # 2 x.q has absolute error below kappa (|x| + |q|)^2 / 2 (norms, dot product in any
        # order or blocking, with or without FMA, and the sum); centring (x - c rounded)
        # moves a distance by at most 2 u (|x - c| + |q - c|). Each bound is used with a
        # factor 2 of slack (inflate, kappa), and thresholds are inflated by 8 u more.
        self.u = u
        self.kappa = 2.0 * (n_features + 6) * u
        self.inflate = 1.0 + 4.0 * (n_features + 8) * u
        self.rank = _spatial_rank(X)
        # min_sq[i] is the minimum squared distance of point i to centers 0..applied[i]-1:
        # an upper bound of its current value, exact when applied[i] == t; -1 once selected.
        self.min_sq = torch.full((n_samples,), math.inf, dtype=dtype)
        self.applied = torch.zeros(n_samples, dtype=torch.long)
        self.centers = torch.empty(n_centers, n_features, dtype=dtype)  # rows of X
        self.selected = torch.empty(n_centers, dtype=torch.long)
        self.local = threading.local()
        self.t = 0

    def count(self, key, value=1):
        self.stats[key] = self.stats.get(key, 0) + value

    def buffer(self, name, shape, dtype=None):
        """A reusable, per-thread work buffer."""
        buffers = self.local.__dict__.setdefault("buffers", {})
        numel = math.prod(shape)
        buf = buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = buffers[name] = torch.empty(numel, dtype=dtype or self.X.dtype)
        return buf[:numel].view(shape)

    def record(self, first, indices):
        """Store the centers selected as numbers first, first + 1, ... (indices)."""
        end = first + len(indices)
        idx = torch.tensor(indices, dtype=torch.long)
        self.selected[first:end] = idx
        self.min_sq[idx] = -1.0
        self.applied[idx] = self.n_centers  # never stale: a selected point stays at -1
        torch.index_select(self.X, 0, idx, out=self.centers[first:end])

    def apply(self, rows, points_c, sq, norms, skip, current, ids, q_c, q_sq, q_norm):
        """Apply the centers numbered ``ids`` to rows (global indices), in place on current.

        ``points_c``, ``sq``, ``norms`` and ``skip`` are the rows' centred coordinates,
        squared norms, norm bounds and the number of leading centers they have already seen
        (or None); ``q_c``, ``q_sq`` and ``q_norm`` the same for the centers. The Gram form
        screens every (row, center) pair; only pairs that can set a row's new minimum are
        computed with the reference arithmetic. Returns the number of pairs computed
        exactly.
        """
        n_rows, k = rows.numel(), ids.numel()
        approx = self.buffer("approx", (n_rows, k))
        torch.addmm(q_sq.unsqueeze(0), points_c, q_c.T, alpha=-2.0, out=approx)
        # With A = approx + |x|^2, the Gram form of the centred squared distance, and
        # s = kappa reach^2, e = 2u reach, the pair's computed distance lies in
        # [(sqrt(A - s) - e)^2 / inflate, (sqrt(A + s) + e)^2 * inflate].
        u, inflate = self.u, self.inflate
        reach = norms + float(q_norm.max())
        slack = reach.square().mul_(self.kappa)
        shift = reach.mul_(2.0 * u * (1.0 + 4.0 * u))
        row_min = torch.amin(approx, 1)
        best = row_min.add(sq).add_(slack).clamp_(min=0.0).sqrt_()
        best.add_(shift).square_().mul_(inflate)  # upper bound of the row's new minimum
        # A pair is computed exactly only if its lower bound is at most min(current, best),
        # i.e. if approx <= limit: no other pair can lower the point's minimum below what
        # current and the pairs kept give (the row's smallest approx is always kept).
        limit = torch.minimum(current, best).clamp_(min=0.0).mul_(inflate).sqrt_()
        limit.add_(shift).square_().add_(slack).mul_(1.0 + 8.0 * u).sub_(sq)
        live = (row_min <= limit).nonzero().squeeze(1)
        if live.numel() == 0:
            return 0
        if 2 * live.numel() > n_rows:  # most rows: no gather
            pair_rows, cols = (approx <= limit.unsqueeze(1)).nonzero(as_tuple=True)
        else:
            hits = approx.index_select(0, live) <= limit.index_select(0, live).unsqueeze(1)
            sub_rows, cols = hits.nonzero(as_tuple=True)
            pair_rows = live.index_select(0, sub_rows)
        centers = ids.index_select(0, cols)
        if skip is not None:  # centers a row has already seen cannot lower its minimum
            new_pair = centers >= skip.index_select(0, pair_rows)
            pair_rows, centers = pair_rows[new_pair], centers[new_pair]
        exact = _sq_dists(self.X.index_select(0, rows.index_select(0, pair_rows)),
                          self.centers.index_select(0, centers))
        current.scatter_reduce_(0, pair_rows, exact, "amin")
        return pair_rows.numel()

    def update(self, task):
        """Bring rows (a spatially compact batch) up to date with centers first..end-1.

        Coordinates are taken relative to the batch centroid, so norms (and the Gram-form
        error) stay small. The centers go nearest-first, by column chunks; centers that the
        triangle inequality shows to be too far for every row are skipped, and a row whose
        value falls below ``cut`` is dropped after a chunk (it cannot be a candidate: it
        stays stale, with its smaller value). Returns (rows brought up to date, pairs
        screened, pairs computed exactly, rows dropped, pairs pruned).
        """
        rows, first, end, cut = task
        n_rows = rows.numel()
        inflate = self.inflate
        points_c = self.X.index_select(0, rows)
        centroid = points_c.mean(0)
        points_c -= centroid  # x - c: rounding below u |x - c| per coordinate
        sq = torch.linalg.vecdot(points_c, points_c)
        norms = sq.sqrt().mul_(inflate)  # upper bounds of |x - c|
        q_c = self.centers[first:end] - centroid
        q_sq = torch.linalg.vecdot(q_c, q_c)
        q_norm = q_sq.sqrt().mul_(inflate)  # upper bounds of |q - c|
        current = self.min_sq.index_select(0, rows)
        seen = self.applied.index_select(0, rows)
        skip = seen if bool((seen > first).any()) else None
        ids = torch.arange(first, end)
        reach = None
        if end - first > self.column_chunk:
            # Nearest-first order, and a per-center lower bound of the computed distance to
            # any row: |x - q| >= |q - c| - |x - c| (triangle inequality).
            order = torch.argsort(q_sq)
            ids, q_c, q_sq, q_norm = (a.index_select(0, order) for a in (ids, q_c, q_sq, q_norm))
            lower = q_sq.sqrt().div_(inflate * inflate).sub_(float(norms.max()))
            reach = lower.clamp_(min=0.0).square_().div_(inflate)
        pairs = exact = pruned = 0
        for lo in range(0, ids.numel(), self.column_chunk):
            hi = lo + self.column_chunk
            chunk = (ids[lo:hi], q_c[lo:hi], q_sq[lo:hi], q_norm[lo:hi])
            if reach is not None:
                near = reach[lo:hi] < float(current.max())
                if not bool(near.all()):
                    if not bool(near.any()):
                        # This chunk and the rest (nearest-first) cannot lower any row.
                        pruned += rows.numel() * (ids.numel() - lo)
                        break
                    pruned += rows.numel() * int((~near).sum())
                    chunk = tuple(a[near] for a in chunk)
            exact += self.apply(rows, points_c, sq, norms, skip, current, *chunk)
            pairs += rows.numel() * chunk[0].numel()
            if hi < ids.numel():
                below = current < cut
                if bool(below.any()):
                    self.min_sq.index_copy_(0, rows[below], current[below])
                    keep = (~below).nonzero().squeeze(1)
                    rows, points_c, sq, norms, current = (
                        a.index_select(0, keep) for a in (rows, points_c, sq, norms, current))
                    if skip is not None:
                        skip = skip.index_select(0, keep)
                    if rows.numel() == 0:
                        break
        self.min_sq.index_copy_(0, rows, current)
        return rows, pairs, exact, n_rows - rows.numel(), pruned

    def refresh(self, rows, cut):
        """Bring stale rows (ascending) up to date, or below ``cut``.

        Rows are grouped by the first center they lack (rows whose first missing centers
        are close share a group, with at most a quarter more centers than they need; the
        pairs they have seen are skipped), then split into tasks of about chunk_elements
        (row, center) pairs per column chunk. A row whose value drops below ``cut`` needs no
        more centers for now: it cannot be a candidate.
        """
        t = self.t
        behind = self.applied.index_select(0, rows)
        starts = []
        for first in torch.unique(behind).tolist():
            if not starts or first - starts[-1] > max(16, (t - first) // 4):
                starts.append(first)
        if len(starts) == 1:
            groups = [(rows, starts[0])]
        else:
            group = torch.bucketize(behind, torch.tensor(starts), right=True) - 1
            groups = [(rows[group == g], first) for g, first in enumerate(starts)]
        tasks = []
        for group_rows, first in groups:
            group_rows = group_rows[torch.argsort(self.rank.index_select(0, group_rows))]
            window = self.chunk_elements // min(t - first, self.column_chunk)
            window = min(max(64, window), 8192)  # bounded memory per task
            for lo in range(0, group_rows.numel(), window):
                tasks.append((group_rows[lo : lo + window], first, t, cut))
        if self.pool is None or len(tasks) < 2:
            done = [self.update(task) for task in tasks]
        else:
            done = list(self.pool.map(self.update, tasks))
        self.count("refreshed rows", rows.numel())
        self.count("pairs", sum(d[1] for d in done))
        self.count("exact", sum(d[2] for d in done))
        self.count("dropped early", sum(d[3] for d in done))
        self.count("pruned", sum(d[4] for d in done))
        if done:
            self.applied.index_fill_(0, torch.cat([d[0] for d in done]), t)

    def settle(self, k):
        """Make the k largest values exact and return them as a candidate set.

        Stale rows are refreshed, largest (stale) values first, in growing batches, until
        no stale row can reach the k-th largest exact value. Returns (cand, cut, cut_index):
        the candidates (ascending indices), the k-th largest value and the lowest index of
        a point outside the set whose value equals ``cut`` (n_samples if none). Every other
        point outside has a value below ``cut``; values only decrease.
        """
        self.count("settles")
        t, n_samples, min_sq = self.t, self.n_samples, self.min_sq
        grow = 2 * k
        while True:
            stale = self.applied < t
            n_stale = int(stale.sum())
            fresh = min_sq.masked_fill(stale, -math.inf)
            cut = _kth_largest(fresh, k) if n_samples - n_stale >= k else -math.inf
            if n_stale == 0:
                break
            stale_values = min_sq.masked_fill(~stale, -math.inf)
            if float(stale_values.max()) < cut:
                break
            level = cut if grow >= n_stale else max(cut, _kth_largest(stale_values, grow))
            self.refresh((stale & (min_sq >= level)).nonzero().squeeze(1), cut)
            grow *= 2
        above = (fresh > cut).nonzero().squeeze(1)
        at = (fresh == cut).nonzero().squeeze(1)
        need = k - above.numel()
        cand = torch.cat([above, at[:need]]).sort().values
        cut_index = int(at[need]) if need < at.numel() else n_samples
        return cand, cut, cut_index

    def phase(self, bar):
        """Select centers from a candidate set while it provably holds the farthest point."""
        cand, cut, cut_index = self.settle(self.n_candidates)
        points = self.X.index_select(0, cand)
        values = self.min_sq.index_select(0, cand)
        first = upto = self.t  # the candidates' values include centers 0..upto-1
        chosen = []

        def write_back():
            self.min_sq.index_copy_(0, cand, values)
            self.applied.index_copy_(0, cand, torch.where(values < 0, self.n_centers, upto))

        while values.numel():
            j = int(torch.argmax(values))
            top = float(values[j])
            i = int(cand[j])
            if top < cut or (top == cut and i > cut_index):
                break  # a point outside the candidates may now be the farthest
            chosen.append(i)
            self.t += 1
            values[j] = -1.0
            bar.update()
            if self.t == self.n_centers:
                break
            m = values.numel()
            dists = _sq_dists(points, points[j], out=self.buffer("dists", (m,)),
                              work=self.buffer("diff", (m, points.shape[1])))
            torch.minimum(values, dists, out=values)
            upto = self.t
            if len(chosen) % 16 == 0:
                # Candidates below the cut cannot be selected in this phase: drop them.
                keep = (values >= cut).nonzero().squeeze(1)
                if 2 * keep.numel() <= m:
                    write_back()
                    cand, points, values = cand[keep], points[keep], values[keep]
        write_back()
        if chosen:
            self.record(first, chosen)

    def run(self, start_index, verbose=False, return_radius=True):
        self.record(0, [start_index])
        self.t = 1
        with progress(self.n_centers, "k-center", unit="center", disable=not verbose) as bar:
            bar.update()
            while self.t < self.n_centers:
                self.phase(bar)
        radius = None
        if return_radius:
            cand, _, _ = self.settle(1)
            radius = _radius(self.min_sq[cand[0]])
        return self.selected.numpy(), radius


def _greedy_batched(X, n_centers, start_index, *, n_threads=None, verbose=False,
                    return_radius=True, **options):
    """Run :class:`_LazyGreedy` with n_threads worker threads (default: torch's setting)."""
    with _cpu_settings() as default_threads:
        n_threads = default_threads if n_threads is None else n_threads
        with contextlib.ExitStack() as stack:
            pool = None
            if n_threads > 1:
                pool = stack.enter_context(ThreadPoolExecutor(n_threads, "kcenter"))
            state = _LazyGreedy(X, n_centers, pool=pool, **options)
            return state.run(start_index, verbose=verbose, return_radius=return_radius)


def greedy_kcenter(X, n_centers, *, start_index=0, return_radius=True, verbose=False):
    """Exact greedy k-center (farthest-point) selection, fast.

    Selects the same points, in the same order, as :func:`greedy_kcenter_reference`: start
    from ``start_index`` and repeatedly add the point farthest from the points selected so
    far. This is the coreset step of PatchCore (Roth et al., 2022), run on randomly projected
    patch features.

    Parameters
    ----------
    X : torch.Tensor or ndarray of shape (n_samples, n_features)
        Points, usually patch features randomly projected to ~128 dimensions, on CPU or a
        CUDA device. float32 and float64 are used as they are; other dtypes are converted to
        float32.
    n_centers : int
        Number of points to select; values above ``n_samples`` are clipped to it (every point
        is then selected and the radius is 0).
    start_index : int, default=0
        The first selected point.
    return_radius : bool, default=True
        Also return the covering radius. Computing it applies the last center to the
        points that could hold the maximum, which costs a little on CPU.
    verbose : bool, default=False
        Show a progress bar over the selected centers.

    Returns
    -------
    indices : ndarray of shape (min(n_centers, n_samples),), dtype int64
        Selected rows of ``X`` in selection order; ``indices[0] == start_index``.
    radius : float
        Covering radius after the selection, ``max_i min_{j in indices} ||X[i] - X[j]||``.
        Only returned when ``return_radius=True``.

    Raises
    ------
    ValueError
        If ``X`` is not 2-D, is empty or holds NaN or infinity, if ``n_centers < 1`` or if
        ``start_index`` is not a row of ``X``.

    See Also
    --------
    greedy_kcenter_reference : The plain algorithm, which defines the selection.

    Notes
    -----
    **Rule.** Distances are compared squared, in the dtype of ``X``, computed as
    ``sum((x - s) ** 2)``; ties go to the lowest index; selected points count as -1, so once
    all remaining distances are 0 (duplicates) the lowest-index unselected points follow. See
    the module docstring.

    **CPU algorithm.** Each point ``i`` keeps ``m_i``, its minimum distance to the centers
    applied to it so far, an upper bound of its true value ``v_i`` (values only decrease).
    The selection runs in phases:

    1. *Settle.* Points are brought up to date, largest ``m_i`` first, in growing batches,
       until the ``K`` largest true values (``K = 2048``) are known exactly and every other
       point provably lies below the ``K``-th, the cut. Points that fall below the cut while
       being updated are left behind (their ``m_i`` is already small enough).
    2. *Candidate phase.* The next center is the first maximum of the ``K`` candidates, as
       long as that maximum beats the cut (non-candidates are below it and only decrease;
       equality is settled by index). After each selection only the candidates are
       updated, with the reference arithmetic. When the candidates' maximum falls below
       the cut, a new phase starts. A phase typically selects hundreds of centers.

    Bringing a batch of points up to date with the centers selected since they were last
    updated is where the time goes; it is done as matrix products:

    - *Gram filter.* ``|x|^2 + |q|^2 - 2 x.q`` is computed for all (point, center) pairs as
      one matrix product, in coordinates relative to the batch centroid (so norms, and the
      error bound, stay small). Only pairs whose
      rigorous lower bound is at most both the point's current value and the upper bound
      of the row's smallest pair are recomputed with the reference arithmetic
      :func:`_sq_dists` (typically one per improved point); every minimum is therefore
      bit-identical to the reference's.
    - *Order and pruning.* Batches are spatially compact (points sorted along a balanced
      principal-axis tree); centers are taken nearest-first to the batch centroid, in chunks
      of 256; centers farther than ``R + sqrt(max m_i)`` from the centroid (``R`` the batch
      radius) cannot change any point of the batch and are skipped (triangle inequality),
      and a point is dropped from the batch as soon as it falls below the cut.

    **Why it is exact.** A point's ``m_i`` always bounds its true value from above and equals
    it once all selected centers are applied; a selection is made only among exact values
    and only when no other point can reach them; pruned pairs provably cannot lower a
    minimum. The bounds account for floating point: a computed squared distance has relative
    error below ``(d + 8) u`` (``u`` the unit roundoff: subtract, square and a ``d``-term sum
    of non-negative terms in any order), the Gram form absolute error below
    ``(d + 6) u (|x| + |q|)^2`` (norms, dot product in any order or blocking, with or without
    FMA, and their sum), and centring moves a distance by at most ``2 u (|x| + |q|)``; each
    bound is used with a factor 2 of slack and thresholds are inflated by 8 ``u``. The Gram
    bound assumes IEEE float32 matrix products: a reduced-precision oneDNN setting
    (``torch.backends.mkldnn.matmul.fp32_precision``) is lifted during the call.

    **Cost.** Setup O(n d log n) (the ordering tree, on 32 principal components); extra
    memory below one copy of ``X`` (O(n) vectors, the selected rows and per-batch buffers),
    never an ``n x n`` matrix. The pair count is at worst the reference's n_centers x n (no pruning,
    e.g. uniform noise in high dimension), but screened by matrix products, at a few
    nanoseconds per pair instead of a pass over ``X`` per center; on clustered or
    low-dimensional data far fewer pairs are screened.

    **Threads.** The batches run on a pool of ``torch.get_num_threads()`` Python threads
    (PyTorch releases the GIL in its kernels) while the intra-op thread count is set to 1
    for the duration of the call, then restored: many small parallel regions would stall
    on a busy machine, a task pool does not.

    **CUDA.** On a GPU the plain algorithm is already cheap per step, so the same operations
    as the reference run without host synchronisation; the selection is the reference's by
    construction.

    References
    ----------
    K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox, P. Gehler, "Towards Total Recall
    in Industrial Anomaly Detection", CVPR 2022.

    T. F. Gonzalez, "Clustering to minimize the maximum intercluster distance", Theoretical
    Computer Science 38, 1985.

    Examples
    --------
    >>> import torch
    >>> from skpatchcore._kcenter import greedy_kcenter
    >>> X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
    >>> indices, radius = greedy_kcenter(X, 2)
    >>> indices.tolist(), radius
    ([0, 2], 5.0)
    """
    X, n_centers, start_index = _check_inputs(X, n_centers, start_index)
    if X.device.type != "cpu":
        indices, radius = _greedy_dense(X, n_centers, start_index, verbose=verbose)
    else:
        indices, radius = _greedy_batched(X, n_centers, start_index, verbose=verbose,
                                          return_radius=return_radius)
    return (indices, radius) if return_radius else indices
