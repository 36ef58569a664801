"""Approximate top-k by inner product over one platform's item embeddings (faiss HNSW).

The served score of an item is ``tau * q·e + b`` (user vector ``q``, item embedding ``e``,
item bias ``b``). The index holds ``x = [e, b/tau, sqrt(M² - |[e, b/tau]|²)]`` (the usual
inner-product → L2 reduction, ``M`` the largest norm), so the L2 nearest neighbours of
``[q, 1, 0]`` are the items with the largest served score, whatever the embeddings' norms.

The index is only a *candidate generator*: :class:`streams.heads.ModelServer` re-scores
the candidates exactly with the head version it serves (which may be newer than the one
the index was built from, since a build over 10^6 items takes minutes), so a stale index
costs recall, never correctness. Exclusions (consumed items) stay exact too: a row asks
for ``k + its number of excluded items`` candidates, so after dropping them at least
``k`` remain.

Measured (``bench/scale.py``, 2-core box, 1 thread, 64-d random unit vectors, the
hardest case for any ANN index): see README, Capacity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

__all__ = ["AnnIndex", "ANN_M", "ANN_EF_CONSTRUCTION", "ANN_EF_SEARCH"]

#: graph degree; 32 beat 16 at equal recall on 64-d random vectors (bench/scale.py)
ANN_M = 32
#: build-time beam (higher: better graph, slower build; 80 ≈ 3-4 min for 10^6 on 2 cores)
ANN_EF_CONSTRUCTION = 80
#: search-time beam: recall@10 ≥ 0.95 on 10^6 random 64-d vectors needs ~256-512
ANN_EF_SEARCH = 384


def _faiss():  # type: ignore[no-untyped-def]
    import faiss  # imported when an index is first built: a small catalog never needs it

    return faiss


class AnnIndex:
    """An HNSW index over ``n`` item embeddings; labels are their catalog columns 0..n-1.

    ``version`` and ``built_at`` say what it was built from (the head version) and when;
    ``build_s`` how long it took."""

    def __init__(self, emb: np.ndarray, bias: np.ndarray | None = None, tau: float = 1.0,
                 m: int = ANN_M, ef_construction: int = ANN_EF_CONSTRUCTION,
                 ef_search: int = ANN_EF_SEARCH, threads: int = 0, version: int = 0) -> None:
        faiss = _faiss()
        t0 = time.perf_counter()
        x = np.asarray(emb, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be [n, d], got shape {x.shape}")
        n, d = x.shape
        cols = [x]
        if bias is not None:
            cols.append((np.asarray(bias, dtype=np.float32) / float(tau)).reshape(n, 1))
        x = np.concatenate(cols, axis=1) if len(cols) > 1 else x
        sq = (x * x).sum(1)
        big = float(sq.max()) if n else 0.0
        x = np.ascontiguousarray(np.concatenate(
            [x, np.sqrt(np.maximum(big - sq, 0.0)).reshape(n, 1)], axis=1), dtype=np.float32)
        self.dim, self.n, self.has_bias = d, n, bias is not None
        self.ef_search = ef_search
        self.version = version
        if threads:
            faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_L2)
        self.index.hnsw.efConstruction = ef_construction
        if n:
            self.index.add(x)
        self.built_at = time.time()
        self.build_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return self.n

    def _queries(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float32).reshape(-1, self.dim)
        extra = 2 if self.has_bias else 1
        out = np.zeros((q.shape[0], self.dim + extra), dtype=np.float32)
        out[:, : self.dim] = q
        if self.has_bias:
            out[:, self.dim] = 1.0
        return out

    def search(self, q: np.ndarray, k: int, ef: int | None = None) -> np.ndarray:
        """The ``k`` best columns of each query row [B, k], best first (-1: none)."""
        faiss = _faiss()
        b = int(np.asarray(q).reshape(-1, self.dim).shape[0])
        k = min(int(k), self.n)
        if k <= 0 or b == 0:
            return np.full((b, max(k, 0)), -1, dtype=np.int64)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(int(ef or self.ef_search), k)
        _, idx = self.index.search(self._queries(q), k, params=params)
        return idx.astype(np.int64, copy=False)

    def candidates(self, q: np.ndarray, k: int, exclude: Sequence[Sequence[int]] = (),
                   ef: int | None = None) -> list[np.ndarray]:
        """Per query row, up to ``k`` columns (best first, approximately) that are not in
        its ``exclude`` (catalog columns): it asks for ``k + len(exclude[r])`` and drops
        the excluded ones, so an excluded item never comes back and at least ``k`` do
        (while the catalog has them)."""
        q = np.asarray(q, dtype=np.float32).reshape(-1, self.dim)
        b = q.shape[0]
        ex = [set(int(c) for c in exclude[r]) if r < len(exclude) else set() for r in range(b)]
        out: list[np.ndarray] = [np.empty(0, np.int64)] * b
        # one search per distinct ask size (a batch's users share most of theirs)
        by_k: dict[int, list[int]] = {}
        for r in range(b):
            by_k.setdefault(min(k + len(ex[r]), self.n), []).append(r)
        for kk, rows in by_k.items():
            res = self.search(q[rows], kk, ef)
            for r, lst in zip(rows, res, strict=True):
                e = ex[r]
                keep = [int(c) for c in lst if c >= 0 and int(c) not in e]
                out[r] = np.asarray(keep[:k], dtype=np.int64)
        return out
