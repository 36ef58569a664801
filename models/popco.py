"""Decayed popularity blended with item co-occurrence: the first, simple scorer.

Given a platform's most popular items (time-decayed weights), the co-occurrence
neighbour lists of the user's most recent positive items, and the items the user
already consumed, rank the rest::

    score(i) = blend * co(i) / max(co) + (1 - blend) * pop(i) / max(pop)
    co(i)    = Σ_k  cooc(r_k, i) / k        r_1 = most recent positive item

It is the baseline that the learned model (issue 4) must beat, and it is what the
stream serves until a model is configured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

__all__ = ["SCORER_VERSION", "popco_rank", "decay_factor"]

SCORER_VERSION = "popco-1"


def decay_factor(event_time: float, anchor: float, half_life_s: float) -> float:
    """2^((t - anchor)/half_life): weights grow with time, so old ones shrink relatively."""
    e = (event_time - anchor) / half_life_s
    if e < -1000:
        return 0.0
    return math.pow(2.0, min(e, 1000.0))


def popco_rank(
    popular: Sequence[tuple[str, float]],
    neighbours: Sequence[Sequence[tuple[str, float]]],
    is_seen: Callable[[str], bool] | Mapping[str, object],
    k: int,
    blend: float,
) -> list[tuple[str, float]]:
    """Top-``k`` (item, score), best first; ties broken by item id for determinism.

    ``neighbours[j]`` is the co-occurrence list of the user's (j+1)-th most recent
    positive item. ``is_seen`` excludes items the user already consumed.
    """
    seen = is_seen.__contains__ if isinstance(is_seen, Mapping) else is_seen
    co: dict[str, float] = {}
    for rank, lst in enumerate(neighbours, start=1):
        for item, s in lst:
            co[item] = co.get(item, 0.0) + s / rank
    pop = dict(popular)
    co_max = max(co.values(), default=0.0)
    pop_max = max(pop.values(), default=0.0)
    w_co = blend if co_max > 0 else 0.0
    w_pop = (1.0 - blend) if co_max > 0 else 1.0
    scores: dict[str, float] = {}
    for item in set(co) | set(pop):
        if seen(item):
            continue
        s = 0.0
        if co_max > 0:
            s += w_co * co.get(item, 0.0) / co_max
        if pop_max > 0:
            s += w_pop * pop.get(item, 0.0) / pop_max
        scores[item] = s
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(i, round(s, 6)) for i, s in ranked[:k]]
