"""Decayed popularity blended with item co-occurrence: the first, simple scorer.

Given a platform's most popular items (time-decayed weights, best first), the
co-occurrence neighbour lists of the user's most recent positive items, and the items the
user already consumed, rank the rest::

    score(i) = blend * co(i) / max(co) + (1 - blend) * pop(i) / max(pop)
    co(i)    = Σ_k  cooc(r_k, i) / k        r_1 = most recent positive item

Users with no positive history on the platform get popularity alone. It is the baseline
that the learned model (issue 4) must beat, and it is what the stream serves until a
model is configured. Ties are broken by item id, so rankings are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["SCORER_VERSION", "popco_scores", "popco_rank", "popco_dense", "standardised",
           "decay_factor"]

SCORER_VERSION = "popco-1"


def decay_factor(event_time: float, anchor: float, half_life_s: float) -> float:
    """2^((t - anchor)/half_life): weights grow with time, so old ones shrink relatively."""
    e = (event_time - anchor) / half_life_s
    if e < -1000:
        return 0.0
    return math.pow(2.0, min(e, 1000.0))


def popco_scores(
    popular: Sequence[tuple[str, float]],
    neighbours: Sequence[Sequence[tuple[str, float]]],
    blend: float,
    limit: int,
    pop_lookup: Mapping[str, float] | None = None,
) -> list[tuple[str, float]]:
    """The best ``limit`` (item, score), best first, with no exclusions applied.

    ``popular`` must be sorted best first; ``pop_lookup`` is ``dict(popular)``, passed in
    when the caller reuses it. Cost is O(|neighbours| + limit), not O(catalog).
    """
    co: dict[str, float] = {}
    get_co = co.get
    for rank, lst in enumerate(neighbours, start=1):
        inv = 1.0 / rank
        for item, s in lst:
            co[item] = get_co(item, 0.0) + s * inv
    pop_max = popular[0][1] if popular else 0.0
    co_max = max(co.values(), default=0.0)
    if co_max <= 0:
        w_co, w_pop = 0.0, 1.0
    else:
        w_co, w_pop = blend, 1.0 - blend
    f_pop = w_pop / pop_max if pop_max > 0 else 0.0
    # (-score, item): a plain tuple sort gives best first, ties by item id, all in C
    scored: list[tuple[float, str]] = []
    if co:
        pop = pop_lookup if pop_lookup is not None else dict(popular)
        f_co = w_co / co_max
        get = pop.get
        scored = [(-(f_co * c + f_pop * get(item, 0.0)), item) for item, c in co.items()]
    taken = 0
    for item, s in popular:
        if taken >= limit:
            break
        if item in co:
            continue
        scored.append((-f_pop * s, item))
        taken += 1
    scored.sort()
    return [(item, round(-ns, 6)) for ns, item in scored[:limit]]


def popco_dense(co: np.ndarray, pop: np.ndarray, blend: float) -> np.ndarray:
    """The same score over a whole catalog at once: ``co`` [B, n] each query's summed
    co-occurrence row (Σ_k cooc(r_k, ·)/k), ``pop`` [n] popularity → [B, n]."""
    co = np.asarray(co, dtype=np.float64)
    pop = np.asarray(pop, dtype=np.float64)
    top = pop.max() if pop.size else 0.0
    pop_n = pop / top if top > 0 else pop
    cmax = co.max(axis=1, keepdims=True) if co.shape[1] else np.zeros((len(co), 1))
    has = cmax > 0
    return np.where(has, blend * co / np.where(has, cmax, 1.0) + (1.0 - blend) * pop_n,
                    pop_n[None, :])


def standardised(s: np.ndarray) -> np.ndarray:
    """Each row to mean 0, standard deviation 1 (a constant row becomes 0)."""
    s = np.asarray(s, dtype=np.float64)
    sd = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def popco_rank(
    popular: Sequence[tuple[str, float]],
    neighbours: Sequence[Sequence[tuple[str, float]]],
    is_seen: Callable[[str], bool],
    k: int,
    blend: float,
) -> list[tuple[str, float]]:
    """Top-``k`` unseen (item, score), best first (in-memory exclusion)."""
    limit = 4 * k
    while True:
        ranked = popco_scores(popular, neighbours, blend, limit)
        out = [(i, s) for i, s in ranked if not is_seen(i)]
        if len(out) >= k or len(ranked) < limit:
            return out[:k]
        limit *= 4
