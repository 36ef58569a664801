"""In-memory item vectors per platform and exact top-k retrieval by dot product.

Vectors are L2-normalised, so the dot product is the cosine. Exact search is a matrix-
vector product: fine up to ~10^5 items per platform (DESIGN.md); an ANN index beyond.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["ItemIndex"]


class ItemIndex:
    """One platform's items: ``upsert`` adds or replaces, ``search`` ranks by cosine."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self._m = np.zeros((0, dim), dtype=np.float32)
        self.version = 0  # bumped by every upsert (readers notice replaced vectors)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> np.ndarray:
        return self._m[: len(self.ids)]

    def upsert(self, ids: Sequence[str], vecs: np.ndarray) -> None:
        vecs = np.asarray(vecs, dtype=np.float32).reshape(len(ids), self.dim)
        self.version += 1
        for item, v in zip(ids, vecs, strict=True):
            r = self.row.get(item)
            if r is None:
                r = len(self.ids)
                if r >= self._m.shape[0]:
                    grown = np.zeros((max(64, 2 * self._m.shape[0]), self.dim), dtype=np.float32)
                    grown[: r] = self._m[: r]
                    self._m = grown
                self.ids.append(item)
                self.row[item] = r
            self._m[r] = v

    def vector(self, item: str) -> np.ndarray | None:
        r = self.row.get(item)
        return None if r is None else self._m[r].copy()

    def search(self, query: np.ndarray, k: int = 10, exclude: Iterable[str] = ()
               ) -> list[tuple[str, float]]:
        n = len(self.ids)
        if n == 0:
            return []
        scores = self.matrix @ np.asarray(query, dtype=np.float32).reshape(self.dim)
        for item in exclude:
            r = self.row.get(item)
            if r is not None:
                scores[r] = -np.inf
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.ids[i], round(float(scores[i]), 6)) for i in top if np.isfinite(scores[i])]
