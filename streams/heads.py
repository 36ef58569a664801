"""The learned model in the stream: head registry in Redis, serving, online training.

Redis (binary values, prefix ``XREC_REDIS_PREFIX``)::

    heads:version   int     bumped by every publish (monotonic)
    heads:blob      bytes   the weights of that version (torch.save, float16 tensors)
    heads:meta      hash    HeadVersion fields of that version (JSON under "record")
    heads:swaps     list    newest first: {version, worker, used_after_s, event_to_use_s}
    heads:lease     str     the token of the one trainer allowed to publish (expires)

One MULTI/EXEC writes version, blob and meta together, and recommenders read them in one
MULTI/EXEC, so a recommender never pairs a version number with another version's weights.
Recommenders poll ``heads:version`` (a GET every ``XREC_HEAD_POLL_S``) rather than consume
``xrec.models.heads``: a consumer group would hand each HeadVersion to one worker only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from models.coldtext import ColdWeight, text_prior, unit_rows
from models.heads import (
    HeadsModel,
    History,
    ItemTable,
    ModelConfig,
    ServingTower,
    load_model,
    pick_device,
    save_model,
)
from models.metrics import RankingStats
from models.popco import popco_dense, standardised
from models.trainer import Example, OnlineTrainer, TrainConfig
from streams.explain import model_reasons, popco_reason
from streams.records import HeadVersion, QualityWindow, TrainingExample
from streams.settings import Settings
from streams.state import is_cluster, redis_from_url, row_lookup
from streams.vectors import VectorStore

__all__ = ["HeadRegistry", "ModelServer", "Ask", "TrainerService", "model_config", "examples_json",
           "recent_positives", "LeaseLost"]

log = logging.getLogger("xrec.heads")


def model_config(s: Settings, text_dim: int) -> ModelConfig:
    return ModelConfig(text_dim=text_dim, dim=s.model_dim, hist_len=s.hist_len,
                       buckets=s.model_buckets, seed=s.model_seed)


class LeaseLost(RuntimeError):
    """A fenced publish found the head lease held by another trainer (or by nobody)."""


#: KEYS lease, version, blob, meta; ARGV token, blob, record JSON, lease ms → version or -1
_LUA_FENCED_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local v = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[4], 'record', ARGV[3])
return v
"""
#: KEYS lease; ARGV token, ms → 2 taken, 1 renewed, 0 held by another
_LUA_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""
_LUA_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class HeadRegistry:
    """Head versions in Redis. One writer: the train agent holding ``heads:lease``
    (:meth:`lease`; its publishes are fenced by the lease token, :meth:`publish`)."""

    def __init__(self, url: str, prefix: str, timeout_s: float | None = None) -> None:
        self.r = redis_from_url(url, timeout_s, decode=False)
        self.p = prefix
        self.lease_ms = 10_000
        self._fenced_publish = self.r.register_script(_LUA_FENCED_PUBLISH)
        self._lease = self.r.register_script(_LUA_LEASE)
        self._release = self.r.register_script(_LUA_RELEASE)

    def k(self, name: str) -> str:
        if is_cluster(self.r):  # one slot: MULTI and the lease scripts touch several keys
            return f"{self.p}{{heads}}:{name}"
        return f"{self.p}heads:{name}"

    async def version(self) -> int:
        return int(await self.r.get(self.k("version")) or 0)

    async def publish(self, blob: bytes, record: dict[str, Any], token: str | None = None
                      ) -> int:
        """Write the next version (number, weights, meta) in one step. With ``token``
        (what the train agent passes) the write is fenced: one Lua script checks that
        ``heads:lease`` still holds this token and writes the version only then (and
        extends the lease), else raises :class:`LeaseLost` having written nothing. A
        trainer that lost its lease (a GC pause, a partition, a slow Redis) can therefore
        never interleave its versions with its successor's. Without ``token`` (tests,
        benchmarks, single-process tools) the write is unfenced."""
        if token is not None:
            v = await self._fenced_publish(
                keys=[self.k("lease"), self.k("version"), self.k("blob"), self.k("meta")],
                args=[token, blob, json.dumps(record), self.lease_ms])
            if int(v) < 0:
                raise LeaseLost(f"head lease {self.k('lease')} is not held by this trainer: "
                                "the version was not published")
            return int(v)
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(self.k("version"))
        pipe.set(self.k("blob"), blob)
        pipe.hset(self.k("meta"), mapping={"record": json.dumps(record)})
        v, _, _ = await pipe.execute()
        return int(v)

    async def lease(self, token: str, ttl_s: float | None = None) -> int:
        """Take or renew the single-writer lease (``heads:lease`` = token, expiring after
        ``ttl_s``): 2 = taken now (it was free), 1 = renewed (this token held it),
        0 = another trainer holds it."""
        if ttl_s is not None:
            self.lease_ms = max(1, int(ttl_s * 1000))
        return int(await self._lease(keys=[self.k("lease")], args=[token, self.lease_ms]))

    async def lease_holder(self) -> str | None:
        v = await self.r.get(self.k("lease"))
        return v.decode() if isinstance(v, bytes) else v

    async def release_lease(self, token: str) -> bool:
        """Give the lease up (graceful stop) if this token holds it: a standby takes
        over at its next try instead of after the lease's time to live."""
        return bool(await self._release(keys=[self.k("lease")], args=[token]))

    async def latest(self) -> tuple[int, bytes | None, dict[str, Any]]:
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.k("version"))
        pipe.get(self.k("blob"))
        pipe.hget(self.k("meta"), "record")
        v, blob, meta = await pipe.execute()
        return int(v or 0), blob, json.loads(meta) if meta else {}

    async def note_swap(self, info: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.lpush(self.k("swaps"), json.dumps(info))
        pipe.ltrim(self.k("swaps"), 0, 999)
        await pipe.execute()


class _Tables:
    """Keeps an :class:`ItemTable` in step with the worker's in-memory item vectors.

    ``stamp`` moves whenever a text vector is set or replaced: item embeddings computed
    under an older stamp are stale (centering uses each platform's mean text vector)."""

    def __init__(self, vectors: VectorStore, buckets: int) -> None:
        self.vectors = vectors
        self.table = ItemTable(vectors.dim, buckets)
        self.stamp = 0
        self._seen: dict[str, tuple[int, int, int]] = {}

    def sync(self) -> bool:
        changed = False
        for p, idx in list(self.vectors.index.items()):
            mark = (id(idx), len(idx), getattr(idx, "version", 0))
            if self._seen.get(p) != mark:
                self.table.set_text(p, list(idx.ids), idx.matrix)
                self._seen[p] = mark
                changed = True
        if changed:
            self.stamp += 1
        return changed

    def gid_history(self, hist: Sequence[tuple[str, str, int, float]]
                    ) -> list[tuple[int, int, float]]:
        get, ensure = self.table.gid.get, self.table.ensure
        out = []
        for p, i, lab, t in hist:
            g = get((p, i))
            out.append((ensure(p, i) if g is None else g, lab, t))
        return out


HistEntry = tuple[str, str, int, float]


@dataclass
class Ask:
    """One ranking request: a user's history (newest first) and the platform to rank.

    With ``target`` (prequential) the answer is that item's rank, 0 = top (None when it
    is not in the catalog); otherwise the best ``k`` (item, score). Items in ``exclude``
    and ``extra`` (consumed ones) are not candidates; the target never counts as one.
    ``pop`` and ``co`` (:class:`streams.state.AggRow`): the platform's popularity and the
    co-occurrence rows of the user's recent positives there (newest first; ``co_src``:
    those items), for the model ⊕ popco hybrid (``XREC_HYBRID_WEIGHT``); without them the
    model ranks alone. An ask with no history on ``platform`` but positives elsewhere
    also gets the text prior (:meth:`ModelServer._cold_text`). ``why`` is set by
    :meth:`ModelServer.answer`: the reasons (:mod:`streams.explain`) of its best
    ``XREC_EXPLAIN_TOP`` items, as JSON."""

    history: Sequence[HistEntry]
    platform: str
    now: float
    exclude: Sequence[str] = ()
    extra: Sequence[str] = ()
    target: str | None = None
    pop: Any = None
    co: Sequence[Any] = ()
    co_src: Sequence[str] = ()
    why: list[str] | None = None


def recent_positives(history: Sequence[HistEntry], platform: str, n: int) -> list[str]:
    """The last ``n`` distinct positive items of ``platform`` in a history (newest first):
    the items whose co-occurrence rows popco sums (``models.baselines.recent_positives``)."""
    out: list[str] = []
    for p, item, label, _ in history:
        if label and p == platform and item not in out:
            out.append(item)
            if len(out) >= n:
                break
    return out


@dataclass
class _Served:
    """A head version ready to serve: its model, folded (:class:`ServingTower`: item
    embeddings and the user tower's per-item parts for every table row)."""

    version: int
    model: HeadsModel
    tower: ServingTower
    stamp: int  # the tables' stamp the tower was folded under
    #: platform → (catalog rows, their embeddings [n_p, d], biases [n_p]), by row count
    plat: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class ModelServer:
    """The head version a recommend worker serves, hot-swapped between micro-batches.

    A new version is loaded, and every item's embedding under it computed, in a thread
    (off the event loop); the loop only swaps one reference. Ranking a micro-batch is then
    one user-tower pass over every request and, per platform, one matrix product against
    the cached item embeddings, exclusions as a mask and top-K by partial sort
    (:meth:`answer`)."""

    def __init__(self, settings: Settings, vectors: VectorStore, worker: str) -> None:
        self.s = settings
        self.reg = HeadRegistry(settings.redis_url or "", settings.redis_prefix,
                                settings.redis_timeout_s)
        self.tables = _Tables(vectors, settings.model_buckets)
        self.cur: _Served | None = None
        self.worker = worker
        self.device = pick_device(settings.train_device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrec-heads")
        self.quality: dict[tuple[str, str], RankingStats] = {}
        #: (item table, its row → evidence JSON prefix) for explanations
        self._why_memo: tuple[Any, dict[int, str]] = (None, {})
        self.window_start = time.time()
        #: drift reaction: (from, until) event time; histories then start at ``from``
        self.horizon: tuple[float, float] | None = None
        #: platform → ((platform, text stamp, catalog size), unit centred texts): text prior
        self._cold_cache: dict[str, tuple[tuple[str, int, int], np.ndarray]] = {}
        grid = settings.cold_text_grid()
        #: the text prior's weight on cold asks, chosen online (None: off)
        self._coldw = (ColdWeight(grid, settings.cold_text_weight)
                       if settings.cold_text_weight > 0 or any(g > 0 for g in grid) else None)
        #: the last _hybrid call's cold asks: (rows, standardised prior, weight used)
        self._cold_last: tuple[list[int], np.ndarray, float] | None = None
        #: big catalogs (> XREC_ANN_MIN_ITEMS): platform → ANN index (models/ann.py), built in
        #: a thread of its own; the platforms whose build is running; per (version,
        #: platform) the catalog's score moments for the hybrid's standardisation
        self._ann: dict[str, Any] = {}
        self._ann_busy: dict[str, Any] = {}
        self._ann_mom: dict[tuple[int, str], tuple[int, tuple[torch.Tensor, ...]]] = {}
        self._ann_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrec-ann")
        # warm torch's code paths now, not on the first swap (measured: 4 s → <1 s)
        warm = HeadsModel(ModelConfig(text_dim=8, dim=8, hist_len=2, buckets=8), ["w"])
        load_model(save_model(warm, compact=True))

    def set_horizon(self, now: float, seconds: float) -> None:
        """From ``now`` for ``seconds``, users' histories count only events from ``now`` on
        (an active horizon keeps its start and is extended)."""
        old = self.horizon
        start = old[0] if old is not None and old[1] > now else now
        self.horizon = (start, now + seconds)
        log.warning("drift reaction: histories count from %.0f until %.0f", start, now + seconds)

    @property
    def version(self) -> int:
        return self.cur.version if self.cur is not None else 0

    @property
    def ready(self) -> bool:
        return self.cur is not None

    @property
    def scorer(self) -> str:
        return f"xrec-heads-v{self.version}"

    async def poll(self) -> bool:
        """Swap in a newer head version if there is one. Never goes backwards."""
        if await self.reg.version() <= self.version:
            return False
        v, blob, meta = await self.reg.latest()
        if v <= self.version or blob is None:
            return False
        self.tables.sync()
        snap, stamp = self.tables.table.snapshot(), self.tables.stamp
        loop = asyncio.get_running_loop()
        served = await loop.run_in_executor(self._pool, self._prepare, v, blob, snap, stamp)
        if served.version <= self.version:
            return False
        self.cur = served  # one assignment: the next micro-batch ranks with it
        now = time.time()
        used_after = now - float(meta.get("batch_arrived_at", now))
        e2u = now - float(meta.get("newest_produced_at", now))
        log.info("head v%d in use: %.2f s after its training batch arrived, %.2f s after its "
                 "newest event", v, used_after, e2u)
        try:
            await self.reg.note_swap({"version": v, "worker": self.worker,
                                      "used_after_s": round(used_after, 3),
                                      "event_to_use_s": round(e2u, 3), "at": now})
        except Exception as exc:  # noqa: BLE001 - bookkeeping only
            log.warning("could not record head swap: %s", exc)
        return True

    def _prepare(self, version: int, blob: bytes, snap: ItemTable, stamp: int) -> _Served:
        """In a thread: load the weights, fold the tower over every item known so far."""
        model = load_model(blob, self.device)
        return _Served(version, model, ServingTower(model, snap), stamp)

    # ---------------------------------------------------------------- scoring
    def _embeddings(self) -> _Served:
        """The served version's tower, brought up to the table: rows added since are
        folded alone; a changed text (new platform mean) or a new platform refolds all."""
        cur = self.cur
        assert cur is not None
        t = self.tables.table
        if cur.stamp != self.tables.stamp or any(p not in cur.tower.heads
                                                 for p in t.platforms):
            cur.tower, cur.stamp, cur.plat = ServingTower(cur.model, t), self.tables.stamp, {}
        else:
            cur.tower.grow(t)
        return cur

    def _catalog(self, cur: _Served, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Platform ``p``'s catalog embeddings [n_p, d] and biases, columns in
        :meth:`ItemTable.rows` order (cached per version and catalog size)."""
        rows = self.tables.table.rows(p)
        hit = cur.plat.get(p)
        if hit is None or hit[0] != len(rows):
            r = torch.from_numpy(rows).to(cur.tower.emb.device)
            hit = (len(rows), cur.tower.emb[r], cur.tower.bias[r])
            cur.plat[p] = hit
        return hit[1], hit[2]

    def answer(self, asks: Sequence[Ask], k: int, clock: Any = None
               ) -> list[float | None | list[tuple[str, float]]]:
        """Rank every ask: one user-tower pass for all of them, then per platform one
        matrix product for the prequential asks and one for the others.

        ``clock`` (optional) gets ``lap("tower" | "evaluate" | "rank")``."""
        assert self.cur is not None
        self.tables.sync()
        t = self.tables.table
        out: list[float | None | list[tuple[str, float]]] = [None] * len(asks)
        if not asks:
            return out
        # a user's asks (prequential, event platform, other platforms) share one history
        # list: convert each once (keyed by the list, and by the time when a horizon cuts)
        conv: dict[tuple[int, float], list[tuple[int, int, float]]] = {}
        hists = []
        for a in asks:
            key = (id(a.history), a.now if self.horizon is not None else 0.0)
            hv = conv.get(key)
            if hv is None:
                hv = conv[key] = self.tables.gid_history(cut(a.history, a.now, self.horizon))
            hists.append(hv)
        cur = self._embeddings()  # after the histories: they may add rows
        model = cur.model
        h = History.build(hists, [a.now for a in asks],
                          [t.platform_index(a.platform) for a in asks],
                          model.cfg.hist_len, model.cfg.gap_buckets)
        explain = self.s.explain_top > 0 and any(a.target is None for a in asks)
        att_all = None
        with torch.inference_mode():
            if explain:
                q_all, att_all = cur.tower.user(t, h, attention=True)
            else:
                q_all = cur.tower.user(t, h)
            tau = float(model.tau)
        if clock is not None:
            clock.lap("tower")
        pending: list[tuple[Any, ...]] = []  # explanations to make, per platform
        by_p: dict[str, tuple[list[int], list[int]]] = {}
        for n, a in enumerate(asks):
            by_p.setdefault(a.platform, ([], []))[a.target is None].append(n)
        gid, local = t.gid, t.local
        for p, (evals, recs) in by_p.items():
            e_p, b_p = self._catalog(cur, p)
            n_items = e_p.shape[0]
            if not n_items:
                continue
            ann = self._ann_for(cur, p, e_p, b_p, tau) if recs else None
            # scored exactly, the prequential asks and the others are one pass (every step
            # is per row, so this is what two passes give, for half the fixed costs);
            # "both" puts the prequential rows first
            stages = ([(evals + recs, "both")] if ann is None and evals and recs
                      else [(evals, "evaluate"), (recs, "rank")])
            memo: dict[int, list[int]] = {}  # exclusion columns, per list, for both stages
            for idx, stage in stages:
                if not idx:
                    continue
                targets: list[int] = []
                ex_r: list[int] = []
                ex_c: list[int] = []
                for r, n in enumerate(idx):
                    a = asks[n]
                    tc = -1
                    if a.target is not None:
                        g = gid.get((p, a.target))
                        tc = local[g] if g is not None else -1
                        targets.append(tc)
                    base = memo.get(id(a.exclude))
                    if base is None:
                        base = memo[id(a.exclude)] = _cols(a.exclude, p, gid, local)
                    cols = base + _cols(a.extra, p, gid, local) if a.extra else base
                    if tc >= 0:
                        cols = [c for c in cols if c != tc]
                    ex_r.extend([r] * len(cols))
                    ex_c.extend(cols)
                why = explain and stage != "evaluate"
                ne = len(evals) if stage == "both" else 0  # prequential rows on top
                parts = None
                with torch.inference_mode():
                    sel = torch.as_tensor(idx, device=q_all.device)
                    if ann is not None and stage == "rank":  # a big catalog: ANN candidates
                        cols = self._ann_tops(ann, p, e_p, b_p, tau, q_all[sel],
                                              [asks[n] for n in idx], ex_r, ex_c,
                                              min(k, n_items), idx, out)
                    else:
                        s = torch.addmm(b_p[None], q_all[sel], e_p.T, alpha=tau)
                        self._cold_last = None
                        if self.s.hybrid_weight > 0 or self._coldw is not None:
                            s, parts = self._hybrid(s, [asks[n] for n in idx], p, n_items,
                                                    why)
                        if ex_r:
                            s.index_put_((torch.as_tensor(ex_r), torch.as_tensor(ex_c)),
                                         torch.tensor(-math.inf, device=s.device))
                        if clock is not None and stage == "both":
                            clock.lap("rank")
                        if stage != "rank":
                            se = s[:ne] if ne else s
                            self._ranks(se, targets, evals, out)
                            if self._cold_last is not None:
                                self._cold_learn(se, targets)
                            if clock is not None and stage == "both":
                                clock.lap("evaluate")
                        if stage != "evaluate":
                            cols = self._tops(s[ne:] if ne else s, min(k, n_items),
                                              t.rows(p), recs, out)
                            if parts is not None and ne:  # every part is per row
                                parts = {key: v[ne:] for key, v in parts.items()}
                if why:
                    assert att_all is not None
                    sel_r = sel[ne:] if ne else sel
                    pending.append(self._explain_prep(p, [asks[n] for n in recs], cols,
                                                      h.gid[recs], h.label[recs] == 1,
                                                      att_all[sel_r], parts))
                if clock is not None:
                    clock.lap("evaluate" if stage == "evaluate" else "rank")
        if pending:  # one pass for every platform's rankings of the batch
            self._explain(cur, pending)
            if clock is not None:
                clock.lap("rank")
        return out

    # ------------------------------------------------------------ big catalogs
    def _ann_for(self, cur: _Served, p: str, e_p: torch.Tensor, b_p: torch.Tensor,
                 tau: float) -> Any:
        """Platform ``p``'s ANN index (:class:`models.ann.AnnIndex`) when its catalog has
        more than ``XREC_ANN_MIN_ITEMS`` items, else None (rank exactly). A missing or
        outdated index (another head version, after ``XREC_ANN_REBUILD_S``; or 5% more
        items) is rebuilt in the ANN thread, one build at a time: until the first one is
        ready the platform ranks exactly, and an outdated one keeps proposing candidates,
        which the served version scores exactly (:meth:`_ann_tops`)."""
        n, lim = int(e_p.shape[0]), self.s.ann_min_items
        if lim <= 0 or n <= lim:
            return None
        idx = self._ann.get(p)
        stale = idx is None or n > idx.n * 1.05 + 1000 or (
            idx.version != cur.version and time.time() - idx.built_at >= self.s.ann_rebuild_s)
        busy = self._ann_busy.get(p)
        if stale and (busy is None or busy.done()):
            x = e_p.detach().float().cpu().numpy().copy()
            b = b_p.detach().float().cpu().numpy().copy()
            self._ann_busy[p] = self._ann_pool.submit(self._ann_build, p, x, b, tau,
                                                      cur.version)
        return idx

    def _ann_build(self, p: str, x: np.ndarray, b: np.ndarray, tau: float, version: int
                   ) -> None:
        """In the ANN thread: build platform ``p``'s index, then swap it in (one assignment)."""
        from models.ann import AnnIndex

        try:
            idx = AnnIndex(x, b, tau, ef_search=self.s.ann_ef_search, version=version)
        except Exception:  # noqa: BLE001 - the platform keeps ranking exactly
            log.exception("ANN index build for %s failed; ranking it exactly", p)
            return
        self._ann[p] = idx
        log.info("ANN index for %s: %d items of head v%d in %.1f s", p, idx.n, version,
                 idx.build_s)

    def _ann_wait(self) -> None:
        """Wait for the running index builds (tests, benchmarks)."""
        for f in list(self._ann_busy.values()):
            f.result()

    def _ann_moments(self, cur: _Served, p: str, e_p: torch.Tensor, b_p: torch.Tensor
                     ) -> tuple[torch.Tensor, ...]:
        """The catalog's embedding mean, covariance, embedding-bias covariance, bias mean
        and variance (float64), so a score's mean and deviation over the whole catalog
        (the hybrid's standardisation) need no full matrix product."""
        key = (cur.version, p)
        n = int(e_p.shape[0])
        hit = self._ann_mom.get(key)
        if hit is None or abs(hit[0] - n) > 0.01 * n:
            if hit is None:  # keep the served version's only
                self._ann_mom = {k: v for k, v in self._ann_mom.items()
                                 if k[0] == cur.version}
            e, b = e_p.double(), b_p.double()
            me, mb = e.mean(0), b.mean()
            ec = e - me
            hit = self._ann_mom[key] = (n, (me, ec.T @ ec / n, ec.T @ (b - mb) / n, mb,
                                                ((b - mb) ** 2).mean()))
        return hit[1]

    def _ann_tops(self, ann: Any, p: str, e_p: torch.Tensor, b_p: torch.Tensor, tau: float,
                  q: torch.Tensor, asks: Sequence[Ask], ex_r: list[int], ex_c: list[int],
                  k: int, idx: list[int], out: list[Any]) -> np.ndarray:
        """:meth:`_tops` for a big catalog. Candidates: each ask's ANN best ``k`` after
        its exclusions (it asks for k + their number), every item the popco hybrid
        scores above zero (the popularity row and the user's co-occurrence rows) and the
        items added since the index was built. They are all scored exactly as the full
        product would score them: the model's score standardised by its mean and
        deviation over the whole catalog (from :meth:`_ann_moments`), popco's by its
        over the whole catalog (zero off those rows), so an item outside the popco rows
        ranks by the model alone, as in :meth:`_hybrid`. Excluded columns are masked
        before the top-k: exclusions are exact."""
        n = int(e_p.shape[0])
        n_r = q.shape[0]
        excl: list[list[int]] = [[] for _ in range(n_r)]
        for r, c in zip(ex_r, ex_c, strict=True):
            excl[r].append(c)
        qn = q.detach().float().cpu().numpy()
        parts = list(ann.candidates(qn, k, excl))
        if n > ann.n:  # items newer than the index
            parts.append(np.arange(ann.n, n, dtype=np.int64))
        hyb = self.s.hybrid_weight > 0 and any(a.pop is not None or a.co for a in asks)
        if hyb:
            for a in asks:
                if a.pop is not None:
                    parts.append(self._row_cols(a.pop, p)[0])
                parts += [self._row_cols(row, p)[0] for row in a.co]
        u = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        u = u[u >= 0]
        m = int(u.size)
        dev = q.device
        ut = torch.from_numpy(u).to(e_p.device)
        s = torch.addmm(b_p[ut][None], q, e_p[ut].T, alpha=tau)  # [R, m] exact
        if hyb:
            assert self.cur is not None
            me, cov, ceb, mb, vb = self._ann_moments(self.cur, p, e_p, b_p)
            qd = q.double()
            mu = tau * (qd @ me) + mb
            var = tau * tau * ((qd @ cov) * qd).sum(1) + 2 * tau * (qd @ ceb) + vb
            sd = var.clamp(min=0).sqrt()
            z = (s.double() - mu[:, None]) / torch.where(sd > 0, sd, torch.ones_like(sd))[:, None]
            # popco over the candidates; its moments over the catalog (zero elsewhere)
            at, cols, vals = [], [], []
            groups: dict[int, tuple[Any, list[int]]] = {}
            for r, a in enumerate(asks):
                for kk, row in enumerate(a.co, start=1):
                    c, v = self._row_cols(row, p)
                    at.append(np.full(c.size, r, np.int64))
                    cols.append(np.searchsorted(u, c))
                    vals.append(v / kk)
                groups.setdefault(id(a.pop), (a.pop, []))[1].append(r)
            if cols:
                flat = np.concatenate(at) * m + np.concatenate(cols)
                co = np.bincount(flat, weights=np.concatenate(vals),
                                 minlength=n_r * m).reshape(n_r, m)
            else:
                co = np.zeros((n_r, m))
            pc = np.zeros((n_r, m))
            blend = self.s.cooc_blend
            for row, rs in groups.values():
                pv = np.zeros(m)
                if row is not None:
                    c, v = self._row_cols(row, p)
                    pv[np.searchsorted(u, c)] = v
                top = pv.max() if pv.size else 0.0
                pop_n = pv / top if top > 0 else pv
                cr = co[rs]
                cmax = np.maximum(cr.max(axis=1, keepdims=True) if m else 0.0, 0.0)
                has = cmax > 0
                pc[rs] = np.where(has, blend * cr / np.where(has, cmax, 1.0)
                                  + (1.0 - blend) * pop_n, pop_n[None, :])
            pmu = pc.sum(1, keepdims=True) / n
            psd = np.sqrt(np.maximum((pc * pc).sum(1, keepdims=True) / n - pmu * pmu, 0.0))
            pcz = (pc - pmu) / np.where(psd > 0, psd, 1.0)
            s = (z + self.s.hybrid_weight * torch.from_numpy(pcz).to(dev)).float()
        if ex_r:
            pos = np.searchsorted(u, np.asarray(ex_c, np.int64))
            ok = (pos < m) & (u[np.minimum(pos, max(m - 1, 0))] == np.asarray(ex_c)) \
                if m else np.zeros(len(ex_c), bool)
            if ok.any():
                s.index_put_((torch.as_tensor(np.asarray(ex_r)[ok]), torch.as_tensor(pos[ok])),
                             torch.tensor(-math.inf, device=s.device))
        kk = min(k, m)
        cols_u = self._tops(s, kk, self.tables.table.rows(p)[u], idx, out) if kk else \
            np.full((n_r, 0), -1, np.int64)
        top = np.where(cols_u >= 0, u[np.maximum(cols_u, 0)], -1)
        if kk < k:
            top = np.pad(top, ((0, 0), (0, k - kk)), constant_values=-1)
        return top

    def _hybrid(self, s: torch.Tensor, asks: Sequence[Ask], p: str, n: int,
                parts: bool = False) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """The model's scores ⊕ λ × popco's, each standardised over the platform's catalog
        (before exclusions), as ``models.baselines.Hybrid``. Asks without popularity or
        co-occurrence rows keep the model's order (their popco row is constant).
        With ``parts`` also the two parts and popco's own (for explanations)."""
        if not any(a.pop is not None or a.co for a in asks):
            return s, None
        # Σ_k row_k / k per ask as one bincount over (ask, column) (no per-row numpy ops)
        at, cols, vals, scale, lens = [], [], [], [], []
        groups: dict[int, tuple[Any, list[int]]] = {}  # popularity row → its asks
        row_cols = self._row_cols
        for r, a in enumerate(asks):
            for k, row in enumerate(a.co, start=1):
                c, v = row_cols(row, p)
                cols.append(c)
                vals.append(v)
                scale.append(1.0 / k)
                lens.append(len(c))
                at.append(r)
            groups.setdefault(id(a.pop), (a.pop, []))[1].append(r)
        if cols:
            ln = np.asarray(lens)
            flat = np.repeat(np.asarray(at, dtype=np.int64) * n, ln) + np.concatenate(cols)
            w = np.concatenate(vals) * np.repeat(np.asarray(scale), ln)
            co = np.bincount(flat, weights=w, minlength=len(asks) * n).reshape(len(asks), n)
        else:
            co = np.zeros((len(asks), n))
        pc = np.empty_like(co)
        pv_of: list[np.ndarray | None] = [None] * len(asks)  # per ask: its popularity row
        for row, rs in groups.values():  # one per platform and stage, at most two
            pv = np.zeros(n)
            if row is not None:
                c, v = self._row_cols(row, p)
                pv[c] = v
                for r in rs:
                    pv_of[r] = pv
            pc[rs] = popco_dense(co[rs], pv, self.s.cooc_blend)
        pcz = standardised(pc)
        mu = s.mean(dim=1, keepdim=True)
        sd = s.std(dim=1, correction=0, keepdim=True)
        z = (s - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
        hyb = self.s.hybrid_weight * torch.from_numpy(pcz).to(z.dtype).to(z.device)
        if self._coldw is not None:
            cold = self._cold_text(asks, p, pv_of, n)
            if cold is not None:
                rows, prior = cold
                w = self._coldw.weight
                add = np.zeros((len(asks), n))
                add[rows] = w * prior
                z = z + torch.from_numpy(add).to(z.dtype).to(z.device)
                self._cold_last = (rows, prior, w)
        if not parts:
            return z + hyb, None
        return z + hyb, {"model": z, "popco": hyb, "co": co, "pv": pv_of}

    def _cold_text(self, asks: Sequence[Ask], p: str, pv_of: Sequence[np.ndarray | None],
                   n: int) -> tuple[list[int], np.ndarray] | None:
        """The cross-platform cold asks (no history on ``p``, positives elsewhere) and
        their standardised text prior (:mod:`models.coldtext`) [len(rows), n]; None when
        there is none, or when the catalog is bigger than ``XREC_ANN_MIN_ITEMS`` (not
        computed there). The served score is then z(model) + λ·z(popco) + w·z(prior),
        w chosen online (:class:`models.coldtext.ColdWeight`), as
        ``models.baselines.Hybrid``."""
        s, t = self.s, self.tables.table
        if n > s.ann_min_items:  # a big catalog: [positives × n] text products per ask
            return None
        gid, has_text = t.gid, t.has_text
        groups: dict[int, tuple[np.ndarray, list[int], list[list[int]]]] = {}
        for r, a in enumerate(asks):
            pv = pv_of[r]
            # consumed items on p (Redis' seen set, or earlier in the batch): not cold; this
            # skips the history scan for almost every ask
            if pv is None or a.exclude or a.extra or any(h[0] == p for h in a.history):
                continue
            gs: list[int] = []
            for hp, item, label, _ in a.history:  # newest first
                if not label:
                    continue
                g = gid.get((hp, item))
                if g is not None and has_text[g] and g not in gs:
                    gs.append(g)
                    if len(gs) >= s.cold_text_hist:
                        break
            if gs:
                groups.setdefault(id(pv), (pv, [], []))[1].append(r)
                groups[id(pv)][2].append(gs)
        if not groups:
            return None
        cat = self._cold_catalog(p)
        if cat.shape[0] != n:
            return None
        rows: list[int] = []
        priors = []
        for pv, rs, gss in groups.values():
            vec = unit_rows(t.centered(np.fromiter(chain.from_iterable(gss), np.int64)))
            cut = np.cumsum([len(g) for g in gss])[:-1]
            priors.append(standardised(text_prior(np.split(vec, cut), cat, pv,
                                                  s.cold_text_beta, s.cold_text_alpha)))
            rows.extend(rs)
        return rows, np.concatenate(priors)

    def _cold_learn(self, s: torch.Tensor, targets: Sequence[int]) -> None:
        """After the prequential asks were ranked: their cold ones' outcomes under every
        candidate weight of the prior (:class:`models.coldtext.ColdWeight`)."""
        assert self._cold_last is not None and self._coldw is not None
        rows, prior, w = self._cold_last
        n_rows = s.shape[0]  # the prequential rows (the first ones of a merged pass)
        if rows and max(rows) >= n_rows:
            keep = [j for j, r in enumerate(rows) if r < n_rows]
            if not keep:
                return
            rows, prior = [rows[j] for j in keep], prior[keep]
        before = self._coldw.weight
        base = s[torch.as_tensor(rows)].double().cpu().numpy() - w * prior  # -inf stays
        self._coldw.learn(base, prior, [targets[r] for r in rows])
        if self._coldw.weight != before:
            log.info("text prior weight on cross-platform cold starts: %g → %g (after %d "
                     "cold asks)", before, self._coldw.weight, self._coldw.asks)

    @property
    def cold_text_weight(self) -> float:
        """The text prior's weight on cold asks now (0: off)."""
        return self._coldw.weight if self._coldw is not None else 0.0

    def _cold_catalog(self, p: str) -> np.ndarray:
        """Unit-length centred text vectors of ``p``'s catalog, :meth:`ItemTable.rows`
        order (cached per text stamp and catalog size)."""
        t = self.tables.table
        rows = t.rows(p)
        key = (p, self.tables.stamp, len(rows))
        hit = self._cold_cache.get(p)
        if hit is None or hit[0] != key:
            x = unit_rows(t.centered(rows))
            x[~np.asarray(t.has_text, dtype=bool)[rows]] = 0.0
            hit = self._cold_cache[p] = (key, x)
        return hit[1]

    def _explain_prep(self, p: str, asks: Sequence[Ask], cols: np.ndarray, hist: np.ndarray,
                      positive: np.ndarray, att: torch.Tensor, parts: dict[str, Any] | None
                      ) -> tuple[Any, ...]:
        """What :meth:`_explain` needs of one platform's rankings: their best
        ``XREC_EXPLAIN_TOP`` items as table rows (``cols``: catalog columns, best first,
        -1 = none), which are outside the popular head, and the reasons the hybrid's popco
        part decides."""
        n = min(self.s.explain_top, cols.shape[1])
        cols = cols[:, :n]
        rows = self.tables.table.rows(p)
        top = np.where(cols >= 0, rows[np.maximum(cols, 0)], -1)
        new = popco = None
        if parts is not None:
            c0 = np.maximum(cols, 0)
            # an item outside the platform's popular head (only where the ask has that row)
            new = np.asarray([pv[c0[r]] <= 0 if pv is not None else np.zeros(n, bool)
                              for r, pv in enumerate(parts["pv"])]).reshape(cols.shape)
            r_t = torch.arange(len(asks))[:, None]
            c_t = torch.from_numpy(c0)
            by_popco = (parts["popco"].cpu()[r_t, c_t] > parts["model"].cpu()[r_t, c_t]).numpy()
            by_popco &= cols >= 0
            if by_popco.any():
                popco = self._popco_reasons(p, asks, cols, by_popco, parts["co"], parts["pv"])
        return p, asks, top, hist, positive, att, new, popco

    def _explain(self, cur: _Served, pending: Sequence[tuple[Any, ...]]) -> None:
        """Each pending ask's ``why`` (:mod:`streams.explain`), every platform in one pass."""
        n = max(x[2].shape[1] for x in pending)
        tops, plat_rows, asks, news, popcos = [], [], [], [], []
        any_new = any(x[6] is not None for x in pending)
        any_popco = any(x[7] is not None for x in pending)
        for p, a, top, _, _, _, new, popco in pending:
            r, m = top.shape
            tops.append(np.pad(top, ((0, 0), (0, n - m)), constant_values=-1))
            plat_rows += [p] * r
            asks += a
            if any_new:
                news.append(np.pad(new, ((0, 0), (0, n - m))) if new is not None
                            else np.zeros((r, n), bool))
            if any_popco:
                popcos += ([row + [None] * (n - m) for row in popco] if popco is not None
                           else [[None] * n for _ in range(r)])
        t = self.tables.table
        plats, plat = t.platforms, t.plat
        if self._why_memo[0] is not t:  # rows keep their items while the table lives
            self._why_memo = (t, {})
        why = model_reasons(cur.tower.emb, np.concatenate(tops),
                            np.concatenate([x[3] for x in pending]),
                            np.concatenate([x[4] for x in pending]),
                            torch.cat([x[5] for x in pending]), t.ids,
                            lambda g: plats[plat[g]], plat_rows,
                            np.concatenate(news) if any_new else None,
                            popcos if any_popco else None, self._why_memo[1])
        for a, w in zip(asks, why, strict=True):
            a.why = w

    def _popco_reasons(self, p: str, asks: Sequence[Ask], cols: np.ndarray,
                       mask: np.ndarray, co: np.ndarray, pv_of: Sequence[np.ndarray | None]
                       ) -> list[list[str | None]]:
        """The popco part's reason where it outweighs the model's (``mask``): ``co`` [R, n]
        each ask's summed co-occurrence over the catalog, ``pv_of`` its popularity row."""
        blend = self.s.cooc_blend
        out: list[list[str | None]] = [[None] * cols.shape[1] for _ in asks]
        ids, rows = self.tables.table.ids, self.tables.table.rows(p)
        maxes: dict[int, tuple[float, float]] = {}  # per ask: (popularity max, co max)
        for r, j in zip(*np.nonzero(mask), strict=True):
            a = asks[r]
            c = int(cols[r, j])
            pv = pv_of[r]
            mx = maxes.get(r)
            if mx is None:
                mx = maxes[r] = (float(pv.max()) if pv is not None and pv.size else 0.0,
                                 float(co[r].max()) if co.shape[1] else 0.0)
            top_pop, cmax = mx
            pop_n = pv[c] / top_pop if pv is not None and top_pop > 0 else 0.0
            co_part = blend * co[r, c] / cmax if cmax > 0 else 0.0
            pop_part = (1.0 - blend) * pop_n if cmax > 0 else pop_n
            out[r][j] = popco_reason(ids[rows[c]], p, a.co_src, [row_lookup(x) for x in a.co],
                                     co_part, pop_part)
        return out

    def _row_cols(self, row: Any, p: str) -> tuple[np.ndarray, np.ndarray]:
        """A row's items as platform ``p``'s catalog columns (items not in it dropped)."""
        t = self.tables.table
        if row.cols_n != len(t):
            get = t.columns(p).get
            cols = np.fromiter((get(i, -1) for i in row.items), np.int64, len(row.items))
            keep = cols >= 0
            row.cols, row.cvals = cols[keep], row.vals[keep]
            row.cols_n = len(t)
        return row.cols, row.cvals

    @staticmethod
    def _ranks(s: torch.Tensor, targets: list[int], idx: list[int], out: list[Any]) -> None:
        """0-based rank of each target among the non-excluded columns; ties count half
        (as :func:`models.metrics.rank_of`). Excluded columns are -inf and the target is
        never excluded (its score is finite), so they never count as greater or equal."""
        tc = torch.as_tensor(targets)
        st = s[torch.arange(len(idx)), tc.clamp(min=0)]
        greater = (s > st[:, None]).sum(1)
        equal = (s == st[:, None]).sum(1) - 1
        rank = (greater.double() + 0.5 * equal.double()).cpu().numpy()
        bad = ~torch.isfinite(st)
        if bool(bad.any()):  # a broken score ranks last among the candidates
            worst = ((s != -math.inf).sum(1) - 1).double().cpu().numpy()
            rank = np.where(bad.cpu().numpy(), worst, rank)
        for r, n in enumerate(idx):
            if targets[r] >= 0:
                out[n] = float(rank[r])

    def _tops(self, s: torch.Tensor, k: int, rows: np.ndarray, idx: list[int],
              out: list[Any]) -> np.ndarray:
        """Each row's best ``k`` (item, score) into ``out``; returns their catalog columns
        (-1 where a row has fewer than ``k`` candidates)."""
        vals, cols = torch.topk(s, k, dim=1)  # a partial sort, best first
        ids = self.tables.table.ids
        vals_n = vals.cpu().numpy()
        cols_n = cols.cpu().numpy()
        vals_l = vals_n.round(5).tolist()
        gids = rows[cols_n].tolist()
        for r, n in enumerate(idx):
            out[n] = [(ids[g], v) for g, v in zip(gids[r], vals_l[r], strict=True)
                      if math.isfinite(v)]  # -inf: excluded (fewer candidates than k)
        return np.where(np.isfinite(vals_n), cols_n, -1)

    # ------------------------------------------------------------ prequential
    def prequential_asks(self, applied: Sequence[tuple[Any, Sequence[HistEntry]]],
                         seen_before: dict[tuple[str, str], list[str]]
                         ) -> tuple[list[Ask], list[tuple[int, tuple[str, str], bool]]]:
        """An ask per applied positive the user did not have yet, with the history and the
        consumed items as they were just before it (earlier events of the same batch
        included). Returns the asks and, per ask, (applied index, pair, cold start)."""
        seen = {k: set(v) for k, v in seen_before.items()}
        added: dict[tuple[str, str], list[str]] = {}  # items had earlier in this batch
        asks: list[Ask] = []
        meta: list[tuple[int, tuple[str, str], bool]] = []
        for n, (ev, hist) in enumerate(applied):
            key = (ev.user, ev.platform)
            s = seen.setdefault(key, set())
            if ev.label == 1 and ev.item not in s:
                cold = not s and any(p != ev.platform for p, _, _, _ in hist)
                had = added.get(key, ())
                asks.append(Ask(hist, ev.platform, ev.event_time,
                                exclude=seen_before.get(key, ()), extra=tuple(had),
                                target=ev.item))
                meta.append((n, key, cold))
            if ev.item not in s:
                s.add(ev.item)
                added.setdefault(key, []).append(ev.item)
        return asks, meta

    def record_ranks(self, ranks: Sequence[float | None],
                     meta: Sequence[tuple[int, tuple[str, str], bool]], n_applied: int
                     ) -> list[float | None]:
        """Fold prequential ranks into the quality windows; per applied event its rank."""
        out: list[float | None] = [None] * n_applied
        for rank, (n, (_, p), cold) in zip(ranks, meta, strict=True):
            if rank is None:
                continue  # not in the catalog (no vector): not rankable
            out[n] = rank
            for qk in ((p, "all"), ("all", "all")) + (
                    ((p, "coldstart"), ("all", "coldstart")) if cold else ()):
                self.quality.setdefault(qk, RankingStats()).add(rank)
        return out

    def quality_windows(self) -> list[QualityWindow]:
        now = time.time()
        out = []
        for (p, cohort), st in sorted(self.quality.items()):
            sm = st.summary()
            out.append(QualityWindow(platform=p, cohort=cohort,  # type: ignore[arg-type]
                                     scorer=self.scorer, window_s=round(now - self.window_start,
                                                                        3),
                                     n=st.n, recall_at_10=sm["recall@10"],
                                     recall_at_20=sm["recall@20"], ndcg_at_10=sm["ndcg@10"],
                                     mrr=sm["mrr"], at=now))
        self.quality = {}
        self.window_start = now
        return out


def _cols(items: Sequence[str], p: str, gid: dict[tuple[str, str], int], local: list[int]
          ) -> list[int]:
    """Catalog columns of platform ``p``'s items (items outside the table have none)."""
    out = []
    for i in items:
        g = gid.get((p, i))
        if g is not None:
            out.append(local[g])
    return out


def cut(hist: Sequence[tuple[str, str, int, float]], now: float,
        horizon: tuple[float, float] | None) -> Sequence[tuple[str, str, int, float]]:
    """A history under a drift horizon: only entries from its start, while it lasts."""
    if horizon is None or not horizon[0] <= now < horizon[1]:
        return hist
    return [h for h in hist if h[3] >= horizon[0]]


_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: history entry → its JSON (bounded: dropped when it grows past ``_FRAG_KEEP`` entries)
_FRAG: dict[HistEntry, str] = {}
_FRAG_KEEP = 300_000


def examples_json(applied: Sequence[tuple[Any, Sequence[HistEntry]]], now: float,
                  horizon: tuple[float, float] | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) of a :class:`TrainingExample` per applied positive, serialised
    directly: the same JSON as ``TrainingExample.model_dump_json()`` (tested), without a
    pydantic object per example, and each history entry encoded once while it is
    remembered (a user's examples share most of their history, batch after batch: an
    entry is in up to ``XREC_HIST_LEN`` of them)."""
    global _FRAG
    frag = _FRAG
    if len(frag) > _FRAG_KEEP:
        frag = _FRAG = {}
    dumps = _DUMPS
    out = []
    for ev, hist in applied:
        if ev.label != 1:
            continue
        parts = []
        for h in cut(hist, ev.event_time, horizon):
            f = frag.get(h)
            if f is None:
                f = frag[h] = dumps(h)
            parts.append(f)
        out.append((ev.user.encode(), (
            f'{{"user":{dumps(ev.user)},"platform":{dumps(ev.platform)},'
            f'"item":{dumps(ev.item)},"weight":{float(ev.weight)!r},'
            f'"event_time":{float(ev.event_time)!r},"history":[{",".join(parts)}],'
            f'"produced_at":{float(ev.produced_at)!r},"emitted_at":{float(now)!r}}}'
        ).encode()))
    return out


class TrainerService:
    """The train agent's core: examples in, a new head version out (Redis + record)."""

    def __init__(self, settings: Settings, vectors: VectorStore, platforms: Sequence[str]
                 ) -> None:
        self.s = settings
        self.reg = HeadRegistry(settings.redis_url or "", settings.redis_prefix,
                                settings.redis_timeout_s)
        self.tables = _Tables(vectors, settings.model_buckets)
        self.device = pick_device(settings.train_device)
        self.platforms = list(platforms)
        self.model: HeadsModel | None = None
        self.trainer: OnlineTrainer | None = None
        self.published = 0

    async def start(self) -> None:
        """Continue from the latest published version, if any (e.g. after a restart)."""
        v, blob, _ = await self.reg.latest()
        if blob is not None:
            loop = asyncio.get_running_loop()
            self.model = await loop.run_in_executor(None, load_model, blob, self.device)
            log.info("trainer continues from head v%d", v)
        else:
            self.model = HeadsModel(model_config(self.s, self.tables.vectors.dim),
                                    self.platforms).to(self.device)
        self.trainer = OnlineTrainer(self.model, self.tables.table, TrainConfig(
            lr=self.s.train_lr, steps=self.s.train_steps, seed=self.s.model_seed))
        # warm autograd and the optimizer on a throwaway model, so the first real batch is
        # not the one that pays for torch's lazy initialisation (measured: 3.7 s first swap)
        await asyncio.get_running_loop().run_in_executor(None, _warm_trainer)

    def learn(self, recs: Sequence[TrainingExample]) -> int:
        """Blocking (run it in an executor): table sync + optimizer steps."""
        assert self.trainer is not None
        self.tables.sync()
        t = self.tables.table
        ex = [Example(r.platform, t.ensure(r.platform, r.item),
                      self.tables.gid_history(r.history), r.event_time, r.weight, r.user)
              for r in recs]
        return self.trainer.learn(ex)

    def blob(self) -> bytes:
        assert self.model is not None
        return save_model(self.model, compact=True)

    def record(self, version: int, n: int, arrived: float, newest: float, size: int
               ) -> HeadVersion:
        assert self.trainer is not None and self.model is not None
        st = self.trainer.stats
        loss = st.last_loss if math.isfinite(st.last_loss) else None
        return HeadVersion(version=version, platforms=list(self.model.platforms), examples=n,
                           trained_examples=st.examples, steps=st.steps,
                           skipped_nonfinite=st.skipped_nonfinite, loss=loss,
                           step_ms=round(st.step_ms[-1] if st.step_ms else 0.0, 3),
                           device=str(self.device), bytes=size, batch_arrived_at=arrived,
                           newest_produced_at=newest, published_at=time.time())


def _warm_trainer() -> None:
    t = ItemTable(8, 8)
    t.set_text("w", ["a", "b"], np.eye(2, 8, dtype=np.float32))
    m = HeadsModel(ModelConfig(text_dim=8, dim=8, hist_len=2, buckets=8), ["w"])
    OnlineTrainer(m, t, TrainConfig(steps=1, uniform_negatives=2)).learn(
        [Example("w", 1, [(0, 1, 0.0)], 1.0)])
