"""Prequential (test-then-train) evaluation of xrec and its baselines over one event stream.

The stream is cut into micro-batches, as in the worker. For each batch, every method first
ranks each event's item with what it knew *before the batch*; then it learns from the batch.
Every method ranks from the same :class:`models.baselines.Query` objects: the user's
history on every platform as of the event (earlier events of the same batch included), the
same exclusions, the same candidates (the platform's whole catalog minus the user's earlier
items there). Ranking queries are positive events on an item new to the user. Methods:

* ``xrec``            what the worker serves: the scores of :class:`models.heads.HeadsModel`,
                      trained online on every batch, ⊕ ``hybrid_weight`` × popco's, each
                      standardised per query (``XREC_HYBRID_WEIGHT``)
* ``xrec_model``      the model's scores alone (``XREC_HYBRID_WEIGHT=0``)
* ``xrec_frozen``     xrec with the model trained during the warm-up only, then frozen
                      (popco keeps counting: the ablation of online training)
* ``popularity``      time-decayed item popularity (half-life chosen on the warm-up)
* ``itemknn``         cosine item-kNN with a popularity fallback (window chosen on the warm-up)
* ``popco``           what the worker serves without the model (popularity ⊕ co-occurrence,
                      the worker's settings)
* ``sasrec``          a self-attentive sequential model over item ids (2 blocks, dim 64),
                      trained online with xrec's optimizer-step budget per micro-batch
                      (learning rate chosen on the warm-up; ``models/sasrec.py``)
* ``text_zero_shot``  cosine of item text vectors to the user's recent positive items'
                      (the language model with no training at all)

Baseline parameters are chosen on the first ``EvalConfig.warmup`` share of the stream only
(:class:`models.baselines.Tuned`) and reported with the results.

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

from models.baselines import (
    Hybrid,
    ItemKNN,
    Method,
    PopCo,
    Popularity,
    Query,
    TextPop,
    TextVectors,
    TextZeroShot,
    Tuned,
)
from models.heads import HeadsModel, History, ItemTable, ModelConfig
from models.metrics import PointwiseStats, RankingStats, rank_of
from models.sasrec import SASRec, SASRecConfig
from models.trainer import Example, OnlineTrainer, TrainConfig

__all__ = ["Event", "Query", "Method", "EvalConfig", "Prequential", "METHODS"]

log = logging.getLogger("xrec.eval")
METHODS = ("xrec", "xrec_model", "popularity", "itemknn", "popco", "sasrec", "text_zero_shot",
           "textpop", "xrec_frozen")
DAY = 86400.0


class Event(NamedTuple):
    user: str
    platform: str
    item: str
    label: int
    weight: float
    time: float


@dataclass
class EvalConfig:
    batch: int = 256
    warmup: float = 0.2  # share of events after which xrec_frozen stops learning
    hist_len: int = 50
    #: popularity's half-lives to choose from on the warm-up (inf: plain counts)
    pop_half_lives_s: tuple[float, ...] = (3600.0, DAY, 7 * DAY, 30 * DAY, math.inf)
    #: itemknn: the user's last positives it scores from, to choose from on the warm-up
    knn_score_windows: tuple[int, ...] = (5, 20, 50)
    knn_fit_window: int = 50
    #: popco: the worker's settings (``XREC_POPULARITY_HALF_LIFE_S``, ``XREC_COOC_*``)
    popco_half_life_s: float = 3 * DAY
    popco_window: int = 5
    popco_keep: int = 200
    popco_read: int = 50
    popco_blend: float = 0.7
    max_items: int = 12000  # dense co-count matrices of itemknn and popco; sasrec's id rows
    #: xrec = the model's scores + hybrid_weight × popco's, both standardised per query: the
    #: worker's ``XREC_HYBRID_WEIGHT`` (0 = the model alone)
    hybrid_weight: float = 0.2
    #: xrec's text prior on cross-platform cold asks (``models/coldtext.py``): starting
    #: weight, β, α, positives read, and the weights it chooses among online — the worker's
    #: ``XREC_COLD_TEXT_{WEIGHT,BETA,ALPHA,HIST,WEIGHTS}``
    cold_text: tuple[float, float, float, int] = (1.0, 10.0, 0.3, 20)
    cold_text_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    #: textpop: β, α and popularity half-lives to choose from on the warm-up
    textpop_betas: tuple[float, ...] = (5.0, 10.0, 20.0)
    textpop_alphas: tuple[float, ...] = (0.1, 0.3, 1.0)
    textpop_half_lives_s: tuple[float, ...] = (DAY, 30 * DAY)
    #: sasrec: learning rates to choose from on the warm-up (the rest: models/sasrec.py)
    sasrec_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    methods: tuple[str, ...] = METHODS


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
        return self._memoised(qs, p, self._version, self._scores)

    def _scores(self, qs: list[Query], p: str) -> np.ndarray:
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
        ex = [Example(q.platform, q.gid, self._hist(q), q.time, 1.0, f"u{q.uid}")
              for q in qs if q.label]
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
        self.parts: list[Method] = []  # trained each batch but not ranked (see _build)
        self.online: Model | None = None
        self.hist: dict[str, deque[tuple[int, int, float]]] = {}
        self.seen: dict[tuple[str, str], set[int]] = {}
        self.ranking: dict[tuple[str, str], RankingStats] = {}
        self.pointwise: dict[tuple[str, str], PointwiseStats] = {}
        self.events = 0
        self.evaluated = 0
        self._uid: dict[str, int] = {}
        #: method → {dense user: Σ NDCG@10 gain over the user's ranked events} (bootstrap)
        self.user_gain: dict[str, dict[int, float]] = {}
        #: dense user → ranked events (the same for every method)
        self.user_n: dict[int, int] = {}
        #: called after each batch is ranked, before anything learns from it:
        #: observer(batch, queries, {method: [rank or None per query]})
        self.observers: list[Callable[[list[Event], list[Query], dict[str, list[float | None]]],
                                      None]] = []

    def _build(self, total: int | None) -> None:
        cfg, t = self.cfg, self.table
        ms = cfg.methods
        model = HeadsModel(cfg.model, t.platforms).to(self.device)
        #: the online model (xrec_model); xrec is it ⊕ hybrid_weight × popco, as served
        self.online = online = Model("xrec_model", model, t, OnlineTrainer(model, t, cfg.train))
        popco = PopCo(t, cfg.popco_half_life_s, cfg.popco_window, cfg.popco_keep,
                      cfg.popco_blend, cfg.max_items, read=cfg.popco_read)
        warm = int(cfg.warmup * total) if total else 10000
        vecs = TextVectors(t)
        if "xrec" in ms:
            self.methods.append(Hybrid("xrec", online, popco, cfg.hybrid_weight,
                                       cfg.cold_text, vecs, cfg.cold_text_grid))
        if "xrec_model" in ms:
            self.methods.append(online)
        if "popularity" in ms:
            self.methods.append(Tuned("popularity", [Popularity(t, hl)
                                                     for hl in cfg.pop_half_lives_s], warm))
        if "itemknn" in ms:
            self.methods.append(Tuned("itemknn", [
                ItemKNN(t, cfg.knn_fit_window, w, cfg.max_items) for w in cfg.knn_score_windows],
                warm))
        if "popco" in ms:
            self.methods.append(popco)
        if "sasrec" in ms:
            tc = cfg.train  # the same optimizer-step budget per micro-batch as xrec
            self.methods.append(Tuned("sasrec", [SASRec(t, SASRecConfig(
                lr=lr, steps=tc.steps, replay=tc.replay, replay_share=tc.replay_share,
                capacity=cfg.max_items, max_len=cfg.hist_len, seed=tc.seed), self.device)
                for lr in cfg.sasrec_lrs], warm))
        if "text_zero_shot" in ms:
            self.methods.append(TextZeroShot(t))
        if "textpop" in ms:
            cands: list[Method] = []
            for hl in cfg.textpop_half_lives_s:
                pop = Popularity(t, hl)
                cands += [TextPop(t, vecs, pop, b, a)
                          for b in cfg.textpop_betas for a in cfg.textpop_alphas]
            self.methods.append(Tuned("textpop", cands, warm))
        if "xrec_frozen" in ms:
            fm = HeadsModel(cfg.model, t.platforms).to(self.device)
            fm.load_state_dict(model.state_dict())
            frozen = Model("xrec_frozen_model", fm, t,
                           OnlineTrainer(fm, t, copy.deepcopy(cfg.train)), learn_until=warm)
            self.methods.append(Hybrid("xrec_frozen", frozen, popco, cfg.hybrid_weight,
                                       cfg.cold_text, vecs, cfg.cold_text_grid))
            self.parts.append(frozen)
        # parts a hybrid ranks with that the run does not list: trained here, once a batch
        if "xrec" in ms and "xrec_model" not in ms:
            self.parts.append(online)
        if ("xrec" in ms or "xrec_frozen" in ms) and "popco" not in ms:
            self.parts.append(popco)

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
                      self._uid.setdefault(ev.user, len(self._uid)), float(ev.weight))
            qs.append(q)
            h.append((g, int(ev.label), float(ev.time)))
            seen.add(g)
        self.events += len(batch)
        by_plat: dict[str, list[Query]] = {}
        for q in qs:
            by_plat.setdefault(q.platform, []).append(q)
        self.evaluated += sum(q.rank_eval for q in qs)
        for q in qs:
            if q.rank_eval:
                self.user_n[q.uid] = self.user_n.get(q.uid, 0) + 1
        ranks: dict[str, list[float | None]] = {}
        pos = {id(q): i for i, q in enumerate(qs)}
        for m in self.methods:
            mr: list[float | None] = [None] * len(qs)
            ranks[m.name] = mr
            ug = self.user_gain.setdefault(m.name, {})
            for p, pq in by_plat.items():
                s = m.scores(pq, p)
                for r, q in enumerate(pq):
                    rank, n = rank_of(s[r], q.local, q.seen)
                    if q.rank_eval:
                        mr[pos[id(q)]] = rank
                        if rank < 10:
                            ug[q.uid] = ug.get(q.uid, 0.0) + 1.0 / math.log2(rank + 2.0)
                    groups = ("all", f"platform:{p}") + (("coldstart",) if q.coldstart else ())
                    pct = 1.0 - rank / max(n - 1, 1)
                    for grp in groups:
                        self.pointwise.setdefault((m.name, grp), PointwiseStats()).add(
                            pct, q.label)
                        if q.rank_eval:
                            self.ranking.setdefault((m.name, grp), RankingStats()).add(rank)
        for obs in self.observers:
            obs(batch, qs, ranks)
        for m in (*self.methods, *self.parts):
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

    def ratio_ci(self, a: str, b: str, reps: int = 2000, seed: int = 0
                 ) -> tuple[float, float] | None:
        """95% interval of NDCG@10(a) / NDCG@10(b) by a paired bootstrap over users: each
        resample draws users with replacement and keeps all of their ranked events for both
        methods (so the ratio's spread is that of the users, not of independent events)."""
        users = sorted(self.user_n)
        if not users or a not in self.user_gain or b not in self.user_gain:
            return None
        ga = np.array([self.user_gain[a].get(u, 0.0) for u in users])
        gb = np.array([self.user_gain[b].get(u, 0.0) for u in users])
        rng = np.random.default_rng(seed)
        n = len(users)
        step = max(1, 2_000_000 // n)  # resamples per chunk: weights stay ≤ 16 MB
        num, den = np.empty(reps), np.empty(reps)
        for lo in range(0, reps, step):
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(step, reps - lo))
            num[lo:lo + len(w)], den[lo:lo + len(w)] = w @ ga, w @ gb
        ok = den > 0
        if not ok.any():
            return None
        r = num[ok] / den[ok]
        lo, hi = np.percentile(r, [2.5, 97.5])
        return float(lo), float(hi)

    def params(self) -> dict[str, dict[str, Any]]:
        """{method: the settings it ranked with (and, if tuned, the warm-up grid)}"""
        return {m.name: m.params() for m in self.methods}

    def train_stats(self) -> dict[str, Any]:
        """{learned method: optimizer steps, non-finite steps skipped, p50 ms per step}"""
        out = {}
        for m in self.methods:
            inner = m.model if isinstance(m, Hybrid) else m
            if isinstance(inner, Model):
                steps, skipped, step_ms = (inner.trainer.stats.steps,
                                           inner.trainer.stats.skipped_nonfinite,
                                           inner.trainer.stats.step_ms)
            elif isinstance(m, Tuned) and isinstance(m.chosen or m.cands[0], SASRec):
                sm: SASRec = m.chosen or m.cands[0]  # type: ignore[assignment]
                steps, skipped, step_ms = sm.steps, 0, sm.step_ms
            else:
                continue
            ms = sorted(step_ms) or [math.nan]
            out[m.name] = {"steps": steps, "skipped_nonfinite": skipped,
                           "step_ms_p50": round(ms[len(ms) // 2], 2),
                           "device": str(self.device)}
        return out
