"""Prequential quality metrics: ranking (Recall@K, NDCG@K, MRR) and pointwise (AUC, F1).

Ranking: one held-out positive per query, ranked against the platform catalog minus the
items the user already had. ``rank`` is 0-based; ties count half (``rank = greater +
0.5 · equal``), so a method that scores everything alike gets the random expectation, not
a lucky first place.

Pointwise: every labelled event (positive or negative) gets the percentile of its item in
the method's ranking for that user (1 = top). AUC is the Mann-Whitney statistic over those
percentiles (ties half). F1 uses an online logistic calibration of the percentile (Platt
scaling learned test-then-train on the events before), thresholded at 0.5, so every method
is judged by the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["rank_of", "RankingStats", "PointwiseStats", "auc", "Platt"]


def rank_of(scores: np.ndarray, target: int, exclude: np.ndarray | None = None
            ) -> tuple[float, int]:
    """(rank, number of candidates) of column ``target`` in a score vector.

    ``exclude`` lists columns that are not candidates (already-consumed items); the target
    itself is never excluded.
    """
    s = np.asarray(scores, dtype=np.float64)
    st = s[target]
    greater = s > st
    equal = s == st
    n = s.shape[0]
    if exclude is not None and len(exclude):
        ex = np.asarray(exclude, dtype=np.int64)
        ex = ex[ex != target]
        greater[ex] = False
        equal[ex] = False
        n -= len(np.unique(ex))
    if not math.isfinite(st):
        return float(n - 1), n
    return float(greater.sum()) + 0.5 * float(equal.sum() - 1), n


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Probability that a random positive outranks a random negative (ties half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties (1-based)
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass
class RankingStats:
    n: int = 0
    hits10: float = 0.0
    hits20: float = 0.0
    ndcg10: float = 0.0
    rr: float = 0.0

    def add(self, rank: float) -> None:
        self.n += 1
        if rank < 10:
            self.hits10 += 1
            self.ndcg10 += 1.0 / math.log2(rank + 2.0)
        if rank < 20:
            self.hits20 += 1
        self.rr += 1.0 / (rank + 1.0)

    def merge(self, o: RankingStats) -> None:
        self.n += o.n
        self.hits10 += o.hits10
        self.hits20 += o.hits20
        self.ndcg10 += o.ndcg10
        self.rr += o.rr

    def summary(self) -> dict[str, float | int | None]:
        if not self.n:
            return {"recall@10": None, "recall@20": None, "ndcg@10": None, "mrr": None, "n": 0}
        return {"recall@10": round(self.hits10 / self.n, 5),
                "recall@20": round(self.hits20 / self.n, 5),
                "ndcg@10": round(self.ndcg10 / self.n, 5), "mrr": round(self.rr / self.n, 5),
                "n": self.n}


class Platt:
    """p = sigmoid(a·x + b), fitted online by SGD on (x, y) pairs after they are predicted."""

    def __init__(self, lr: float = 0.05) -> None:
        self.a, self.b, self.lr = 1.0, 0.0, lr

    def predict(self, x: float) -> float:
        z = max(-30.0, min(30.0, self.a * x + self.b))
        return 1.0 / (1.0 + math.exp(-z))

    def update(self, x: float, y: int) -> None:
        g = self.predict(x) - y
        self.a -= self.lr * g * x
        self.b -= self.lr * g


@dataclass
class PointwiseStats:
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    platt: Platt = field(default_factory=Platt)

    def add(self, score: float, label: int) -> None:
        pred = self.platt.predict(score) >= 0.5
        if pred and label:
            self.tp += 1
        elif pred:
            self.fp += 1
        elif label:
            self.fn += 1
        self.platt.update(score, label)
        self.scores.append(score)
        self.labels.append(label)

    def summary(self) -> dict[str, float | None]:
        a = auc(np.asarray(self.scores), np.asarray(self.labels)) if self.scores else None
        denom = 2 * self.tp + self.fp + self.fn
        return {"auc": None if a is None else round(a, 5),
                "f1": round(2 * self.tp / denom, 5) if denom else None}
