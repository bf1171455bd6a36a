"""Exact greedy k-center (farthest-point) selection, the coreset kernel of PatchCore.

Two public functions:

- :func:`greedy_kcenter_reference` is the plain greedy of the public PatchCore
  implementations (one distance update over all points per selected center). It is the
  semantic definition and the benchmark baseline.
- :func:`greedy_kcenter` selects exactly the same points, much faster on CPU, by lazy
  evaluation over blocks of points with rigorous floating-point pruning bounds.

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
    if not bool(torch.isfinite(X).all()):
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
    pool : concurrent.futures.Executor or None
        Runs the blocks of a batched update in parallel; None runs them in order.
    stats : dict or None
        Receives counters: settles, pairs (screened by the Gram form), exact (pairs given
        the reference arithmetic), dense windows and gathered rows.
    """

    def __init__(self, X, n_centers, *, n_candidates=2048, chunk_elements=1 << 20, pool=None,
                 stats=None):
        n_samples, n_features = X.shape
        self.X, self.n_centers, self.n_samples = X, n_centers, n_samples
        self.n_candidates = min(n_candidates, n_samples)
        self.chunk_elements, self.pool = chunk_elements, pool
        self.stats = {} if stats is None else stats
        dtype = X.dtype
        u = torch.finfo(dtype).eps / 2  # unit roundoff
        # A computed squared distance has relative error below gamma / 2 (subtract, square,
        # a d-term sum of non-negative terms in any order); the Gram form |x|^2 + |q|^2 -
        # 2 x.q has absolute error below kappa (|x| + |q|)^2 / 2 (norms, dot product in any
        # order or blocking, with or without FMA, and the sum); centring moves a distance by
        # at most 2 u (|x| + |q|). Each is used with a factor 2 of slack, and the threshold
        # arithmetic is inflated by 8 u more.
        self.u = u
        self.kappa = 2.0 * (n_features + 6) * u
        self.inflate = 1.0 + 4.0 * (n_features + 8) * u
        self.Xc = X - X.mean(0)  # centred copy: small norms keep the Gram-form error small
        self.sq_norm = torch.linalg.vecdot(self.Xc, self.Xc)
        self.norm_up = self.sq_norm.sqrt().mul_(self.inflate)  # upper bounds of |x - mean|
        # min_sq[i] is the minimum squared distance of point i to centers 0..applied[i]-1:
        # an upper bound of its current value, exact when applied[i] == t; -1 once selected.
        self.min_sq = torch.full((n_samples,), math.inf, dtype=dtype)
        self.applied = torch.zeros(n_samples, dtype=torch.long)
        self.centers = torch.empty(n_centers, n_features, dtype=dtype)  # rows of X
        self.centers_c = torch.empty(n_centers, n_features, dtype=dtype)  # centred rows
        self.centers_sq = torch.empty(n_centers, dtype=dtype)
        self.centers_norm = torch.empty(n_centers, dtype=dtype)
        self.selected = torch.empty(n_centers, dtype=torch.long)
        self.member = torch.zeros(n_samples, dtype=torch.bool)
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

    def select(self, i):
        t = self.t
        self.selected[t] = i
        self.min_sq[i] = -1.0
        self.applied[i] = self.n_centers  # never stale: a selected point stays at -1
        self.centers[t] = self.X[i]
        self.centers_c[t] = self.Xc[i]
        self.centers_sq[t] = self.sq_norm[i]
        self.centers_norm[t] = self.norm_up[i]
        self.t = t + 1

    def update(self, task):
        """Apply centers first..end-1 to rows lo..hi-1 (those in mask if given) or to rows
        idx. Returns the number of pairs screened and of pairs computed exactly."""
        lo, hi, idx, first, end, mask = task
        k = end - first
        if idx is None:
            n_rows = hi - lo
            points_c, current = self.Xc[lo:hi], self.min_sq[lo:hi]
            sq, reach = self.sq_norm[lo:hi], self.norm_up[lo:hi]
        else:
            n_rows = idx.numel()
            points_c = self.Xc.index_select(0, idx)
            current = self.min_sq.index_select(0, idx)
            sq, reach = self.sq_norm.index_select(0, idx), self.norm_up.index_select(0, idx)
        approx = self.buffer("approx", (n_rows, k))
        torch.addmm(self.centers_sq[first:end].unsqueeze(0), points_c,
                    self.centers_c[first:end].T, alpha=-2.0, out=approx)
        # With A = approx + |x|^2, the Gram form of the centred squared distance, and
        # s = kappa reach^2, e = 2u reach, the pair's computed distance lies in
        # [(sqrt(A - s) - e)^2 / inflate, (sqrt(A + s) + e)^2 * inflate].
        u, inflate = self.u, self.inflate
        reach = reach + float(self.centers_norm[first:end].max())
        slack = reach.square().mul_(self.kappa)
        shift = reach.mul_(2.0 * u * (1.0 + 4.0 * u))
        row_min = torch.amin(approx, 1)
        best = row_min.add(sq).add_(slack).clamp_(min=0.0).sqrt_()
        best.add_(shift).square_().mul_(inflate)  # upper bound of the row's new minimum
        # A pair is computed exactly only if its lower bound is below min(current, best),
        # i.e. if approx < limit; no other pair can lower the point's minimum.
        limit = torch.minimum(current, best).clamp_(min=0.0).mul_(inflate).sqrt_()
        limit.add_(shift).square_().add_(slack).mul_(1.0 + 8.0 * u).sub_(sq)
        if mask is not None:
            limit.masked_fill_(~mask, -math.inf)
        live = (row_min < limit).nonzero().squeeze(1)
        if live.numel() == 0:
            return n_rows * k, 0
        hits = approx.index_select(0, live) < limit.index_select(0, live).unsqueeze(1)
        sub_rows, cols = hits.nonzero(as_tuple=True)
        rows = live.index_select(0, sub_rows)
        orig = rows + lo if idx is None else idx.index_select(0, rows)
        # Centers a row has already seen cannot lower its minimum: skip those pairs.
        new_pair = (cols + first) >= self.applied.index_select(0, orig)
        if not bool(new_pair.all()):
            rows, cols, orig = rows[new_pair], cols[new_pair], orig[new_pair]
        exact = _sq_dists(self.X.index_select(0, orig),
                          self.centers[first:end].index_select(0, cols))
        current.scatter_reduce_(0, rows, exact, "amin")
        if idx is not None:
            self.min_sq.index_copy_(0, idx, current)
        return n_rows * k, rows.numel()

    def plan(self, rows, first, tasks):
        """Split the update of rows (ascending) by centers first..t-1 into tasks.

        Rows go in windows of consecutive indices: a window where at least a quarter of the
        rows need the update is done in place (its other rows masked out), the scattered
        rest is gathered.
        """
        end = self.t
        window = max(64, self.chunk_elements // (end - first))
        self.member[rows] = True
        scattered = []
        for w, n_in in enumerate(torch.bincount(rows // window).tolist()):
            lo, hi = w * window, min(self.n_samples, (w + 1) * window)
            if 4 * n_in >= hi - lo:
                mask = None if n_in == hi - lo else self.member[lo:hi].clone()
                tasks.append((lo, hi, None, first, end, mask))
                self.count("dense windows")
            elif n_in:
                scattered.append(w)
        self.member[rows] = False
        if scattered:
            rest = rows[torch.isin(rows // window, torch.tensor(scattered))]
            self.count("gathered rows", rest.numel())
            for lo in range(0, rest.numel(), window):
                tasks.append((0, 0, rest[lo : lo + window], first, end, None))

    def refresh(self, rows):
        """Bring stale rows up to date, grouped by the first center they lack.

        Rows whose first missing centers are close are merged into one group (at most a
        quarter more centers than they need; the pairs they have seen are skipped).
        """
        t = self.t
        behind = self.applied.index_select(0, rows)
        starts = []
        for first in torch.unique(behind).tolist():
            if not starts or first - starts[-1] > max(16, (t - first) // 4):
                starts.append(first)
        tasks = []
        if len(starts) == 1:
            self.plan(rows, starts[0], tasks)
        else:
            group = torch.bucketize(behind, torch.tensor(starts), right=True) - 1
            for g, first in enumerate(starts):
                self.plan(rows[group == g], first, tasks)
        if self.pool is None or len(tasks) < 2:
            done = [self.update(task) for task in tasks]
        else:
            done = list(self.pool.map(self.update, tasks))
        self.count("pairs", sum(p for p, _ in done))
        self.count("exact", sum(e for _, e in done))
        self.applied.index_fill_(0, rows, t)

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
            self.refresh((stale & (min_sq >= level)).nonzero().squeeze(1))
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
        upto = self.t  # the candidates' values include centers 0..upto-1

        def write_back():
            self.min_sq.index_copy_(0, cand, values)
            self.applied.index_copy_(0, cand, torch.where(values < 0, self.n_centers, upto))

        steps = 0
        while values.numel():
            j = int(torch.argmax(values))
            top = float(values[j])
            i = int(cand[j])
            if top < cut or (top == cut and i > cut_index):
                break  # a point outside the candidates may now be the farthest
            self.select(i)
            values[j] = -1.0
            bar.update()
            if self.t == self.n_centers:
                break
            m = values.numel()
            dists = _sq_dists(points, points[j], out=self.buffer("dists", (m,)),
                              work=self.buffer("diff", (m, points.shape[1])))
            torch.minimum(values, dists, out=values)
            upto = self.t
            steps += 1
            if steps % 16 == 0:
                # Candidates below the cut cannot be selected in this phase: drop them.
                keep = (values >= cut).nonzero().squeeze(1)
                if 2 * keep.numel() <= m:
                    write_back()
                    cand, points, values = cand[keep], points[keep], values[keep]
        write_back()

    def run(self, start_index, verbose=False, return_radius=True):
        self.select(start_index)
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

    **CPU algorithm: lazy greedy over blocks.** The points are split into blocks of ~200
    spatially close points (a balanced principal-direction tree), stored contiguously. Each
    block ``b`` keeps an upper bound ``U_b`` of the largest minimum distance of its points
    and remembers which selected centers have already been applied to it. Each step takes
    the block with the largest ``U_b``. If centers are pending for it, they are applied
    (which can only lower its values) and ``U_b`` becomes exact; otherwise ``U_b`` is the
    exact maximum over all points, since every other block's true maximum is at most its
    bound, and the block's first maximum is the next center (on equal maxima, stale tied
    blocks are refreshed first and the lowest index wins, so ties follow the rule). Blocks
    whose values lie well below the covering radius are never touched again; a refresh
    applies all pending centers at once as a matrix product. Applying a center to a block:

    1. *Triangle inequality.* With block centre ``c`` and radius ``R``, no point of the
       block gets closer than ``|q - c| - R`` to center ``q``; if that bound is at least
       ``sqrt(U_b)``, the center changes nothing in the block and is skipped.
    2. *Gram filter.* For the remaining (point, center) pairs, ``|x|^2 + |q|^2 - 2 x.q`` is
       computed as one matrix product (on data centred by the mean, so norms stay small), and
       a pair is skipped when a rigorous lower bound of its distance is at least the point's
       current minimum.
    3. *Exact update.* The surviving pairs get the reference arithmetic :func:`_sq_dists`,
       and the minimum is taken.

    **Why it is exact.** Steps 1-2 only skip pairs whose computed distance provably cannot
    lower the current minimum, so every minimum is bit-identical to the reference's once its
    block is fresh, and a selection is made only from exact values. The bounds account for
    floating-point error: a computed squared distance has relative error below
    ``gamma = 2 (d + 8) u`` (``u`` the unit roundoff: subtract, square and a ``d``-term sum of
    non-negative terms, any order); the Gram form has absolute error below
    ``kappa (|x| + |q|)^2`` with ``kappa = 2 (d + 6) u`` (dot product, norms and their sum;
    valid for any summation order, FMA or blocking of the matrix product); centring costs at
    most ``2 u (|x| + |q|)`` in distance. Each bound is used with a factor 2 of slack and the
    threshold arithmetic is inflated by a few ``u``. (A matrix product run at reduced
    precision, e.g. TF32 via ``torch.set_float32_matmul_precision``, would void the Gram
    bound; the CPU path is what runs this code, where float32 matmuls are full precision
    unless ``torch.set_float32_matmul_precision`` lowers it - it is temporarily set to
    "highest" here.)

    **Cost.** Setup O(n d log n); the loop touches only the blocks that can hold the
    maximum, with memory O(n d) (about three copies of ``X``), never an ``n x n`` matrix.
    The worst case (no pruning, e.g. uniform noise in high dimension) is the reference's
    O(n_centers n d), done mostly as matrix products.

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
