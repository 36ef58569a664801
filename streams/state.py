"""User feature state and scorer aggregates in Redis, updated idempotently in micro-batches.

Exactly-once effect on at-least-once delivery
---------------------------------------------
Every :class:`Interaction` carries the topic/partition/offset of the *platform* event it
came from. Unified events are keyed by user, so all events of one source partition that
land in unified partition ``q`` arrive there in source-offset order. For each pair
(``q``, source partition) a watermark hash holds the highest source offset applied; a
batch is applied inside one ``MULTI``/``EXEC`` that also advances the watermarks, under
``WATCH`` of those watermark keys. So:

* a unified record redelivered after a crash has offset ≤ watermark → skipped;
* a platform event normalized twice (normalize crashed before committing) yields a second
  unified record with the same source offset → skipped;
* a platform that sends the same event twice (same event id, new offset) is skipped by the
  per-user set of recent event ids (``XREC_EID_KEEP`` remembered);
* two workers racing on one partition during a rebalance: the loser's ``EXEC`` fails on
  the ``WATCH`` and it re-reads, then skips what the winner applied.

Redis keys (prefix ``XREC_REDIS_PREFIX``, default ``xrec:``), all keyed by pseudonymous
user keys only::

    wm:<epoch>:<unified topic>:<q>  hash  "<src topic>:<src partition>" → offset
    u:<user>:<platform>:recent      list  newest first, JSON [item, label, weight, time, kind]
    u:<user>:<platform>:seen        zset  item → last event time (consumed items, capped)
    u:<user>:eids                   zset  event id → event time (dedup, capped)
    u:<user>:stats                  hash  "<platform>:events|pos|neg", "<platform>:last"
    users                           set   user keys
    pop:<platform>                  zset  item → Σ weight·2^((t-anchor)/half-life)
    popmeta:<platform>              hash  anchor
    co:<platform>:<item>            zset  neighbour → co-occurrence weight (capped)
    recs:<platform>:<user>          string Recommendations JSON (TTL)
    stats                           hash  global counters
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from models.popco import SCORER_VERSION, decay_factor, popco_rank
from streams.records import Interaction, RecItem, Recommendations
from streams.settings import Settings

__all__ = ["RedisState", "ApplyResult", "Touched", "redis_from_url"]

log = logging.getLogger("xrec.state")

_REBASE_EXPONENT = 200.0  # rebase the popularity anchor before 2^e gets large


def redis_from_url(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=10)


@dataclass
class Touched:
    """A (user, platform) pair that a batch touched: its recs must be refreshed."""

    events: int = 0
    produced_at: float = math.inf  # oldest produce time covered
    event_time: float = 0.0  # newest event time covered
    recent_pos: list[str] = field(default_factory=list)  # after the batch, newest first


@dataclass
class ApplyResult:
    applied: int = 0
    dup_offset: int = 0
    dup_event: int = 0
    touched: dict[tuple[str, str], Touched] = field(default_factory=dict)


class RedisState:
    def __init__(self, redis: aioredis.Redis, settings: Settings, unified_topic: str,
                 epoch: str = "0") -> None:
        self.r = redis
        self.s = settings
        self.p = settings.redis_prefix
        self.unified_topic = unified_topic
        self.epoch = epoch

    # ------------------------------------------------------------------ keys
    def k(self, *parts: object) -> str:
        return self.p + ":".join(str(x) for x in parts)

    def wm_key(self, q: int) -> str:
        return self.k("wm", self.epoch, self.unified_topic, q)

    # --------------------------------------------------------------- retries
    async def _retry(self, what: str, fn):  # type: ignore[no-untyped-def]
        """Back off and retry while Redis is unreachable: the stream waits (backpressure)."""
        delay = 0.1
        while True:
            try:
                return await fn()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis unavailable during %s (%s); retrying in %.1fs", what,
                            type(exc).__name__, delay)
                await self._count("redis_errors")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _count(self, name: str, n: int = 1) -> None:
        try:
            await self.r.hincrby(self.k("stats"), name, n)
        except Exception:  # noqa: BLE001,S110 - counting must never fail the stream
            pass

    # ------------------------------------------------------------------ apply
    async def apply(self, batch: Sequence[tuple[int, Interaction]]) -> ApplyResult:
        """Apply a micro-batch of (unified partition, interaction), exactly once in effect."""
        if not batch:
            return ApplyResult()
        for _attempt in range(20):
            try:
                return await self._retry("apply", lambda: self._apply_once(batch))
            except WatchError:
                log.info("watermark changed under us (rebalance?); re-reading the batch")
        raise RuntimeError("could not apply a batch after 20 optimistic retries")

    async def _apply_once(self, batch: Sequence[tuple[int, Interaction]]) -> ApplyResult:
        s = self.s
        qs = sorted({q for q, _ in batch})
        wm_keys = [self.wm_key(q) for q in qs]
        pairs = list(dict.fromkeys((ev.user, ev.platform) for _, ev in batch))
        users = list(dict.fromkeys(ev.user for _, ev in batch))
        platforms = sorted({ev.platform for _, ev in batch})
        eids_by_user: dict[str, list[str]] = defaultdict(list)
        for _, ev in batch:
            eids_by_user[ev.user].append(ev.event_id)

        async with self.r.pipeline(transaction=True) as tx:
            await tx.watch(*wm_keys)
            rd = self.r.pipeline(transaction=False)
            for key in wm_keys:
                rd.hgetall(key)
            for u, p in pairs:
                rd.lrange(self.k("u", u, p, "recent"), 0, 4 * s.cooc_window)
            for u in users:
                rd.zmscore(self.k("u", u, "eids"), eids_by_user[u])
            for p in platforms:
                rd.hget(self.k("popmeta", p), "anchor")
            res = await rd.execute()
            i = 0
            wm: dict[int, dict[str, int]] = {}
            for q in qs:
                wm[q] = {f: int(v) for f, v in res[i].items()}
                i += 1
            recent_pos: dict[tuple[str, str], list[str]] = {}
            for pair in pairs:
                recent_pos[pair] = _positives(res[i], s.cooc_window)
                i += 1
            known: dict[str, set[str]] = {}
            for u in users:
                known[u] = {e for e, sc in zip(eids_by_user[u], res[i], strict=True)
                            if sc is not None}
                i += 1
            anchors: dict[str, float | None] = {}
            for p in platforms:
                anchors[p] = float(res[i]) if res[i] is not None else None
                i += 1

            tx.multi()
            out = ApplyResult()
            new_wm: dict[int, dict[str, int]] = defaultdict(dict)
            pop_inc: dict[tuple[str, str], float] = defaultdict(float)
            co_inc: dict[tuple[str, str, str], float] = defaultdict(float)
            trim_recent, trim_seen, trim_eids, trim_co = set(), set(), set(), set()
            stats: dict[tuple[str, str], float] = defaultdict(float)
            for q, ev in batch:
                pair = (ev.user, ev.platform)
                t = out.touched.setdefault(pair, Touched())
                t.events += 1
                t.produced_at = min(t.produced_at, ev.produced_at)
                t.event_time = max(t.event_time, ev.event_time)
                src = f"{ev.src_topic}:{ev.src_partition}"
                if ev.src_offset <= wm[q].get(src, -1):
                    out.dup_offset += 1
                    continue
                wm[q][src] = new_wm[q][src] = ev.src_offset
                if ev.event_id in known[ev.user]:
                    out.dup_event += 1
                    continue
                known[ev.user].add(ev.event_id)
                out.applied += 1
                u, p = pair
                entry = json.dumps([ev.item, ev.label, round(ev.weight, 4),
                                    round(ev.event_time, 3), ev.kind], separators=(",", ":"))
                rk, sk, ek = self.k("u", u, p, "recent"), self.k("u", u, p, "seen"), \
                    self.k("u", u, "eids")
                tx.lpush(rk, entry)
                tx.zadd(sk, {ev.item: ev.event_time}, gt=True)
                tx.zadd(sk, {ev.item: ev.event_time}, nx=True)
                tx.zadd(ek, {ev.event_id: ev.event_time})
                trim_recent.add(rk)
                trim_seen.add(sk)
                trim_eids.add(ek)
                stats[(self.k("u", u, "stats"), f"{p}:events")] += 1
                stats[(self.k("u", u, "stats"), f"{p}:pos" if ev.label else f"{p}:neg")] += 1
                tx.hset(self.k("u", u, "stats"), f"{p}:last", ev.event_time)
                tx.sadd(self.k("users"), u)
                if ev.label == 1:
                    if anchors[p] is None:
                        anchors[p] = ev.event_time
                        tx.hsetnx(self.k("popmeta", p), "anchor", ev.event_time)
                    anchor = anchors[p]
                    assert anchor is not None
                    if (ev.event_time - anchor) / s.popularity_half_life_s > _REBASE_EXPONENT:
                        # rescale all popularity weights to a new anchor, atomically with the rest
                        self._flush_pop(tx, pop_inc, p)
                        factor = decay_factor(anchor, ev.event_time, s.popularity_half_life_s)
                        tx.zunionstore(self.k("pop", p), {self.k("pop", p): factor})
                        tx.hset(self.k("popmeta", p), "anchor", ev.event_time)
                        anchors[p] = anchor = ev.event_time
                    pop_inc[(p, ev.item)] += ev.weight * decay_factor(
                        ev.event_time, anchor, s.popularity_half_life_s)
                    rp = recent_pos[pair]
                    for rank, other in enumerate(rp, start=1):
                        if other == ev.item:
                            continue
                        w = ev.weight / rank
                        co_inc[(p, other, ev.item)] += w
                        co_inc[(p, ev.item, other)] += w
                    recent_pos[pair] = ([ev.item] + [x for x in rp if x != ev.item])[
                        : s.cooc_window]
                t.recent_pos = recent_pos[pair]
            for pair, t in out.touched.items():
                t.recent_pos = recent_pos[pair]
            self._flush_pop(tx, pop_inc, None)
            for (p, a, b), w in co_inc.items():
                ck = self.k("co", p, a)
                tx.zincrby(ck, w, b)
                trim_co.add(ck)
            for key in trim_recent:
                tx.ltrim(key, 0, s.recent_len - 1)
            for key in trim_seen:
                tx.zremrangebyrank(key, 0, -(s.seen_len + 1))
            for key in trim_eids:
                tx.zremrangebyrank(key, 0, -(s.eid_keep + 1))
            for key in trim_co:
                tx.zremrangebyrank(key, 0, -(s.cooc_keep + 1))
            for (key, fld), n in stats.items():
                tx.hincrby(key, fld, int(n))
            for q, fields in new_wm.items():
                tx.hset(self.wm_key(q), mapping=fields)
            tx.hincrby(self.k("stats"), "events_applied", out.applied)
            tx.hincrby(self.k("stats"), "duplicates_offset", out.dup_offset)
            tx.hincrby(self.k("stats"), "duplicates_event", out.dup_event)
            await tx.execute()
        return out

    def _flush_pop(self, tx, pop_inc: dict[tuple[str, str], float],  # type: ignore[no-untyped-def]
                   platform: str | None) -> None:
        for (p, item) in [key for key in pop_inc if platform is None or key[0] == platform]:
            tx.zincrby(self.k("pop", p), pop_inc.pop((p, item)), item)

    # -------------------------------------------------------------- recommend
    async def recommend(self, touched: dict[tuple[str, str], Touched]) -> list[Recommendations]:
        if not touched:
            return []
        return await self._retry("recommend", lambda: self._recommend_once(touched))

    async def _recommend_once(self, touched: dict[tuple[str, str], Touched]
                              ) -> list[Recommendations]:
        s = self.s
        platforms = sorted({p for _, p in touched})
        items = sorted({(p, i) for (_, p), t in touched.items() for i in t.recent_pos})
        rd = self.r.pipeline(transaction=False)
        for p in platforms:
            rd.zrevrange(self.k("pop", p), 0, s.pop_candidates - 1, withscores=True)
        for p, i in items:
            rd.zrevrange(self.k("co", p, i), 0, 49, withscores=True)
        res = await rd.execute()
        pop = dict(zip(platforms, res[: len(platforms)], strict=True))
        co = dict(zip(items, res[len(platforms):], strict=True))

        # rank without exclusions, then check the head of each list against the seen set
        ranked: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for (u, p), t in touched.items():
            nb = [co[(p, i)] for i in t.recent_pos]
            ranked[(u, p)] = popco_rank(pop[p], nb, lambda _i: False, 10**9, s.cooc_blend)
        heads = {pair: [i for i, _ in lst[: 4 * s.rec_k]] for pair, lst in ranked.items()}
        seen = await self._seen(heads)
        short = {pair: [i for i, _ in ranked[pair][4 * s.rec_k:]] for pair in ranked
                 if sum(1 for i in heads[pair] if i not in seen[pair]) < s.rec_k}
        if short:
            more = await self._seen(short)
            for pair, st in more.items():
                seen[pair] |= st
        now = time.time()
        out = []
        for (u, p), t in touched.items():
            top = [RecItem(item=i, score=sc) for i, sc in ranked[(u, p)]
                   if i not in seen[(u, p)]][: s.rec_k]
            out.append(Recommendations(
                user=u, platform=p, items=top, scorer=SCORER_VERSION,
                event_time=t.event_time,
                produced_at=t.produced_at if math.isfinite(t.produced_at) else now,
                published_at=now, events=t.events))
        return out

    async def _seen(self, cands: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str],
                                                                             set[str]]:
        pairs = [pair for pair, lst in cands.items() if lst]
        rd = self.r.pipeline(transaction=False)
        for u, p in pairs:
            rd.zmscore(self.k("u", u, p, "seen"), cands[(u, p)])
        res = await rd.execute() if pairs else []
        out: dict[tuple[str, str], set[str]] = {pair: set() for pair in cands}
        for pair, scores in zip(pairs, res, strict=True):
            out[pair] = {i for i, sc in zip(cands[pair], scores, strict=True) if sc is not None}
        return out

    async def cache(self, recs: Iterable[Recommendations]) -> None:
        recs = list(recs)
        if not recs:
            return

        async def _do() -> None:
            pipe = self.r.pipeline(transaction=False)
            for rec in recs:
                pipe.set(self.k("recs", rec.platform, rec.user), rec.model_dump_json(),
                         ex=self.s.recs_ttl_s)
            pipe.hincrby(self.k("stats"), "recommendations", len(recs))
            await pipe.execute()

        await self._retry("cache", _do)

    # ------------------------------------------------------------------ reads
    async def cached_recs(self, platform: str, user: str) -> Recommendations | None:
        raw = await self.r.get(self.k("recs", platform, user))
        return Recommendations.model_validate_json(raw) if raw else None

    async def stats(self) -> dict[str, int]:
        raw = await self.r.hgetall(self.k("stats"))
        return {k: int(v) for k, v in raw.items()}


def _positives(entries: list[str], n: int) -> list[str]:
    out: list[str] = []
    for e in entries:
        try:
            item, label = json.loads(e)[:2]
        except (ValueError, TypeError):
            continue
        if label == 1 and item not in out:
            out.append(item)
            if len(out) >= n:
                break
    return out
