"""The learned model in the stream: head registry in Redis, serving, online training.

Redis (binary values, prefix ``XREC_REDIS_PREFIX``)::

    heads:version   int     bumped by every publish (monotonic)
    heads:blob      bytes   the weights of that version (torch.save, float16 tensors)
    heads:meta      hash    HeadVersion fields of that version (JSON under "record")
    heads:swaps     list    newest first: {version, worker, used_after_s, event_to_use_s}

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
from typing import Any

import numpy as np
import torch

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
from streams.state import redis_from_url, row_lookup
from streams.vectors import VectorStore

__all__ = ["HeadRegistry", "ModelServer", "Ask", "TrainerService", "model_config", "examples_json",
           "recent_positives"]

log = logging.getLogger("xrec.heads")


def model_config(s: Settings, text_dim: int) -> ModelConfig:
    return ModelConfig(text_dim=text_dim, dim=s.model_dim, hist_len=s.hist_len,
                       buckets=s.model_buckets, seed=s.model_seed)


class HeadRegistry:
    def __init__(self, url: str, prefix: str, timeout_s: float | None = None) -> None:
        self.r = redis_from_url(url, timeout_s, decode=False)
        self.p = prefix

    def k(self, name: str) -> str:
        return f"{self.p}heads:{name}"

    async def version(self) -> int:
        return int(await self.r.get(self.k("version")) or 0)

    async def publish(self, blob: bytes, record: dict[str, Any]) -> int:
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(self.k("version"))
        pipe.set(self.k("blob"), blob)
        pipe.hset(self.k("meta"), mapping={"record": json.dumps(record)})
        v, _, _ = await pipe.execute()
        return int(v)

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
    model ranks alone. ``why`` is set by :meth:`ModelServer.answer`: the reasons
    (:mod:`streams.explain`) of its best ``XREC_EXPLAIN_TOP`` items, as JSON."""

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
            memo: dict[int, list[int]] = {}  # exclusion columns, per list, for both stages
            for idx, stage in ((evals, "evaluate"), (recs, "rank")):
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
                why = explain and stage == "rank"
                parts = None
                with torch.inference_mode():
                    sel = torch.as_tensor(idx, device=q_all.device)
                    s = torch.addmm(b_p[None], q_all[sel], e_p.T, alpha=tau)
                    if self.s.hybrid_weight > 0:
                        s, parts = self._hybrid(s, [asks[n] for n in idx], p, n_items, why)
                    if ex_r:
                        s.index_put_((torch.as_tensor(ex_r), torch.as_tensor(ex_c)),
                                     torch.tensor(-math.inf, device=s.device))
                    if stage == "evaluate":
                        self._ranks(s, targets, idx, out)
                    else:
                        cols = self._tops(s, min(k, n_items), t.rows(p), idx, out)
                if why:
                    assert att_all is not None
                    pending.append(self._explain_prep(p, [asks[n] for n in idx], cols,
                                                      h.gid[idx], h.label[idx] == 1,
                                                      att_all[sel], parts))
                if clock is not None:
                    clock.lap(stage)
        if pending:  # one pass for every platform's rankings of the batch
            self._explain(cur, pending)
            if clock is not None:
                clock.lap("rank")
        return out

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
        if not parts:
            return z + hyb, None
        return z + hyb, {"model": z, "popco": hyb, "co": co, "pv": pv_of}

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
                      self.tables.gid_history(r.history), r.event_time, r.weight)
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
