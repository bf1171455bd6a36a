"""Nearest-neighbour search over a memory bank.

:class:`ExactIndex` finds the exact k nearest bank rows by chunked matrix products on all
cores (or the GPU). Distances are true Euclidean distances (not squared): candidates are found
with ``|q|^2 + |b|^2 - 2 q.b`` in float32 (clamped at 0, never negative), then the best few
candidates are re-measured as ``||q - b||`` in float64 and re-ranked, so returned distances are
exact to float64 rounding of the float32 inputs and a query equal to a bank row gets exactly 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ._utils import progress

__all__ = ["ExactIndex", "make_index"]

# Elements of one (queries x bank) distance block; 2**25 float32 = 128 MiB.
_BLOCK_ELEMENTS = 1 << 25
# Extra candidates re-measured in float64, which absorbs float32 rounding in near-ties.
_RERANK_EXTRA = 4


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

    def __len__(self):
        return self.bank.shape[0]

    def query(self, Q, k=1, *, query_groups=None, bank_groups=None, verbose=False):
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
            qg = torch.as_tensor(np.asarray(query_groups), device=self.device)
            bg = torch.as_tensor(np.asarray(bank_groups), device=self.device)
        dist = np.empty((n, k), dtype=np.float64)
        idx = np.empty((n, k), dtype=np.int64)
        rows = max(1, _BLOCK_ELEMENTS // max(m, 1))
        bar = progress(total=n, desc="search", unit="patch", disable=not verbose)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            q = Q[start:stop]
            d2 = torch.addmm(self.bank_sq[None, :], q, self.bank.T, alpha=-2.0)
            d2 += (q.double() ** 2).sum(1).float()[:, None]
            d2.clamp_(min=0.0)
            if masked:
                d2.masked_fill_(qg[start:stop, None] == bg[None, :], float("inf"))
            cand_d2, cand = torch.topk(d2, kc, dim=1, largest=False, sorted=False)
            # Re-measure candidates exactly (float64) and keep the best k.
            exact = torch.linalg.vector_norm(
                self.bank[cand].double() - q.double()[:, None, :], dim=2
            )
            exact = torch.where(torch.isinf(cand_d2), torch.inf, exact)
            order = torch.argsort(exact, dim=1, stable=True)[:, :k]
            best_d = torch.gather(exact, 1, order)
            best_i = torch.gather(cand, 1, order)
            best_i = torch.where(torch.isinf(best_d), -1, best_i)
            dist[start:stop] = best_d.cpu().numpy()
            idx[start:stop] = best_i.cpu().numpy()
            bar.update(stop - start)
        bar.close()
        return dist, idx


def make_index(bank, backend="exact", device="cpu"):
    """Build a search index over ``bank`` for the named backend."""
    if backend in ("exact", "auto"):
        return ExactIndex(bank, device)
    raise ValueError(f"Unknown knn_backend {backend!r}; use 'auto' or 'exact'.")
