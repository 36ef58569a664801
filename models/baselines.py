"""The baselines of the prequential harness, and the one input every method ranks from.

Every method, xrec included, gets the same :class:`Query` objects for a micro-batch: the
user's history on every platform as of the event (earlier events of the same micro-batch
included), the items to exclude, the candidate set (the platform's catalog). What a method
learns (weights, counts, popularity) it learns after the batch is ranked, from the same
queries; no baseline keeps a private per-user view of the stream.

* ``popularity``  time-decayed item popularity; half-life chosen on the warm-up
* ``itemknn``     cosine item-kNN: co-counts of positives within each user's last 50
                  positives (every platform), scored from the user's last ``n`` positives
                  (``n`` chosen on the warm-up), popularity as tie-break and fallback
* ``popco``       what the worker serves without the model: decayed popularity ⊕
                  co-occurrence, with the worker's settings (``models/popco.py``,
                  ``streams/lua/apply.lua``)
* ``text_zero_shot``  the language model with no training: cosine of item texts to the
                  user's recent positives
* ``textpop``     the language model with no training, times popularity: each recent
                  positive read as a softmax over the catalog's text similarities
                  (``models/coldtext.py``); β, α and the half-life chosen on the warm-up

:class:`Tuned` runs a method's few candidate settings side by side during the warm-up
(the first ``EvalConfig.warmup`` share of events), ranks each batch with the candidate
best so far (NDCG@10 on the earlier warm-up batches only) and keeps the best one after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.coldtext import ColdWeight, kernel_mean, text_prior, unit_rows
from models.heads import ItemTable
from models.metrics import rank_of
from models.popco import popco_dense, standardised

__all__ = ["Query", "Method", "Popularity", "ItemKNN", "PopCo", "TextZeroShot", "TextPop",
           "TextVectors", "Tuned", "recent_positives", "Hybrid", "cross_cold"]


@dataclass
class Query:
    platform: str
    gid: int
    local: int
    label: int
    time: float
    history: list[tuple[int, int, float]]  # all platforms, newest first: (gid, label, t)
    seen: np.ndarray  # local indices the user already had on this platform
    rank_eval: bool  # a positive on an item new to the user
    coldstart: bool
    uid: int = 0  # dense user number
    weight: float = 1.0  # the event's weight (as the worker's apply script uses it)


class Method:
    name = ""

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        """[len(qs), catalog size of p]: higher is better."""
        raise NotImplementedError

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        pass

    def params(self) -> dict[str, object]:
        """The settings it ranks with (reported next to its figures)."""
        return {}

    def _memoised(self, qs: list[Query], p: str, version: int,
                  compute: Callable[[list[Query], str], np.ndarray]) -> np.ndarray:
        """The same batch's scores again when asked twice at one ``version`` of what the
        method learnt (``xrec_hybrid`` asks its parts after they ranked for themselves)."""
        memo = self.__dict__.setdefault("_last_scores", {})
        last = memo.get(p)  # one entry per platform: methods ask platform after platform
        if last is not None and last[0] is qs and last[1] == version:
            return last[2]  # type: ignore[no-any-return]
        out = compute(qs, p)
        memo[p] = (qs, version, out)
        return out


def recent_positives(q: Query, n: int, plat: int | None = None,
                     table: ItemTable | None = None) -> list[int]:
    """The user's last ``n`` distinct positive items (gids), newest first; only those of
    platform index ``plat`` when given."""
    out: list[int] = []
    seen: set[int] = set()
    for g, label, _ in q.history:
        if not label or g in seen:
            continue
        if plat is not None and table is not None and table.plat[g] != plat:
            continue
        seen.add(g)
        out.append(g)
        if len(out) >= n:
            break
    return out


def _grown(m: np.ndarray | None, n: int, square: bool) -> np.ndarray:
    """``m`` zero-padded to at least n (×n) rows, doubling to keep copies rare."""
    have = 0 if m is None else m.shape[0]
    if have >= n and m is not None:
        return m
    size = max(n, 64, 2 * have)
    out = np.zeros((size, size) if square else size, dtype=np.float64 if not square
                   else np.float32)
    if m is not None:
        if square:
            out[:have, :have] = m
        else:
            out[:have] = m
    return out


class Popularity(Method):
    """Decayed popularity: w(i) = Σ 2^((t_event - anchor)/half_life) over i's positives
    (``half_life_s = inf``: plain counts)."""

    name = "popularity"

    def __init__(self, table: ItemTable, half_life_s: float) -> None:
        self.t, self.hl = table, half_life_s
        self.w: dict[str, np.ndarray] = {}
        self.anchor: float | None = None

    def params(self) -> dict[str, object]:
        return {"half_life_days": None if math.isinf(self.hl) else round(self.hl / 86400, 4)}

    def vec(self, p: str) -> np.ndarray:
        n = len(self.t.rows(p))
        v = self.w.get(p)
        if v is None or len(v) < n:
            self.w[p] = v = _grown(v, n, square=False)
        return v[:n]

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        return np.broadcast_to(self.vec(p), (len(qs), len(self.t.rows(p))))

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        for q in qs:
            if not q.label:
                continue
            if math.isinf(self.hl):
                self.vec(q.platform)[q.local] += q.weight
                continue
            if self.anchor is None:
                self.anchor = q.time
            e = (q.time - self.anchor) / self.hl
            if e > 60:  # rebase: rescale every weight to a new anchor
                for v in self.w.values():
                    v *= 2.0 ** (-e)
                self.anchor, e = q.time, 0.0
            self.vec(q.platform)[q.local] += q.weight * 2.0 ** max(e, -1000.0)


class ItemKNN(Method):
    """Cosine item-kNN over every platform's items.

    Learning: each positive (user, i) adds 1 to c(h, i) and c(i, h) for each of the user's
    last ``fit_window`` distinct positives h (any platform), and 1 to n(i). Similarity:
    c(h, i) / sqrt(n(h) n(i)). Score of candidate i: Σ sim(h, i) over the user's last
    ``score_window`` positives, plus 1e-6 × n(i) / max n (popularity breaks ties and ranks
    for users with no positives yet).
    """

    name = "itemknn"

    def __init__(self, table: ItemTable, fit_window: int = 50, score_window: int = 20,
                 max_items: int = 12000) -> None:
        self.t, self.fit, self.win, self.max = table, fit_window, score_window, max_items
        self.c: np.ndarray | None = None
        self.n: np.ndarray | None = None

    def params(self) -> dict[str, object]:
        return {"fit_window": self.fit, "score_window": self.win}

    def _ensure(self) -> None:
        n = len(self.t)
        if n > self.max:
            raise MemoryError(f"itemknn baseline: {n} items > {self.max} (dense co-counts)")
        self.c = _grown(self.c, n, square=True)
        self.n = _grown(self.n, n, square=False)

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        self._ensure()
        assert self.c is not None and self.n is not None
        rows = self.t.rows(p)
        inv = 1.0 / np.sqrt(np.maximum(self.n[: len(self.t)], 1.0))
        out = np.zeros((len(qs), len(rows)), dtype=np.float64)
        pop = self.n[rows]
        top = pop.max() if len(pop) else 0.0
        tie = 1e-6 * pop / top if top > 0 else np.zeros(len(rows))
        for r, q in enumerate(qs):
            hs = recent_positives(q, self.win)
            if hs:
                h = np.asarray(hs)
                out[r] = (self.c[np.ix_(h, rows)] * inv[h, None]).sum(0) * inv[rows]
            out[r] += tie
        return out

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        self._ensure()
        assert self.c is not None and self.n is not None
        for q in qs:
            if not q.label:
                continue
            hs = [h for h in recent_positives(q, self.fit) if h != q.gid]
            if hs:
                h = np.asarray(hs)
                self.c[h, q.gid] += 1.0
                self.c[q.gid, h] += 1.0
            self.n[q.gid] += 1.0


class PopCo(Method):
    """The worker's scorer without the model, on the harness's queries.

    As ``streams/lua/apply.lua``: per platform, a positive (weight w) on i adds w/k to
    co(r_k, i) and co(i, r_k) for the user's k-th most recent distinct earlier positive r_k
    on that platform (k ≤ ``window``); each item keeps its ``keep`` strongest neighbours.
    As ``models/popco.py``: score(i) = blend·co(i)/max co + (1-blend)·pop(i)/max pop with
    co(i) = Σ_k co(r_k, i)/k over the ``read`` strongest neighbours of each r_k (what the
    worker reads, ``XREC_COOC_READ``; at a tie on the cut the kept one may differ from
    Redis's); popularity alone for a user with no co-occurring items.
    """

    name = "popco"

    def __init__(self, table: ItemTable, half_life_s: float, window: int, keep: int,
                 blend: float, max_items: int = 12000, read: int | None = None) -> None:
        self.t, self.win, self.keep, self.blend, self.max = table, window, keep, blend, max_items
        self.read = keep if read is None else min(read, keep)
        self.pop = Popularity(table, half_life_s)
        self.co: dict[str, np.ndarray] = {}
        self.learnt = 0  # batches learnt from

    def params(self) -> dict[str, object]:
        return {**self.pop.params(), "window": self.win, "keep": self.keep,
                "read": self.read, "blend": self.blend}

    def _mat(self, p: str) -> np.ndarray:
        n = len(self.t.rows(p))
        if n > self.max:
            raise MemoryError(f"popco baseline: {n} items on {p} > {self.max}")
        m = self.co.get(p)
        if m is None or m.shape[0] < n:
            self.co[p] = m = _grown(m, n, square=True)
        return m

    def _recent(self, q: Query, p: str) -> list[int]:
        pi = self.t.platform_index(p)
        return [int(self.t.local[g]) for g in recent_positives(q, self.win, pi, self.t)]

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        return self._memoised(qs, p, self.learnt, self._scores)

    def _scores(self, qs: list[Query], p: str) -> np.ndarray:
        m = self._mat(p)
        n = len(self.t.rows(p))
        co = np.zeros((len(qs), n))
        cut = n - self.read  # columns below the row's ``read`` strongest
        for r, q in enumerate(qs):
            for k, h in enumerate(self._recent(q, p), start=1):
                row = m[h, :n]
                if cut > 0:
                    top = np.argpartition(row, cut)[cut:]
                    co[r, top] += row[top] / k
                else:
                    co[r] += row / k
        return popco_dense(co, self.pop.vec(p), self.blend)

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        self.learnt += 1
        touched: dict[str, set[int]] = {}
        for q in qs:
            if not q.label:
                continue
            m = self._mat(q.platform)
            for k, h in enumerate(self._recent(q, q.platform), start=1):
                if h != q.local:
                    m[h, q.local] += q.weight / k
                    m[q.local, h] += q.weight / k
                    touched.setdefault(q.platform, set()).update((h, q.local))
        for p, items in touched.items():  # keep the strongest neighbours, as ZREMRANGEBYRANK
            m = self._mat(p)
            for i in items:
                row = m[i]
                nz = np.count_nonzero(row)
                if nz > self.keep:
                    cut = np.argpartition(row, -self.keep)[:-self.keep]
                    row[cut] = 0.0
        self.pop.learn(qs, batch)


class TextZeroShot(Method):
    name = "text_zero_shot"

    def __init__(self, table: ItemTable, decay: float = 0.9, max_hist: int = 20) -> None:
        self.t, self.decay, self.max_hist = table, decay, max_hist

    def params(self) -> dict[str, object]:
        return {"decay": self.decay, "max_hist": self.max_hist}

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        t = self.t
        u = np.zeros((len(qs), t.text_dim), dtype=np.float32)
        for r, q in enumerate(qs):
            gs, ws = [], []
            for g, label, _ in q.history:
                if label and t.has_text[g]:
                    gs.append(g)
                    ws.append(self.decay ** len(ws))
                    if len(gs) >= self.max_hist:
                        break
            if gs:
                u[r] = np.asarray(ws, dtype=np.float32) @ t.centered(np.asarray(gs))
        return u @ t.centered(t.rows(p)).T


class TextVectors:
    """Unit-length centred text vectors of every table row (rows without text: zeros),
    refreshed when rows were added."""

    def __init__(self, table: ItemTable) -> None:
        self.t = table
        self._x = np.zeros((0, table.text_dim), dtype=np.float32)

    def all(self) -> np.ndarray:
        if self._x.shape[0] != len(self.t):
            x = unit_rows(self.t.centered(np.arange(len(self.t))))
            x[~np.asarray(self.t.has_text, dtype=bool)] = 0.0
            self._x = x
        return self._x

    def kernel(self, qs: list[Query], p: str, n: int, beta: float
               ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(each query's last ``n`` positives' vectors, ``p``'s catalog vectors, their
        :func:`models.coldtext.kernel_mean`), kept for the last batch's queries so that
        candidates differing only in α or half-life share one product."""
        key = (p, n, beta)
        memo = self.__dict__.setdefault("_kernel", {})
        hit = memo.get(key)
        if hit is None or hit[0] is not qs:
            hist = [self.positives(q, n) for q in qs]
            cat = self.all()[self.t.rows(p)]
            hit = memo[key] = (qs, (hist, cat, kernel_mean(hist, cat, beta)))
        return hit[1]

    def positives(self, q: Query, n: int, skip_plat: int | None = None) -> np.ndarray:
        """[≤ n, D]: the user's last ``n`` distinct positives with text (newest first),
        those of platform index ``skip_plat`` left out."""
        t, x = self.t, self.all()
        out: list[int] = []
        for g in recent_positives(q, 4 * n):
            if t.has_text[g] and (skip_plat is None or t.plat[g] != skip_plat):
                out.append(g)
                if len(out) >= n:
                    break
        return x[np.asarray(out, dtype=np.int64)]


def cross_cold(q: Query, table: ItemTable) -> bool:
    """No history on the query's platform, a positive on another one: the asks the
    served hybrid gives the text prior (``XREC_COLD_TEXT_WEIGHT``)."""
    pi = table.platform_index(q.platform)
    plat = table.plat
    if any(plat[g] == pi for g, _, _ in q.history):
        return False
    return any(label for _, label, _ in q.history)


class TextPop(Method):
    """Popularity times the texts of the user's recent positives (``models.coldtext``).

    Candidates that share a half-life share one :class:`Popularity`: it learns each batch
    once, whichever of them is asked first."""

    name = "textpop"

    def __init__(self, table: ItemTable, vecs: TextVectors, pop: Popularity, beta: float,
                 alpha: float, hist: int = 20) -> None:
        self.t, self.v, self.pop, self.beta, self.alpha = table, vecs, pop, beta, alpha
        self.hist = hist

    def params(self) -> dict[str, object]:
        return {**self.pop.params(), "beta": self.beta, "alpha": self.alpha,
                "hist": self.hist}

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        hist, cat, m = self.v.kernel(qs, p, self.hist, self.beta)
        return text_prior(hist, cat, self.pop.vec(p), self.beta, self.alpha, m)

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        if self.pop.__dict__.get("_learnt_batch") is not batch:
            self.pop.learn(qs, batch)
            self.pop._learnt_batch = batch  # type: ignore[attr-defined]


class Tuned(Method):
    """One method's candidate settings; the best on the warm-up is kept.

    While fewer than ``warm_events`` events have been learnt, every candidate ranks and
    learns; the batch is ranked with the candidate whose NDCG@10 over the *earlier* warm-up
    batches is best (a batch's own outcomes count only after it is ranked). Then the best
    one is kept and the others dropped.
    """

    def __init__(self, name: str, candidates: Sequence[Method], warm_events: int) -> None:
        if not candidates:
            raise ValueError("Tuned needs at least one candidate")
        self.name, self.cands, self.warm = name, list(candidates), warm_events
        self.gain = [0.0] * len(self.cands)
        self.count = 0
        self.pending = [0.0] * len(self.cands)
        self.learnt = 0
        self.chosen: Method | None = self.cands[0] if len(self.cands) == 1 else None
        self.grid: dict[str, float] | None = None  # each candidate's warm-up NDCG@10

    def _best(self) -> int:
        return max(range(len(self.cands)), key=lambda k: (self.gain[k], -k))

    def _table(self) -> dict[str, float]:
        per = max(self.count, 1)
        return {",".join(f"{k}={v}" for k, v in c.params().items()) or "default":
                round(g / per, 5) for c, g in zip(self.cands, self.gain, strict=True)}

    def params(self) -> dict[str, object]:
        out = dict((self.chosen or self.cands[self._best()]).params())
        if self.grid is not None or len(self.cands) > 1:
            out["chosen_on_warmup"] = self.chosen is not None
            out["warmup_ndcg@10"] = self.grid if self.grid is not None else self._table()
        return out

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        if self.chosen is not None:
            return self.chosen.scores(qs, p)
        best = self._best()
        out: np.ndarray | None = None
        for k, m in enumerate(self.cands):
            s = m.scores(qs, p)
            for r, q in enumerate(qs):
                if q.rank_eval:
                    rank, _ = rank_of(s[r], q.local, q.seen)
                    if rank < 10:
                        self.pending[k] += 1.0 / math.log2(rank + 2.0)
            if k == best:
                out = s
        assert out is not None
        return out

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        if self.chosen is not None:
            self.chosen.learn(qs, batch)
            return
        for k, m in enumerate(self.cands):
            m.learn(qs, batch)
            self.gain[k] += self.pending[k]
            self.pending[k] = 0.0
        self.count += sum(q.rank_eval for q in qs)
        self.learnt += len(batch)
        if self.learnt >= self.warm:
            best = self._best()
            self.grid = self._table()
            self.chosen = self.cands[best]
            self.cands, self.gain = [self.chosen], [self.gain[best]]  # free the others


class Hybrid(Method):
    """A model's scores ⊕ ``lam`` × the worker's popco scores, each standardised per query
    (what the worker serves as xrec, ``streams/heads.py``; ``lam`` = ``XREC_HYBRID_WEIGHT``).

    Neither part learns here: the run trains ``model`` and ``popco`` once per batch
    (``models.prequential``), so the hybrid has exactly their information."""

    def __init__(self, name: str, model: Method, popco: PopCo, lam: float,
                 cold: tuple[float, float, float, int] = (0.0, 10.0, 0.3, 20),
                 vecs: TextVectors | None = None, cold_grid: Sequence[float] = ()) -> None:
        self.name, self.model, self.popco, self.lam = name, model, popco, lam
        #: (starting weight, β, α, positives) of the text prior on cross-platform cold asks
        self.cold = cold
        self.vecs = vecs if vecs is not None else TextVectors(popco.t)
        on = cold[0] > 0 or any(g > 0 for g in cold_grid)
        #: the prior's weight, chosen online among ``cold_grid`` (the worker's ColdWeight)
        self.coldw = ColdWeight(cold_grid, cold[0]) if on else None
        self._pending: list[tuple[list[Query], list[int], np.ndarray, np.ndarray]] = []

    def params(self) -> dict[str, object]:
        start, beta, alpha, hist = self.cold
        cw = self.coldw
        return {"hybrid_weight": self.lam, "cold_text": {
            "weight_start": start, "grid": [] if cw is None else [float(g) for g in cw.grid],
            "weight_now": 0.0 if cw is None else cw.weight, "beta": beta, "alpha": alpha,
            "hist": hist}, **self.model.params()}

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        s = self.model.scores(qs, p)
        if self.lam == 0 and self.coldw is None:
            return s
        out = standardised(s) + self.lam * standardised(self.popco.scores(qs, p))
        if self.coldw is not None:
            t = self.popco.t
            cold = [r for r, q in enumerate(qs) if cross_cold(q, t)]
            if cold:
                _, beta, alpha, hist = self.cold
                prior = standardised(text_prior(
                    [self.vecs.positives(qs[r], hist) for r in cold],
                    self.vecs.all()[t.rows(p)], self.popco.pop.vec(p), beta, alpha))
                self._pending.append((qs, cold, out[cold], prior))
                out[cold] += self.coldw.weight * prior
        return out

    def learn(self, qs: list[Query], batch: Sequence[object]) -> None:
        """The prior's weight learns from the batch's cold asks, after they were ranked
        (the model and popco are trained by the run, not here)."""
        if self.coldw is None:
            return
        for pq, rows, base, prior in self._pending:
            keep = [j for j, r in enumerate(rows) if pq[r].rank_eval]
            if not keep:
                continue
            b = base[keep].copy()
            for j, r in enumerate(rows[k] for k in keep):
                b[j, pq[r].seen] = -np.inf  # the run's exclusions (none for a cold start)
            self.coldw.learn(b, prior[keep], [pq[rows[k]].local for k in keep])
        self._pending = []
