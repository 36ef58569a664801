"""Why an item was recommended: a short, machine-readable reason per recommended item.

Reasons ride on the recommendation itself (``items[i].why``, :class:`streams.records.Why`)
for the best ``XREC_EXPLAIN_TOP`` items of each refresh, on the topic and in the cache:

* the model (``history`` / ``similar``): the user tower pools the history with attention,
  so a history item *j* pushes candidate *i* up by about ``a_j × cos(e_j, e_i)`` (its
  attention weight × the similarity of the two items in the shared space). The evidence
  is the one or two history positives with the largest such part, any platform: a video
  recommended because of a music track says so. ``similar`` when the candidate is outside
  its platform's popular head (the hybrid's popularity row: a new or rarely consumed item,
  known by its text). No positive with a part: ``popular`` (the model's platform-wide
  prior decides, as for a user without positives);
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
        ev = ",".join(f"{_ev_prefix(p, i)}{round(sh, 3)!r}}}" for p, i, sh in evidence)
        parts.append(f'"evidence":[{ev}]')
    return "{" + ",".join(parts) + "}"


_EV: dict[tuple[str, str], str] = {}  # (platform, item) → its evidence entry up to the share


def _ev_prefix(platform: str, item: str) -> str:
    key = (platform, item)
    hit = _EV.get(key)
    if hit is None:
        if len(_EV) > 1_000_000:
            _EV.clear()
        hit = _EV[key] = f'{{"platform":{_dumps(platform)},"item":{_dumps(item)},"share":'
    return hit


def popular(platform: str) -> str:
    hit = _POPULAR.get(platform)
    if hit is None:
        hit = _POPULAR[platform] = why_json("popular", platform=platform)
    return hit


def _merge_repeats(hist: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each history row's weights with an item's repeats summed into its first position
    (zero elsewhere): a_j × cos(e_j, e_i) summed over an item's positions is then one
    position's part, so the best parts are the best distinct items."""
    r_n, length = hist.shape
    key = (np.arange(r_n, dtype=np.int64)[:, None] * (int(hist.max(initial=0)) + 2)
           + hist + 1).ravel()
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    out = np.zeros(r_n * length)
    out[first] = np.bincount(inv.ravel(), weights=w.ravel())
    return out.reshape(r_n, length)


def model_reasons(emb: Any, top: np.ndarray, hist: np.ndarray, positive: np.ndarray,
                  att: Any, ids: Sequence[str], plat_of: Callable[[int], str],
                  platform: str | Sequence[str], new: np.ndarray | None = None,
                  popco: list[list[str | None]] | None = None,
                  memo: dict[int, str] | None = None) -> list[list[str]]:
    """Reasons for ``top`` [R, n] (item rows, -1 = none) of R rankings on ``platform``.

    ``hist`` [R, L] the rankings' history rows (-1 = padding), ``positive`` [R, L] which
    of them were positive, ``att`` [R, L] the tower's attention weights on them, ``emb``
    the served item embeddings (unit norm); ``platform``: the rankings' platform (one, or
    one per ranking). ``new`` [R, n]: the item is outside the
    popular head (``similar`` instead of ``history``). ``popco[r][j]``: a reason already
    decided by the hybrid's popco part (used as is). ``memo``: item row → its evidence
    entry's JSON up to the share, kept by the caller while rows keep their items."""
    import torch  # here: the popco path (streams.state) imports this module without it

    r_n, n = top.shape
    plat_r = [platform] * r_n if isinstance(platform, str) else list(platform)
    if not r_n or not n or not hist.shape[1]:
        return [[popular(q)] * int((row >= 0).sum()) for q, row in zip(plat_r, top, strict=True)]
    w = _merge_repeats(hist, att.detach().cpu().numpy() * (positive & (hist >= 0)))
    with torch.inference_mode():
        dev = emb.device
        et = emb[torch.from_numpy(np.maximum(top, 0)).to(dev)]  # [R, n, d]
        eh = emb[torch.from_numpy(np.maximum(hist, 0)).to(dev)]  # [R, L, d]
        wt = torch.from_numpy(w).to(dtype=et.dtype, device=dev)
        part = torch.bmm(et, eh.transpose(1, 2)).clamp_(min=0) * wt[:, None, :]  # [R, n, L]
        total = part.sum(-1)
        pv, pj = part.topk(min(_EVIDENCE, part.shape[-1]), dim=-1)
        share = (pv / total.clamp(min=1e-30)[..., None]).clamp_(max=1.0).cpu().numpy()
        cited = (pv > 0).cpu().numpy()
        pj_n = pj.cpu().numpy()
        tot_l = (total > 0).cpu().numpy().tolist()
    gids = np.take_along_axis(hist[:, None, :], pj_n, axis=2)  # [R, n, E] evidence rows
    share_l, gid_l, cited_l = share.round(3).tolist(), gids.tolist(), cited.tolist()
    counts = (top >= 0).sum(1).tolist()
    new_l = new.tolist() if new is not None else None
    pref = memo if memo is not None else {}

    def head(g: int) -> str:
        h = pref[g] = _ev_prefix(plat_of(g), ids[g])
        return h

    out: list[list[str]] = []
    for r in range(r_n):
        row: list[str] = []
        pop = popular(plat_r[r])
        fixed_r = popco[r] if popco is not None else None
        new_r = new_l[r] if new_l is not None else None
        for j, (has, gs, ss, cs) in enumerate(zip(tot_l[r][:counts[r]], gid_l[r], share_l[r],
                                                  cited_l[r], strict=False)):  # the first ones
            if fixed_r is not None and fixed_r[j] is not None:
                row.append(fixed_r[j])
            elif not has:
                row.append(pop)
            else:
                ev = ",".join([f"{pref.get(g) or head(g)}{sh!r}}}"
                               for g, sh, c in zip(gs, ss, cs, strict=True) if c])
                kind = "similar" if new_r is not None and new_r[j] else "history"
                row.append(f'{{"kind":"{kind}","evidence":[{ev}]}}')
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
        for k, (r_item, row) in enumerate(zip(recent, rows, strict=True)):
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
        return f"not among the popular ones, similar to {ev} in your history"
    return f"because of {ev} in your history"
