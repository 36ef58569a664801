"""Why an item was recommended: a short, machine-readable reason per recommended item.

Reasons ride on the recommendation itself (``items[i].why``, :class:`streams.records.Why`)
for the best ``XREC_EXPLAIN_TOP`` items of each refresh, on the topic and in the cache:

* the model (``history`` / ``similar``): the user tower pools the history with attention,
  so a history item *j* pushes candidate *i* up by about ``a_j × cos(e_j, e_i)`` (its
  attention weight × the similarity of the two items in the shared space). The evidence
  is the one or two history positives with the largest such part, any platform: a video
  recommended because of a music track says so. ``similar`` when the candidate has no
  popularity on its platform yet (nobody has consumed it lately: a new or rare item
  known by its text);
* the hybrid's popularity ⊕ co-occurrence part, when it outweighs the model's part of the
  served score (both are standardised over the catalog): ``cooccurrence`` with the
  recent positive whose co-occurrence row gave the item most, or ``popular``;
* the popco scorer (no model, or before the first head version): the same two.

Evidence is only ever an item of the user's own history (tested); a reason carries no
user key. Reasons are JSON fragments built here once per item, without pydantic objects:
they are on the hot path (cost in README, "Why this item").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["why_json", "popular", "model_reasons", "popco_reason", "popco_reasons", "describe"]

_dumps = json.JSONEncoder(ensure_ascii=False).encode
_POPULAR: dict[str, str] = {}
_EVIDENCE = 2  # history items named per reason at most


def why_json(kind: str, evidence: Sequence[tuple[str, str, float]] = (),
             platform: str | None = None) -> str:
    """The JSON of a :class:`streams.records.Why` (``evidence``: (platform, item, share))."""
    parts = [f'"kind":"{kind}"']
    if platform is not None:
        parts.append(f'"platform":{_dumps(platform)}')
    if evidence:
        ev = ",".join(f'{{"platform":{_dumps(p)},"item":{_dumps(i)},"share":{round(sh, 3)!r}}}'
                      for p, i, sh in evidence)
        parts.append(f'"evidence":[{ev}]')
    return "{" + ",".join(parts) + "}"


def popular(platform: str) -> str:
    hit = _POPULAR.get(platform)
    if hit is None:
        hit = _POPULAR[platform] = why_json("popular", platform=platform)
    return hit


def _evidence(c: Sequence[float], j: Sequence[int], gids: Sequence[int], total: float,
              ids: Sequence[str], plat_of: Callable[[int], str]
              ) -> list[tuple[str, str, float]]:
    """The best history items by their summed parts (an item may fill several positions)."""
    acc: dict[int, float] = {}
    for v, pos in zip(c, j, strict=True):
        if v > 0:
            g = gids[pos]
            acc[g] = acc.get(g, 0.0) + v
    best = sorted(acc.items(), key=lambda kv: -kv[1])[:_EVIDENCE]
    return [(plat_of(g), ids[g], min(1.0, v / total)) for g, v in best]


def model_reasons(emb: Any, top: np.ndarray, hist: np.ndarray, positive: np.ndarray,
                  att: Any, ids: Sequence[str], plat_of: Callable[[int], str],
                  platform: str, new: np.ndarray | None = None,
                  popco: list[list[str | None]] | None = None) -> list[list[str]]:
    """Reasons for ``top`` [R, n] (item rows, -1 = none) of R rankings on ``platform``.

    ``hist`` [R, L] the rankings' history rows (-1 = padding), ``positive`` [R, L] which
    of them were positive, ``att`` [R, L] the tower's attention weights on them, ``emb``
    the served item embeddings (unit norm). ``new`` [R, n]: the item has no popularity
    (``similar`` instead of ``history``). ``popco[r][j]``: a reason already decided by the
    hybrid's popco part (used as is)."""
    import torch  # here: the popco path (streams.state) imports this module without it

    r_n, n = top.shape
    if not r_n or not n:
        return [[] for _ in range(r_n)]
    with torch.inference_mode():
        dev = emb.device
        et = emb[torch.from_numpy(np.maximum(top, 0)).to(dev)]  # [R, n, d]
        eh = emb[torch.from_numpy(np.maximum(hist, 0)).to(dev)]  # [R, L, d]
        w = att.to(torch.float32) * torch.from_numpy(positive & (hist >= 0)).to(dev)
        part = torch.bmm(et, eh.transpose(1, 2)).clamp_(min=0) * w[:, None, :]  # [R, n, L]
        total = part.sum(-1)
        kk = min(2 * _EVIDENCE, part.shape[-1])
        pv, pj = part.topk(kk, dim=-1) if kk else (part, part.long())
        pv_l, pj_l, tot_l = pv.tolist(), pj.tolist(), total.tolist()
    hist_l, top_l = hist.tolist(), top.tolist()
    new_l = new.tolist() if new is not None else None
    out: list[list[str]] = []
    for r in range(r_n):
        row: list[str] = []
        for j in range(n):
            if top_l[r][j] < 0:
                break
            fixed = popco[r][j] if popco is not None else None
            if fixed is not None:
                row.append(fixed)
                continue
            tot = tot_l[r][j]
            ev = _evidence(pv_l[r][j], pj_l[r][j], hist_l[r], tot, ids, plat_of) \
                if tot > 0 else []
            if not ev:
                row.append(popular(platform))
            else:
                row.append(why_json("similar" if new_l is not None and new_l[r][j]
                                    else "history", ev))
        out.append(row)
    return out


def popco_reason(item: str, platform: str, recent: Sequence[str],
                 rows: Sequence[Any], co_part: float, pop_part: float) -> str:
    """The popco part's reason for ``item``: ``cooccurrence`` with the recent positive
    whose row gave it most (``rows[k]``: that of ``recent[k]``, a mapping item → count,
    weighted 1/(k+1) as popco sums them) when co-occurrence outweighs popularity, else
    ``popular``."""
    if co_part > 0 and co_part >= pop_part:
        best, src = 0.0, None
        parts = []
        for k, (r_item, row) in enumerate(zip(recent, rows, strict=False)):
            v = row.get(item, 0.0) / (k + 1) if row else 0.0
            parts.append(v)
            if v > best:
                best, src = v, r_item
        if src is not None:
            total = sum(parts)
            return why_json("cooccurrence", [(platform, src, best / total)])
    return popular(platform)


def popco_reasons(items: Sequence[str], platform: str, recent: Sequence[str],
                  neighbours: Sequence[Sequence[tuple[str, float]]],
                  pop: dict[str, float], pop_max: float, blend: float) -> list[str]:
    """Reasons for the popco scorer's ``items`` (its score as
    :func:`models.popco.popco_scores`: ``recent`` the user's recent positives, newest
    first, ``neighbours`` their co-occurrence lists)."""
    co: dict[str, float] = {}
    for k, lst in enumerate(neighbours, start=1):
        for it, sc in lst:
            co[it] = co.get(it, 0.0) + sc / k
    co_max = max(co.values(), default=0.0)
    rows = [dict(lst) for lst in neighbours] if co_max > 0 else []
    w_pop = (1.0 - blend) if co_max > 0 else 1.0
    out = []
    for item in items:
        co_part = blend * co.get(item, 0.0) / co_max if co_max > 0 else 0.0
        pop_part = w_pop * pop.get(item, 0.0) / pop_max if pop_max > 0 else 0.0
        out.append(popco_reason(item, platform, recent, rows, co_part, pop_part))
    return out


def describe(why: Any, title: Callable[[str, str], str | None] | None = None) -> str:
    """A reason in words (``why``: a :class:`streams.records.Why` or its dict)."""
    d = why.model_dump() if hasattr(why, "model_dump") else dict(why)
    kind = d.get("kind")
    if kind == "popular":
        return f"popular on {d.get('platform')}"

    def name(e: dict[str, Any]) -> str:
        t = title(e["platform"], e["item"]) if title is not None else None
        label = f"{e['item']} “{t[:40]}”" if t else e["item"]
        return f"{label} on {e['platform']} ({100 * e['share']:.0f}%)"

    ev = ", ".join(name(e) for e in d.get("evidence") or [])
    if kind == "cooccurrence":
        return f"people who had {ev} had this too"
    if kind == "similar":
        return f"new here, similar to {ev} in your history"
    return f"because of {ev} in your history"
