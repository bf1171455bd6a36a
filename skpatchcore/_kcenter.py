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
def _restore_num_threads():
    """Restore torch's intra-op thread count on exit."""
    n_threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def _kth_largest(values, k):
    """The k-th largest entry of a 1-D tensor, as a float."""
    if 8 * k <= values.numel():
        return float(torch.topk(values, k, sorted=False).values.min())
    return float(torch.kthvalue(values, values.numel() - k + 1).values)


def _greedy_batched(X, n_centers, start_index, *, n_candidates=2048, chunk_elements=1 << 20,
                    verbose=False, return_radius=True, stats=None):
    """Exact greedy k-center with batched, lazily applied distance updates (CPU algorithm).

    See :func:`greedy_kcenter`, Notes, for the algorithm and why it is exact. ``stats``, a
    dict or None, collects counters (pairs screened, pairs computed exactly, ...).
    """
    n_samples, n_features = X.shape
    dtype = X.dtype
    u = torch.finfo(dtype).eps / 2  # unit roundoff
    # A computed squared distance has relative error below gamma (subtract, square, d-term
    # sum); the Gram form |x|^2 + |q|^2 - 2 x.q has absolute error below kappa (|x| + |q|)^2;
    # centring moves a distance by at most 2 u (|x| + |q|). All with a factor 2 of slack.
    gamma = 2.0 * (n_features + 8) * u
    kappa = 2.0 * (n_features + 6) * u
    inflate = 1.0 + 2.0 * gamma
    shift_factor = 2.0 * u * (1.0 + 4.0 * u)
    neg_inf = -math.inf
    counts = {} if stats is None else stats

    def count(key, value=1):
        counts[key] = counts.get(key, 0) + value

    Xc = X - X.mean(0)  # centred copy: small norms keep the Gram-form error small
    sq_norm = torch.linalg.vecdot(Xc, Xc)
    norm_up = sq_norm.sqrt().mul_(inflate)  # upper bounds of |x - mean|

    # min_sq[i] is the minimum squared distance of point i to centers 0 .. applied[i] - 1:
    # an upper bound of its current value, exact when applied[i] == t; -1 once selected.
    min_sq = torch.full((n_samples,), math.inf, dtype=dtype)
    applied = torch.zeros(n_samples, dtype=torch.long)
    centers = torch.empty(n_centers, n_features, dtype=dtype)  # X rows, for exact distances
    centers_c = torch.empty(n_centers, n_features, dtype=dtype)  # centred, for the Gram form
    centers_sq = torch.empty(n_centers, dtype=dtype)
    centers_norm = torch.empty(n_centers, dtype=dtype)
    selected = torch.empty(n_centers, dtype=torch.long)
    member = torch.zeros(n_samples, dtype=torch.bool)
    buffers = {}

    def buffer(name, shape, dtype=dtype):
        numel = math.prod(shape)
        buf = buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = buffers[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)

    def select(i, t):
        selected[t] = i
        min_sq[i] = -1.0
        applied[i] = n_centers  # never stale: a selected point stays at -1
        centers[t] = X[i]
        centers_c[t] = Xc[i]
        centers_sq[t] = sq_norm[i]
        centers_norm[t] = norm_up[i]

    def update(lo, hi, idx, first, t, mask=None):
        """Apply centers first .. t - 1 to rows lo .. hi - 1 (only those in mask if given),
        or to the rows idx."""
        k = t - first
        if idx is None:
            n_rows = hi - lo
            points_c, current, sq, reach = Xc[lo:hi], min_sq[lo:hi], sq_norm[lo:hi], norm_up[lo:hi]
        else:
            n_rows = idx.numel()
            points_c = Xc.index_select(0, idx)
            current = min_sq.index_select(0, idx)
            sq = sq_norm.index_select(0, idx)
            reach = norm_up.index_select(0, idx)
        approx = buffer("approx", (n_rows, k))
        torch.addmm(centers_sq[first:t].unsqueeze(0), points_c, centers_c[first:t].T,
                    alpha=-2.0, out=approx)
        # With A = approx + |x|^2, the Gram form of the centred squared distance, and
        # s = kappa reach^2, e = 2u reach, the computed distance of the pair lies in
        # [(sqrt(A - s) - e)^2 / inflate, (sqrt(A + s) + e)^2 * inflate].
        reach = reach + float(centers_norm[first:t].max())
        slack = reach.square().mul_(kappa)
        shift = reach.mul_(shift_factor)
        row_min = torch.amin(approx, 1)
        best = row_min.add(sq).add_(slack).clamp_(min=0.0).sqrt_()
        best.add_(shift).square_().mul_(inflate)  # upper bound of the row's new minimum
        # A pair is evaluated only if its lower bound is below min(current, best), i.e. if
        # approx < limit; the other pairs cannot lower the point's minimum.
        limit = torch.minimum(current, best).clamp_(min=0.0).mul_(inflate).sqrt_()
        limit.add_(shift).square_().add_(slack).mul_(1.0 + 8.0 * u).sub_(sq)
        if mask is not None:
            limit.masked_fill_(~mask, neg_inf)
        live = (row_min < limit).nonzero().squeeze(1)
        count("pairs", n_rows * k)
        if live.numel() == 0:
            return
        sub_rows, cols = (approx.index_select(0, live) < limit.index_select(0, live).unsqueeze(1)
                          ).nonzero(as_tuple=True)
        rows = live.index_select(0, sub_rows)
        orig = rows + lo if idx is None else idx.index_select(0, rows)
        # Centers a row has already seen cannot lower its minimum: skip those pairs.
        new_pair = (cols + first) >= applied.index_select(0, orig)
        if not bool(new_pair.all()):
            rows, cols, orig = rows[new_pair], cols[new_pair], orig[new_pair]
        count("exact", rows.numel())
        exact = _sq_dists(X.index_select(0, orig), centers[first:t].index_select(0, cols))
        current.scatter_reduce_(0, rows, exact, "amin")
        if idx is not None:
            min_sq.index_copy_(0, idx, current)

    def apply_pending(rows, first, t):
        """Apply centers first .. t - 1 to the given rows (ascending indices).

        Rows go in windows of consecutive indices: a window where at least a quarter of the
        rows need the update is processed in place (the other rows masked out); the
        scattered rest is gathered.
        """
        window = max(64, chunk_elements // (t - first))
        member[rows] = True
        per_window = torch.bincount(rows // window).tolist()
        scattered = []
        for w, n_in in enumerate(per_window):
            if n_in == 0:
                continue
            lo, hi = w * window, min(n_samples, (w + 1) * window)
            if 4 * n_in >= hi - lo:
                count("dense windows")
                update(lo, hi, None, first, t, None if n_in == hi - lo else member[lo:hi])
            else:
                scattered.append(w)
        if scattered:
            rest = rows[torch.isin(rows // window, torch.tensor(scattered))]
            count("gathered rows", rest.numel())
            for lo in range(0, rest.numel(), window):
                update(0, 0, rest[lo : lo + window], first, t)
        member[rows] = False
        applied.index_fill_(0, rows, t)

    def refresh(rows, t):
        """Bring stale rows up to date, grouped by the first center they lack.

        Rows whose first missing centers are close are merged into one group (at most a
        quarter more centers than they need, whose pairs are then skipped).
        """
        behind = applied.index_select(0, rows)
        firsts = torch.unique(behind).tolist()
        starts = []
        for first in firsts:
            if not starts or first - starts[-1] > max(16, (t - first) // 4):
                starts.append(first)
        if len(starts) == 1:
            apply_pending(rows, starts[0], t)
            return
        group = torch.bucketize(behind, torch.tensor(starts), right=True) - 1
        for g, first in enumerate(starts):
            apply_pending(rows[group == g], first, t)

    def settle(k, t):
        """Make the k largest values exact and return them as the candidate set.

        Stale rows are refreshed, largest (stale) values first, in growing batches, until
        no stale row can reach the k-th largest exact value. Returns (cand, cut, cut_index):
        the candidates (ascending indices), the k-th largest value and the lowest index of
        a point outside the set whose value equals ``cut`` (n_samples if none). Every
        other point has a value below ``cut``, which stays true as values only decrease.
        """
        count("settles")
        grow = 2 * k
        while True:
            stale = applied < t
            n_stale = int(stale.sum())
            fresh_vals = min_sq.masked_fill(stale, neg_inf)
            cut = _kth_largest(fresh_vals, k) if n_samples - n_stale >= k else neg_inf
            if n_stale == 0:
                break
            stale_vals = min_sq.masked_fill(~stale, neg_inf)
            if float(stale_vals.max()) < cut:
                break
            level = cut if grow >= n_stale else max(cut, _kth_largest(stale_vals, grow))
            refresh((stale & (min_sq >= level)).nonzero().squeeze(1), t)
            grow *= 2
        above = (fresh_vals > cut).nonzero().squeeze(1)
        at = (fresh_vals == cut).nonzero().squeeze(1)
        need = k - above.numel()
        cand = torch.cat([above, at[:need]]).sort().values
        cut_index = int(at[need]) if need < at.numel() else n_samples
        return cand, cut, cut_index

    select(start_index, 0)
    t = 1
    n_threads = torch.get_num_threads()
    with (progress(n_centers, "k-center", unit="center", disable=not verbose) as bar,
          _restore_num_threads()):
        bar.update()
        while t < n_centers:
            # Candidate phase: the farthest point is among the candidates as long as their
            # largest value beats every other point's (upper-bounded) value, so only the
            # candidates need updating after each selection.
            torch.set_num_threads(n_threads)
            cand, cut, cut_index = settle(min(n_candidates, n_samples), t)
            # The per-step updates below are small: one thread avoids fork-join overhead
            # (and, on a busy machine, waiting for a second core).
            torch.set_num_threads(1)
            points = X.index_select(0, cand)
            values = min_sq.index_select(0, cand)
            upto = t  # the candidates' values include centers 0 .. upto - 1
            steps = 0
            while values.numel():
                j = int(torch.argmax(values))
                top = float(values[j])
                i = int(cand[j])
                if top < cut or (top == cut and i > cut_index):
                    break  # a point outside the candidates may now be the farthest
                select(i, t)
                values[j] = -1.0
                t += 1
                bar.update()
                if t == n_centers:
                    break
                m = values.numel()
                dists = _sq_dists(points, points[j], out=buffer("dists", (m,)),
                                  work=buffer("diff", (m, n_features)))
                torch.minimum(values, dists, out=values)
                upto = t
                steps += 1
                if steps % 16 == 0:
                    # Points below the cut cannot be selected in this phase: drop them.
                    keep = (values >= cut).nonzero().squeeze(1)
                    if 2 * keep.numel() <= m:
                        min_sq.index_copy_(0, cand, values)
                        applied.index_copy_(0, cand, torch.where(values < 0, n_centers, upto))
                        cand, points, values = cand[keep], points[keep], values[keep]
            min_sq.index_copy_(0, cand, values)
            applied.index_copy_(0, cand, torch.where(values < 0, n_centers, upto))
    radius = None
    if return_radius:
        cand, _, _ = settle(1, n_centers)
        radius = _radius(min_sq[cand[0]])
    return selected.numpy(), radius


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
        previous = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")
            indices, radius = _greedy_batched(X, n_centers, start_index, verbose=verbose,
                                              return_radius=return_radius)
        finally:
            torch.set_float32_matmul_precision(previous)
    return (indices, radius) if return_radius else indices
