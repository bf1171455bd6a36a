"""Nearest-neighbour search over a memory bank.

:class:`ExactIndex` finds the exact k nearest bank rows by chunked matrix products on all
cores (or the GPU). Distances are true Euclidean distances (not squared): candidates are found
by ranking ``|b|^2 - 2 q.b`` in float32 (``|q - b|^2`` less the row constant ``|q|^2``; no
squared distance is ever used as a distance, so none can come out negative), then the best
few candidates are re-measured as ``||q - b||`` in float64 and re-ranked, so returned
distances are exact to float64 rounding of the float32 inputs and a query equal to a bank row
gets exactly 0. Only candidates that a float32 rounding bound cannot rule out are
re-measured. The k + 4 candidates come from the float32 ranking, so a true neighbour can be
missed only when more than 4 other rows lie within float32 rounding of it (ranks equal to
about 1e-5 of ``|q| |b|``): near-duplicate rows, whose distances then differ by about as
much.

:class:`NNDescentIndex` is approximate: a pynndescent k-neighbour graph proposes candidates,
which are re-measured and re-ranked the same way, so its distances are exact for the rows it
returns, but a true nearest row can be missed (recall below 1).

Backend rule of :func:`make_index` (the ``knn_backend`` parameter of the detectors):

* ``'exact'``: :class:`ExactIndex`.
* ``'pynndescent'``: :class:`NNDescentIndex` (CPU only; the exact fallback uses ``device``).
* ``'auto'``: exact on CUDA; on CPU, pynndescent when ``n_rows > AUTO_NNDESCENT_MIN_ROWS``
  (200 000) and exact otherwise.

Why a row count: exact search costs ``2 * n_rows * n_features`` flop per query and a graph
search about ``n_features`` times the (slowly growing) number of rows it visits, so the
speed-up of pynndescent grows with the number of rows, not with the dimension. Measured on
2 shared CPU cores with 152-d features: 2x at 10 000 rows, 12x at 128 000 rows (real
features) and 21x at 200 000 rows, with recall@1 of 0.996-0.998 on normal patches. Its
build (4 s at 10 000 rows, 75 s at 200 000, plus a one-off numba compilation of about 30 s
per process) is repaid at 200 000 rows after about 50 000 queries, i.e. by the
leave-one-out training scores alone (fitting queries every training patch, at least
``n_rows`` queries); at 10 000 rows only after about 650 000. A missed neighbour makes a
distance too large, so exact search is kept wherever it is affordable: every default
PatchCore bank (~1e4-1e5 rows) is searched exactly. ``docs/benchmarks.md``,
"Nearest-neighbour search", has the measurements.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ._utils import progress

__all__ = ["AUTO_NNDESCENT_MIN_ROWS", "ExactIndex", "NNDescentIndex", "make_index"]

# Elements of one (queries x bank) distance block; 2**22 float32 = 16 MiB. Blocks this
# small stay in the CPU's caches between the matrix product and the top-k that reads it
# (benchmarks/bench_blocks.py: 26.0 against 34.9 ms per 1,600 queries with 128 MiB blocks,
# 2 threads; the same results, which do not depend on the block).
_BLOCK_ELEMENTS = 1 << 22
# Extra candidates re-measured in float64, which absorbs float32 rounding in near-ties.
_RERANK_EXTRA = 4
# knn_backend='auto' picks pynndescent on CPU for banks with more rows than this.
AUTO_NNDESCENT_MIN_ROWS = 200_000
_BACKENDS = ("auto", "exact", "pynndescent")
# Queries per pynndescent call, and candidate rows (queries x candidates) re-ranked at once.
_QUERY_BLOCK_ROWS = 16384
_CANDIDATE_ELEMENTS = 1 << 21


def _as_tensor(X, device):
    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device)


class ExactIndex:
    """Exact Euclidean k-nearest-neighbour search.

    Parameters
    ----------
    bank : array-like of shape (m, d)
        Memory-bank rows (float32).
    device : torch.device
        Where the bank lives and distances are computed.
    """

    def __init__(self, bank, device="cpu"):
        self.device = torch.device(device)
        self.bank = _as_tensor(bank, self.device)
        self.bank_sq = (self.bank.double() ** 2).sum(1).float()
        self.bank_norm = self.bank_sq.sqrt()
        # float32 rounding of |b|^2 - 2 q.b, whatever the summation order (Higham's
        # gamma_d for the d-term dot product, plus the rounding of the other operations):
        # |error| <= 2u |b|^2 + 2 (gamma_d + u) |q| |b|, u = 2^-24
        u = 2.0**-24
        d = self.bank.shape[1]
        self._err_sq, self._err_dot = 2 * u, 2 * (d * u / (1 - d * u) + u)

    def __len__(self):
        return self.bank.shape[0]

    def _remeasure(self, q, cand, cand_rank, k):
        """Float64 distances ``||q - b||`` of the candidates that can still be among the k
        nearest (inf for the others and for masked ones).

        A candidate whose float32 rank, less its rounding bound, exceeds the k-th smallest rank
        plus the largest bound is farther than k others for certain, so it is not re-measured;
        the result equals re-measuring every candidate."""
        bn = self.bank_norm[cand]
        err = self._err_sq * bn * bn + self._err_dot * torch.linalg.vector_norm(
            q, dim=1, keepdim=True) * bn
        kth = torch.kthvalue(cand_rank, k, dim=1, keepdim=True).values
        need = (cand_rank - err <= kth + err.max(dim=1, keepdim=True).values) & ~torch.isinf(
            cand_rank)
        rows, cols = need.nonzero(as_tuple=True)
        exact = torch.full(cand.shape, torch.inf, dtype=torch.float64, device=q.device)
        exact[rows, cols] = torch.linalg.vector_norm(
            self.bank[cand[rows, cols]].double() - q[rows].double(), dim=1)
        return exact

    def query(self, Q, k=1, *, query_groups=None, bank_groups=None, verbose=False,
              remeasure=True):
        """k nearest bank rows of each query row.

        Parameters
        ----------
        Q : array-like of shape (n, d)
        k : int
            Neighbours per query; at most the bank size.
        query_groups, bank_groups : array-like of int, optional
            When both are given, bank rows whose group equals the query's group are excluded
            (leave-one-out: an image's own patches are never its neighbours).
        verbose : bool, default=False
            Show a progress bar over the queries.
        remeasure : bool, default=True
            False skips the float64 re-measure: the k rows of smallest float32 rank are
            returned as proposals (not certified nearest), with NaN distances; k == 1 then
            takes a cheaper minimum instead of a top-k.

        Returns
        -------
        distances : ndarray of shape (n, k), float64
            Ascending true L2 distances (``inf`` where fewer than k rows were eligible).
        indices : ndarray of shape (n, k), int64
            Bank row indices (-1 where fewer than k rows were eligible).
        """
        Q = _as_tensor(Q, self.device)
        n, m = Q.shape[0], self.bank.shape[0]
        k = int(min(k, m))
        kc = min(k + _RERANK_EXTRA, m)
        masked = query_groups is not None and bank_groups is not None
        if masked:
            runs = _group_runs(np.asarray(query_groups), np.asarray(bank_groups))
            if runs is None:  # groups not in runs: mask by comparing them
                qg = torch.as_tensor(np.asarray(query_groups), device=self.device)
                bg = torch.as_tensor(np.asarray(bank_groups), device=self.device)
        dist = np.empty((n, k), dtype=np.float64)
        idx = np.empty((n, k), dtype=np.int64)
        rows = max(1, _BLOCK_ELEMENTS // max(m, 1))
        bar = progress(total=n, desc="search", unit="patch", disable=not verbose)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            q = Q[start:stop]
            # |b|^2 - 2 q.b ranks the bank rows of each query as |q - b|^2 does (|q|^2 is
            # the same along a row), so neither adding it nor clamping is needed to rank.
            rank = torch.addmm(self.bank_sq[None, :], q, self.bank.T, alpha=-2.0)
            if masked and runs is not None:  # queries sorted by group: mask block by block
                for lo, hi, own in runs(start, stop):
                    rank[lo - start : hi - start, own] = float("inf")
            elif masked:
                rank.masked_fill_(qg[start:stop, None] == bg[None, :], float("inf"))
            if not remeasure:
                if k == 1:
                    low, cand = rank.min(dim=1, keepdim=True)
                else:
                    low, cand = torch.topk(rank, k, dim=1, largest=False, sorted=True)
                idx[start:stop] = torch.where(torch.isinf(low), -1, cand).cpu().numpy()
                dist[start:stop] = np.nan
                bar.update(stop - start)
                continue
            cand_d2, cand = torch.topk(rank, kc, dim=1, largest=False, sorted=False)
            exact = self._remeasure(q, cand, cand_d2, k)
            order = torch.argsort(exact, dim=1, stable=True)[:, :k]
            best_d = torch.gather(exact, 1, order)
            best_i = torch.gather(cand, 1, order)
            best_i = torch.where(torch.isinf(best_d), -1, best_i)
            dist[start:stop] = best_d.cpu().numpy()
            idx[start:stop] = best_i.cpu().numpy()
            bar.update(stop - start)
        bar.close()
        return dist, idx


def _group_runs(query_groups, bank_groups):
    """For queries whose groups come in runs (each group's rows contiguous, as in the
    leave-one-out training scores), a function ``runs(start, stop)`` yielding ``(lo, hi,
    own)``: rows ``lo:hi`` of the queries share a group whose bank rows are ``own`` (a
    tensor of indices). None when the groups are not in runs (then a comparison masks)."""
    if len(query_groups) == 0:
        return None
    change = np.flatnonzero(query_groups[1:] != query_groups[:-1]) + 1
    starts = np.r_[0, change]
    stops = np.r_[change, len(query_groups)]
    if len(np.unique(query_groups[starts])) != len(starts):
        return None
    order = np.argsort(bank_groups, kind="stable")
    sorted_groups = bank_groups[order]

    def runs(start, stop):
        first = np.searchsorted(stops, start, side="right")
        for lo, hi in zip(starts[first:], stops[first:], strict=True):
            if lo >= stop:
                break
            g = query_groups[lo]
            left, right = np.searchsorted(sorted_groups, g, "left"), np.searchsorted(
                sorted_groups, g, "right")
            yield max(lo, start), min(hi, stop), torch.from_numpy(order[left:right])

    return runs


class NNDescentIndex:
    """Approximate Euclidean k-nearest-neighbour search with pynndescent.

    A pynndescent k-neighbour graph over the bank proposes candidates for each query; these
    are re-measured as ``||q - b||`` in float64 and sorted, so every returned distance is the
    true distance to the returned row, and only the choice of rows is approximate.

    Parameters
    ----------
    bank : array-like of shape (m, d)
        Memory-bank rows (float32).
    device : torch.device, default="cpu"
        Where the exact fallback (:class:`ExactIndex`) searches; the graph itself is on CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds the graph construction (random-projection trees and NN-descent).
    n_neighbors : int, default=60
        Degree of the k-neighbour graph; larger is more accurate and slower to build.
    epsilon : float, default=0.2
        Search breadth of :meth:`pynndescent.NNDescent.query` (0 to ~0.3): larger is more
        accurate and slower.
    search_tree_leaf_budget : int, default=32
        Search-tree leaves that seed each query. pynndescent's own defaults (30 neighbours,
        one leaf, ``epsilon=0.1``, k candidates, duplicate rows kept) found the true nearest
        row for 82% of synthetic and 31% of real patch features; these (60 neighbours, 32
        leaves, ``epsilon=0.2``, ``k + 4`` candidates, duplicates merged) for 99.8% and
        99.6%, at about ten times their query time (see ``docs/benchmarks.md``,
        "Nearest-neighbour search").
    group_margin : int, default=16
        With query and bank groups, ``k + 4 + group_margin`` candidates are requested and
        same-group ones dropped; queries left with fewer than ``k`` are searched again with
        four times as many candidates, and any still short exactly.
    n_jobs : int or None, default=None
        Threads for building and querying (numba); None uses numba's default, all cores.

    Notes
    -----
    The graph holds each distinct bank row once (identical rows, as in full banks of
    letterboxed images, otherwise trap the search); a returned row stands for all its copies.
    Banks with fewer than ``4 * n_neighbors`` distinct rows are searched exactly (a graph
    that small saves nothing). The first index built in a process compiles pynndescent's
    numba code, which takes tens of seconds.
    """

    def __init__(self, bank, device="cpu", random_state=None, *, n_neighbors=60, epsilon=0.2,
                 search_tree_leaf_budget=32, group_margin=16, n_jobs=None):
        try:
            import pynndescent
        except ImportError as exc:
            raise ImportError(
                "knn_backend='pynndescent' needs the pynndescent package: install it with "
                "`pip install pynndescent`, or use knn_backend='exact'."
            ) from exc
        self.device = torch.device(device)
        if isinstance(bank, torch.Tensor):
            bank = bank.detach().cpu().numpy()
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.epsilon = float(epsilon)
        self.group_margin = int(group_margin)
        self._exact = None
        self.graph = None
        # Identical rows (full banks: e.g. edge cells copied from inner ones) cut the graph
        # into zero-distance cliques that searches get stuck in; the graph holds each
        # distinct row once, and a node stands for all its copies (``_members``).
        self._nodes, self._members, self._offsets = _distinct_rows(self.bank)
        if self._nodes.size >= 4 * n_neighbors:
            self.graph = pynndescent.NNDescent(
                self.bank[self._nodes], metric="euclidean", n_neighbors=int(n_neighbors),
                random_state=random_state, n_jobs=n_jobs, parallel_batch_queries=True,
                search_tree_leaf_budget=int(search_tree_leaf_budget),
            )
            self.graph.prepare()

    def __len__(self):
        return self.bank.shape[0]

    def _exact_index(self):
        if self._exact is None:
            self._exact = ExactIndex(self.bank, self.device)
        return self._exact

    def query(self, Q, k=1, *, query_groups=None, bank_groups=None, verbose=False):
        """Approximate k nearest bank rows of each query row.

        Parameters
        ----------
        Q : array-like of shape (n, d)
        k : int
            Neighbours per query; at most the bank size.
        query_groups, bank_groups : array-like of int, optional
            When both are given, bank rows whose group equals the query's group are never
            returned (leave-one-out).
        verbose : bool, default=False
            Show a progress bar over the queries.

        Returns
        -------
        distances : ndarray of shape (n, k), float64
            Ascending true L2 distances to the returned rows (``inf`` where fewer than k
            rows were eligible).
        indices : ndarray of shape (n, k), int64
            Bank row indices (-1 where fewer than k rows were eligible).
        """
        masked = query_groups is not None and bank_groups is not None
        groups = {}
        if masked:
            groups = {"query_groups": query_groups, "bank_groups": bank_groups}
        if self.graph is None:
            return self._exact_index().query(Q, k, verbose=verbose, **groups)
        if isinstance(Q, torch.Tensor):
            Q = Q.detach().cpu().numpy()
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        n, m = Q.shape[0], self.bank.shape[0]
        k = int(min(k, m))
        qg = np.asarray(query_groups) if masked else None
        bg = np.asarray(bank_groups) if masked else None
        dist = np.full((n, k), np.inf)
        idx = np.full((n, k), -1, dtype=np.int64)
        todo = np.arange(n)
        n_nodes = self._nodes.size
        width = k + _RERANK_EXTRA
        widths = [width + self.group_margin, 4 * (width + self.group_margin)] if masked else [width]
        copies = k + self.group_margin if masked else k  # bank rows per node, at most
        if self._members is None:
            copies = 1
        else:
            copies = min(copies, int(np.diff(self._offsets).max()))
        bar = progress(total=n, desc="search", unit="patch", disable=not verbose)
        for width in widths:
            width = min(width, n_nodes)
            block = max(1, min(_QUERY_BLOCK_ROWS, _CANDIDATE_ELEMENTS // (width * copies)))
            short = []
            for start in range(0, todo.size, block):
                rows = todo[start : start + block]
                nodes, _ = self.graph.query(Q[rows], k=width, epsilon=self.epsilon)
                d, i = self._rerank(Q[rows], nodes.astype(np.int64), k, copies,
                                    None if qg is None else qg[rows], bg)
                dist[rows], idx[rows] = d, i
                missing = (i < 0).any(axis=1)
                short.append(rows[missing])
                bar.update(rows.size - int(missing.sum()))
            todo = np.concatenate(short)
            if todo.size == 0 or width == n_nodes:
                break
        if todo.size:  # too few eligible candidates: exact search for these rows
            sub = {} if not masked else {"query_groups": qg[todo], "bank_groups": bg}
            dist[todo], idx[todo] = self._exact_index().query(Q[todo], k, **sub)
            bar.update(todo.size)
        bar.close()
        return dist, idx

    def _rerank(self, Q, nodes, k, copies, query_groups, bank_groups):
        """Best k bank rows among graph candidates, by true float64 distance.

        ``nodes`` (n, w) are graph nodes (-1: none); each stands for up to ``copies`` bank
        rows (its identical copies). Same-group rows are dropped; missing ones are inf/-1.
        """
        n, width = nodes.shape
        valid = nodes >= 0
        rows_of = self._nodes[np.where(valid, nodes, 0)]
        dist = np.empty((n, width))
        step = max(1, (1 << 22) // max(1, width * Q.shape[1]))
        for start in range(0, n, step):
            diff = self.bank[rows_of[start : start + step]].astype(np.float64)
            diff -= Q[start : start + step, None, :].astype(np.float64)
            dist[start : start + step] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        dist[~valid] = np.inf
        if self._members is not None:  # expand each node to its copies, in row order
            first = self._offsets[np.where(valid, nodes, 0)]
            count = self._offsets[np.where(valid, nodes, 0) + 1] - first
            j = np.arange(copies)
            has = valid[:, :, None] & (j < count[:, :, None])
            at = np.minimum(first[:, :, None] + j, self._members.size - 1)
            rows_of = np.where(has, self._members[at], -1).reshape(n, -1)
            dist = np.where(has, dist[:, :, None], np.inf).reshape(n, -1)
        else:
            rows_of = np.where(valid, rows_of, -1)
        if query_groups is not None:
            same = bank_groups[np.maximum(rows_of, 0)] == query_groups[:, None]
            dist = np.where(same, np.inf, dist)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(dist, order, axis=1)
        best_i = np.where(np.isinf(best_d), -1, np.take_along_axis(rows_of, order, axis=1))
        if best_d.shape[1] < k:  # fewer candidates than k (tiny graphs)
            pad = ((0, 0), (0, k - best_d.shape[1]))
            best_d = np.pad(best_d, pad, constant_values=np.inf)
            best_i = np.pad(best_i, pad, constant_values=-1)
        return best_d, best_i


def _distinct_rows(bank):
    """Distinct rows of ``bank`` and where their copies are.

    Returns ``nodes`` (the first row of each distinct value, ascending) and, when some rows
    repeat, ``members``/``offsets``: ``members[offsets[j]:offsets[j + 1]]`` are all rows
    equal to ``bank[nodes[j]]``, ascending (``members`` is None when all rows are distinct).
    """
    m = bank.shape[0]
    if m == 0:
        return np.arange(0), None, None
    _, first, inverse, counts = np.unique(bank, axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    if first.size == m:
        return np.arange(m), None, None
    order = np.argsort(first, kind="stable")  # distinct values in order of first occurrence
    node_of_value = np.empty_like(order)
    node_of_value[order] = np.arange(order.size)
    node = node_of_value[inverse.reshape(-1)]
    members = np.argsort(node, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(counts[order])])
    return first[order], members, offsets


def _auto_backend(n_rows, device):
    """The backend knn_backend='auto' picks for a bank of ``n_rows`` rows on ``device``."""
    if torch.device(device).type != "cuda" and int(n_rows) > AUTO_NNDESCENT_MIN_ROWS:
        return "pynndescent"
    return "exact"


def make_index(bank, backend="auto", device="cpu", random_state=None):
    """Build a search index over ``bank`` for the named backend.

    Parameters
    ----------
    bank : array-like of shape (m, d)
        Memory-bank rows.
    backend : {'auto', 'exact', 'pynndescent'}, default='auto'
        'exact' is :class:`ExactIndex`, 'pynndescent' :class:`NNDescentIndex`. 'auto' is
        exact on CUDA, and on CPU pynndescent when ``m > AUTO_NNDESCENT_MIN_ROWS`` (200 000;
        exact otherwise, and also if pynndescent cannot be imported, with a warning).
    device : str or torch.device, default='cpu'
        Where exact search runs.
    random_state : int, RandomState instance or None, default=None
        Seeds the pynndescent graph; ignored by exact search.

    Returns
    -------
    index : ExactIndex or NNDescentIndex
        An object with ``query(Q, k, *, query_groups=None, bank_groups=None, verbose=False)``
        and ``len(index)``.
    """
    if backend not in _BACKENDS:
        raise ValueError(
            f"Unknown knn_backend {backend!r}; use one of {', '.join(map(repr, _BACKENDS))}."
        )
    device = torch.device(device)
    if backend == "auto":
        if _auto_backend(bank.shape[0], device) == "exact":
            return ExactIndex(bank, device)
        try:
            return NNDescentIndex(bank, device, random_state=random_state)
        except ImportError as exc:
            warnings.warn(f"{exc} Falling back to exact search.", stacklevel=2)
            return ExactIndex(bank, device)
    if backend == "pynndescent":
        return NNDescentIndex(bank, device, random_state=random_state)
    return ExactIndex(bank, device)
