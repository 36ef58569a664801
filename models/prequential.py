"""Prequential (test-then-train) evaluation of xrec and its baselines over one event stream.

The stream is cut into micro-batches, as in the worker. For each batch, every method first
ranks each event's item with what it knew *before the batch*; then it learns from the batch.
Ranking queries are positive events whose item the user had not had yet on that platform;
the candidates are the platform's whole catalog minus the user's earlier items. Methods:

* ``xrec``            :class:`models.heads.HeadsModel`, trained online on every batch
* ``xrec_frozen``     the same model, trained during the warm-up only, then frozen
* ``popularity``      time-decayed item popularity (half-life in seconds of event time)
* ``cooccurrence``    items co-consumed with the user's recent positives (as the worker)
* ``text_zero_shot``  cosine of item text vectors to the user's recent positive items'
                      (the language model with no training at all)

Groups: overall, per platform, and ``coldstart``: the user's first interaction on this
platform while having history on another one (cross-platform cold start).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from models.heads import HeadsModel, History, ItemTable, ModelConfig
from models.metrics import PointwiseStats, RankingStats, rank_of
from models.trainer import Example, OnlineTrainer, TrainConfig

__all__ = ["Event", "Query", "EvalConfig", "Prequential", "METHODS"]

log = logging.getLogger("xrec.eval")
METHODS = ("xrec", "popularity", "cooccurrence", "text_zero_shot", "xrec_frozen")


class Event(NamedTuple):
    user: str
    platform: str
    item: str
    label: int
    weight: float
    time: float


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
    uid: int = 0  # dense user number (baselines keep per-user state by it)


@dataclass
class EvalConfig:
    batch: int = 256
    warmup: float = 0.2  # share of events after which xrec_frozen stops learning
    hist_len: int = 50
    pop_half_life_s: float = 3 * 86400.0
    cooc_window: int = 5
    cooc_max_items: int = 20000
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    methods: tuple[str, ...] = METHODS


class Method:
    name = ""

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        """[len(qs), catalog size of p]."""
        raise NotImplementedError

    def learn(self, qs: list[Query], batch: list[Event]) -> None:
        pass


class Popularity(Method):
    name = "popularity"

    def __init__(self, table: ItemTable, half_life_s: float) -> None:
        self.t, self.hl = table, half_life_s
        self.w: dict[str, np.ndarray] = {}
        self.anchor: float | None = None

    def _vec(self, p: str) -> np.ndarray:
        n = len(self.t.rows(p))
        v = self.w.get(p)
        if v is None or len(v) < n:
            grown = np.zeros(n)
            if v is not None:
                grown[: len(v)] = v
            self.w[p] = v = grown
        return v

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        return np.broadcast_to(self._vec(p), (len(qs), len(self.t.rows(p))))

    def learn(self, qs: list[Query], batch: list[Event]) -> None:
        for q in qs:
            if not q.label:
                continue
            if self.anchor is None:
                self.anchor = q.time
            e = (q.time - self.anchor) / self.hl
            if e > 60:  # rebase: rescale every weight to a new anchor
                for v in self.w.values():
                    v *= 2.0 ** (-e)
                self.anchor, e = q.time, 0.0
            self._vec(q.platform)[q.local] += 2.0 ** max(e, -1000.0)


class Cooccurrence(Method):
    """cooc(h, i) += w / k for the user's k-th most recent earlier positive h (as apply.lua)."""

    name = "cooccurrence"

    def __init__(self, table: ItemTable, window: int, max_items: int) -> None:
        self.t, self.win, self.max = table, window, max_items
        self.m: dict[str, np.ndarray] = {}
        self.recent: dict[tuple[int, str], deque[int]] = {}

    def _mat(self, p: str) -> np.ndarray:
        n = len(self.t.rows(p))
        if n > self.max:
            raise MemoryError(f"co-occurrence baseline: {n} items on {p} > {self.max}")
        m = self.m.get(p)
        if m is None or m.shape[0] < n:
            grown = np.zeros((max(n, 64), max(n, 64)), dtype=np.float32)
            if m is not None:
                grown[: m.shape[0], : m.shape[1]] = m
            self.m[p] = m = grown
        return m

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        m = self._mat(p)
        n = len(self.t.rows(p))
        out = np.zeros((len(qs), n), dtype=np.float32)
        for r, q in enumerate(qs):
            for k, h in enumerate(self.recent.get((q.uid, p), ()), start=1):
                out[r] += m[h, :n] / k
        return out

    def learn(self, qs: list[Query], batch: list[Event]) -> None:
        for q in qs:
            if not q.label:
                continue
            m = self._mat(q.platform)
            key = (q.uid, q.platform)
            rec = self.recent.setdefault(key, deque(maxlen=self.win))
            for k, h in enumerate(rec, start=1):
                if h != q.local:
                    m[h, q.local] += 1.0 / k
                    m[q.local, h] += 1.0 / k
            if q.local in rec:
                rec.remove(q.local)
            rec.appendleft(q.local)


class TextZeroShot(Method):
    name = "text_zero_shot"

    def __init__(self, table: ItemTable, decay: float = 0.9, max_hist: int = 20) -> None:
        self.t, self.decay, self.max_hist = table, decay, max_hist

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


class Model(Method):
    def __init__(self, name: str, model: HeadsModel, table: ItemTable, trainer: OnlineTrainer,
                 learn_until: int | None = None) -> None:
        self.name, self.model, self.t, self.trainer = name, model, table, trainer
        self.learn_until = learn_until
        self.seen_events = 0
        self._items: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._version = 0
        #: (from, until) event time: histories then count only events from ``from`` on
        self.horizon: tuple[float, float] | None = None

    def _hist(self, q: Query) -> list[tuple[int, int, float]]:
        if self.horizon is None or not self.horizon[0] <= q.time < self.horizon[1]:
            return q.history
        return [h for h in q.history if h[2] >= self.horizon[0]]

    def scores(self, qs: list[Query], p: str) -> np.ndarray:
        m = self.model
        m.add_platform(p)
        rows = self.t.rows(p)
        hit = self._items.get(p)
        with torch.no_grad():
            if hit is None or hit[0] != self._version or len(hit[1]) != len(rows):
                e, b = m.item_emb(self.t, rows)
                self._items[p] = hit = (self._version, e, b)
            h = History.build([self._hist(q) for q in qs], [q.time for q in qs],
                              [self.t.platform_index(p)] * len(qs), m.cfg.hist_len,
                              m.cfg.gap_buckets)
            s = m.scores(m.user(self.t, h), hit[1], hit[2])
        return s.float().cpu().numpy()

    def learn(self, qs: list[Query], batch: list[Event]) -> None:
        self.seen_events += len(batch)
        if self.learn_until is not None and self.seen_events > self.learn_until:
            return
        ex = [Example(q.platform, q.gid, self._hist(q), q.time, 1.0) for q in qs if q.label]
        if self.trainer.learn(ex):
            self._version += 1


class Prequential:
    """Feeds events through every method, test-then-train, and keeps the metrics."""

    def __init__(self, catalog: dict[str, tuple[Sequence[str], np.ndarray]],
                 cfg: EvalConfig | None = None) -> None:
        self.cfg = cfg = cfg or EvalConfig()
        text_dim = next((v.shape[1] for _, v in catalog.values() if len(v)), cfg.model.text_dim)
        cfg.model.text_dim = text_dim
        cfg.model.hist_len = cfg.hist_len
        self.table = ItemTable(text_dim, cfg.model.buckets)
        for p, (ids, vecs) in catalog.items():
            self.table.set_text(p, list(ids), vecs)
        self.device = torch.device("cuda" if cfg.device in ("auto", "cuda")
                                   and torch.cuda.is_available() else "cpu")
        self.methods: list[Method] = []
        self.hist: dict[str, deque[tuple[int, int, float]]] = {}
        self.seen: dict[tuple[str, str], set[int]] = {}
        self.ranking: dict[tuple[str, str], RankingStats] = {}
        self.pointwise: dict[tuple[str, str], PointwiseStats] = {}
        self.events = 0
        self.evaluated = 0
        self._uid: dict[str, int] = {}
        #: called after each batch is ranked, before anything learns from it:
        #: observer(batch, queries, {method: [rank or None per query]})
        self.observers: list[Callable[[list[Event], list[Query], dict[str, list[float | None]]],
                                      None]] = []

    def _build(self, total: int | None) -> None:
        cfg, t = self.cfg, self.table
        model = HeadsModel(cfg.model, t.platforms).to(self.device)
        if "xrec" in cfg.methods:
            self.methods.append(Model("xrec", model, t, OnlineTrainer(model, t, cfg.train)))
        if "popularity" in cfg.methods:
            self.methods.append(Popularity(t, cfg.pop_half_life_s))
        if "cooccurrence" in cfg.methods:
            self.methods.append(Cooccurrence(t, cfg.cooc_window, cfg.cooc_max_items))
        if "text_zero_shot" in cfg.methods:
            self.methods.append(TextZeroShot(t))
        if "xrec_frozen" in cfg.methods:
            warm = int(cfg.warmup * total) if total else 10000
            fm = HeadsModel(cfg.model, t.platforms).to(self.device)
            fm.load_state_dict(model.state_dict())
            tr = copy.deepcopy(cfg.train)
            self.methods.append(Model("xrec_frozen", fm, t, OnlineTrainer(fm, t, tr),
                                      learn_until=warm))

    def run(self, events: Iterable[Event], total: int | None = None,
            progress: Callable[[int], None] | None = None) -> None:
        self._build(total)
        batch: list[Event] = []
        for ev in events:
            batch.append(ev)
            if len(batch) >= self.cfg.batch:
                self.step(batch)
                batch = []
                if progress:
                    progress(self.events)
        if batch:
            self.step(batch)
            if progress:
                progress(self.events)

    def step(self, batch: list[Event]) -> None:
        t = self.table
        qs: list[Query] = []
        for ev in batch:
            g = t.ensure(ev.platform, ev.item)
            h = self.hist.setdefault(ev.user, deque(maxlen=self.cfg.hist_len))
            seen = self.seen.setdefault((ev.user, ev.platform), set())
            other = any(t.platforms[t.plat[hg]] != ev.platform for hg, _, _ in h)
            q = Query(ev.platform, g, t.local[g], int(ev.label), float(ev.time),
                      list(reversed(h)), np.fromiter((t.local[s] for s in seen), np.int64,
                                                     len(seen)),
                      bool(ev.label) and g not in seen, not seen and other,
                      self._uid.setdefault(ev.user, len(self._uid)))
            qs.append(q)
            h.append((g, int(ev.label), float(ev.time)))
            seen.add(g)
        self.events += len(batch)
        by_plat: dict[str, list[Query]] = {}
        for q in qs:
            by_plat.setdefault(q.platform, []).append(q)
        self.evaluated += sum(q.rank_eval for q in qs)
        ranks: dict[str, list[float | None]] = {}
        pos = {id(q): i for i, q in enumerate(qs)}
        for m in self.methods:
            mr: list[float | None] = [None] * len(qs)
            ranks[m.name] = mr
            for p, pq in by_plat.items():
                s = m.scores(pq, p)
                for r, q in enumerate(pq):
                    rank, n = rank_of(s[r], q.local, q.seen)
                    if q.rank_eval:
                        mr[pos[id(q)]] = rank
                    groups = ("all", f"platform:{p}") + (("coldstart",) if q.coldstart else ())
                    pct = 1.0 - rank / max(n - 1, 1)
                    for grp in groups:
                        self.pointwise.setdefault((m.name, grp), PointwiseStats()).add(
                            pct, q.label)
                        if q.rank_eval:
                            self.ranking.setdefault((m.name, grp), RankingStats()).add(rank)
        for obs in self.observers:
            obs(batch, qs, ranks)
        for m in self.methods:
            m.learn(qs, batch)

    # ---------------------------------------------------------------- results
    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{method: {group: {metric: value}}}"""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (m, grp), st in self.ranking.items():
            out.setdefault(m, {}).setdefault(grp, {}).update(st.summary())
        for (m, grp), pt in self.pointwise.items():
            out.setdefault(m, {}).setdefault(grp, {}).update(pt.summary())
        return out

    def train_stats(self) -> dict[str, Any]:
        out = {}
        for m in self.methods:
            if isinstance(m, Model):
                st = m.trainer.stats
                ms = sorted(st.step_ms) or [math.nan]
                out[m.name] = {"steps": st.steps, "skipped_nonfinite": st.skipped_nonfinite,
                               "step_ms_p50": round(ms[len(ms) // 2], 2),
                               "device": str(self.device)}
        return out

