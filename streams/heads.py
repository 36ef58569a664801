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
from typing import Any

import numpy as np
import torch

from models.heads import (
    HeadsModel,
    History,
    ItemTable,
    ModelConfig,
    load_model,
    pick_device,
    save_model,
)
from models.metrics import RankingStats, rank_of
from models.trainer import Example, OnlineTrainer, TrainConfig
from streams.records import HeadVersion, QualityWindow, TrainingExample
from streams.settings import Settings
from streams.state import redis_from_url
from streams.vectors import VectorStore

__all__ = ["HeadRegistry", "ModelServer", "TrainerService", "model_config"]

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
    """Keeps an :class:`ItemTable` in step with the worker's in-memory item vectors."""

    def __init__(self, vectors: VectorStore, buckets: int) -> None:
        self.vectors = vectors
        self.table = ItemTable(vectors.dim, buckets)
        self._seen: dict[str, tuple[int, int]] = {}

    def sync(self) -> bool:
        changed = False
        for p, idx in list(self.vectors.index.items()):
            mark = (id(idx), len(idx))
            if self._seen.get(p) != mark:
                self.table.set_text(p, list(idx.ids), idx.matrix)
                self._seen[p] = mark
                changed = True
        return changed

    def gid_history(self, hist: Sequence[tuple[str, str, int, float]]
                    ) -> list[tuple[int, int, float]]:
        return [(self.table.ensure(p, i), int(lab), float(t)) for p, i, lab, t in hist]


class ModelServer:
    """The head version a recommend worker serves, hot-swapped between micro-batches."""

    def __init__(self, settings: Settings, vectors: VectorStore, worker: str) -> None:
        self.s = settings
        self.reg = HeadRegistry(settings.redis_url or "", settings.redis_prefix,
                                settings.redis_timeout_s)
        self.tables = _Tables(vectors, settings.model_buckets)
        self.model: HeadsModel | None = None
        self.version = 0
        self.worker = worker
        self.device = pick_device(settings.train_device)
        self._all: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
        self.quality: dict[tuple[str, str], RankingStats] = {}
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
    def ready(self) -> bool:
        return self.model is not None

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
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, load_model, blob, self.device)
        self.model, self.version = model, v  # one assignment: the next batch uses it
        self._all = None
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

    # ---------------------------------------------------------------- scoring
    def _embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every known item's embedding and bias under the served version (cached)."""
        assert self.model is not None
        t = self.tables.table
        hit = self._all
        if hit is None or hit[0] != self.version or hit[1] != len(t):
            for p in t.platforms:
                self.model.add_platform(p)
            with torch.no_grad():
                e, b = self.model.item_emb(t, np.arange(len(t)))
            self._all = hit = (self.version, len(t), e, b)
        return hit[2], hit[3]

    def score(self, reqs: Sequence[tuple[Sequence[tuple[str, str, int, float]], str, float]]
              ) -> dict[str, tuple[np.ndarray, np.ndarray, list[int]]]:
        """reqs = [(history newest first, platform, now)] → {platform: (rows, scores, req idx)}."""
        assert self.model is not None
        self.tables.sync()
        t = self.tables.table
        by_p: dict[str, list[int]] = {}
        for n, (_, p, _) in enumerate(reqs):
            by_p.setdefault(p, []).append(n)
        hists = {n: self.tables.gid_history(cut(r[0], r[2], self.horizon))
                 for n, r in enumerate(reqs)}
        e_all, b_all = self._embeddings()  # after the histories: they may add rows
        # one user-tower pass for every request (the target platform is per row), then one
        # matrix product per platform: per-op overhead dominates at these sizes (py-spy)
        order = [i for idx in by_p.values() for i in idx]
        h = History.build([hists[i] for i in order], [reqs[i][2] for i in order],
                          [t.platform_index(reqs[i][1]) for i in order],
                          self.model.cfg.hist_len, self.model.cfg.gap_buckets)
        with torch.no_grad():
            q_all = self.model.user(t, h, items=e_all)
        row_of = {i: j for j, i in enumerate(order)}
        out = {}
        for p, idx in by_p.items():
            rows = t.rows(p)
            if not len(rows):
                continue
            r = torch.from_numpy(rows).to(e_all.device)
            sel = torch.as_tensor([row_of[i] for i in idx], device=e_all.device)
            with torch.no_grad():
                s = self.model.scores(q_all[sel], e_all[r], b_all[r]).float().cpu().numpy()
            out[p] = (rows, s, idx)
        return out

    def rank(self, reqs: Sequence[tuple[Sequence[tuple[str, str, int, float]], str, float]],
             limit: int) -> list[list[tuple[str, float]]]:
        """Best ``limit`` (item, score) per request, no exclusions applied."""
        res: list[list[tuple[str, float]]] = [[] for _ in reqs]
        ids = self.tables.table.ids
        for _p, (rows, s, idx) in self.score(reqs).items():
            k = min(limit, s.shape[1])
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            for r, n in enumerate(idx):
                order = top[r][np.argsort(-s[r, top[r]], kind="stable")]
                res[n] = [(ids[int(rows[j])], round(float(s[r, j]), 5)) for j in order]
        return res

    # ------------------------------------------------------------ prequential
    def evaluate(self, applied: Sequence[tuple[Any, list[tuple[str, str, int, float]]]],
                 seen_before: dict[tuple[str, str], list[str]]) -> list[float | None]:
        """Rank each applied positive with the served model before it learns from it.

        Returns, per applied event, its rank (0 = top) or None (not ranked: a negative, an
        item the user already had, or one outside the catalog)."""
        t = self.tables.table
        seen = {k: set(v) for k, v in seen_before.items()}
        added: dict[tuple[str, str], list[str]] = {}  # items had earlier in this batch
        reqs, meta = [], []
        out: list[float | None] = [None] * len(applied)
        for n, (ev, hist) in enumerate(applied):
            key = (ev.user, ev.platform)
            s = seen.setdefault(key, set())
            if ev.label == 1 and ev.item not in s:
                cold = not s and any(p != ev.platform for p, _, _, _ in hist)
                reqs.append((hist, ev.platform, ev.event_time))
                meta.append((n, ev, key, len(added.get(key, ())), cold))
            if ev.item not in s:
                s.add(ev.item)
                added.setdefault(key, []).append(ev.item)
        if not reqs:
            return out
        base: dict[tuple[str, str], np.ndarray] = {}  # seen before the batch, as columns
        for _p, (rows, scores, idx) in self.score(reqs).items():
            local = {int(g): j for j, g in enumerate(rows)}

            def cols(items: Sequence[str], p: str = _p, local: dict[int, int] = local
                     ) -> list[int]:
                gs = (t.gid.get((p, i)) for i in items)
                return [local[g] for g in gs if g is not None and g in local]

            for r, k in enumerate(idx):
                n, ev, key, n_added, cold = meta[k]
                target = local.get(t.gid.get((ev.platform, ev.item), -1))
                if target is None:
                    continue  # not in the catalog (no vector): not rankable
                if key not in base:
                    base[key] = np.asarray(cols(seen_before.get(key, [])), dtype=np.int64)
                excl = base[key]
                if n_added:
                    excl = np.concatenate([excl, np.asarray(cols(added[key][:n_added]),
                                                            dtype=np.int64)])
                rank, _ = rank_of(scores[r], target, excl)
                out[n] = rank
                for qk in ((ev.platform, "all"), ("all", "all")) + (
                        ((ev.platform, "coldstart"), ("all", "coldstart")) if cold else ()):
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


def cut(hist: Sequence[tuple[str, str, int, float]], now: float,
        horizon: tuple[float, float] | None) -> Sequence[tuple[str, str, int, float]]:
    """A history under a drift horizon: only entries from its start, while it lasts."""
    if horizon is None or not horizon[0] <= now < horizon[1]:
        return hist
    return [h for h in hist if h[3] >= horizon[0]]


def examples_from(applied: Sequence[tuple[Any, list[tuple[str, str, int, float]]]],
                  now: float, horizon: tuple[float, float] | None = None
                  ) -> list[TrainingExample]:
    return [TrainingExample(user=ev.user, platform=ev.platform, item=ev.item,
                            weight=ev.weight, event_time=ev.event_time,
                            history=list(cut(hist, ev.event_time, horizon)),
                            produced_at=ev.produced_at, emitted_at=now)
            for ev, hist in applied if ev.label == 1]


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
