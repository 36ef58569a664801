"""User feature state and scorer aggregates in Redis, updated idempotently in micro-batches.

Exactly-once effect on at-least-once delivery
---------------------------------------------
(The whole batch is applied by one Lua script, ``lua/apply.lua``: Redis runs it alone, so
the watermarks and the state they cover change together or not at all.)

Every :class:`Interaction` carries the topic/partition/offset of the *platform* event it
came from. Unified events are keyed by user, so all events of one source partition that
land in unified partition ``q`` arrive there in source-offset order. For each pair
(``q``, source partition) a watermark hash holds the highest source offset applied; a
batch is applied by one script that also advances the watermarks. So:

* a unified record redelivered after a crash has offset ≤ watermark → skipped;
* a platform event normalized twice (normalize crashed before committing) yields a second
  unified record with the same source offset → skipped;
* a platform that sends the same event twice (same event id, new offset) is skipped by the
  (user, platform)'s fingerprints of its last ``XREC_EID_KEEP`` event ids;
* two workers racing on one partition during a rebalance: scripts run one at a time, so
  the second skips what the first applied.

Redis Cluster (``REDIS_URL=redis+cluster://host:port,…``): the same script runs once per
tag-shard of the batch's users, with that shard's key prefix ``<prefix>{sNN}:`` (see
:mod:`streams.keys`): every key it touches, the shard's watermarks included, is in the
slot of ``{sNN}``. Each event belongs to one user, so to one shard, and its watermark check
and its effects are in the same atomic call: exactly-once holds per shard, hence overall.
The global aggregates (popularity, co-occurrence, users, counters) are kept per shard in
that same call and summed by the readers. A batch whose calls partly failed is retried
whole: the shards that applied skip it. ``XREC_REDIS_WAIT_REPLICAS`` > 0 makes each apply
wait until that many replicas acknowledged it (``WAIT``), so a failover cannot lose an
applied batch whose offsets the worker then commits.

Redis keys (prefix ``XREC_REDIS_PREFIX``, default ``xrec:``), all keyed by pseudonymous
user keys only::

    wm:<epoch>:<unified topic>:<q>  hash  "<src topic>:<src partition>" → offset
    dlwm:<epoch>                    hash  "<src topic>:<src partition>" → highest offset
                                          whose dead letter was counted (exactly once)
    u:<user>:<platform>:seen        zset  item → last event time, whole seconds (consumed
                                          items, the newest XREC_SEEN_LEN kept)
    u:<user>:<platform>:rpos        list  the last XREC_COOC_WINDOW distinct positive items,
                                          newest first (what a new positive co-occurs with)
    u:<user>:<platform>:ef          string the fingerprints (:func:`event_fp`, 8 characters
                                          each) of the last XREC_EID_KEEP applied event ids,
                                          in arrival order (dedup)
    u:<user>:history                zset  JSON [platform, item, label, time, fingerprint[:6]]
                                          → event time in ms (the newest XREC_HIST_LEN kept):
                                          the cross-platform history the model reads
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
import base64
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.popco import SCORER_VERSION, popco_scores
from streams.explain import popco_reasons
from streams.keys import Keys
from streams.records import Interaction
from streams.settings import Settings

__all__ = ["RedisState", "ApplyResult", "Touched", "AggRow", "RecsOut", "redis_from_url",
           "row_lookup", "is_cluster", "is_cluster_url", "redis_keys", "NotReplicatedError",
           "read_merged", "event_fp", "FP_WIDTH"]

log = logging.getLogger("xrec.state")

_REBASE_EXPONENT = 200.0  # rebase the popularity anchor before 2^e gets large
_CACHE_TTL_S = 1.0  # popularity / co-occurrence lists may be this stale when ranking
_CO_CACHE_MAX = 50_000
#: popularity entries the model ⊕ popco hybrid reads per platform (the rest count as 0)
POP_ROW_MAX = 5000
_Pop = tuple[list[tuple[str, float]], dict[str, float]]
#: errors that mean "Redis is not reachable now" (a failover in a cluster included)
_RETRIED = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError,
            SlotNotCoveredError, RedisClusterUnreachableError)
_LUA_DIR = Path(__file__).parent / "lua"
_LUA_APPLY = (_LUA_DIR / "apply.lua").read_text()
_LUA_UNSEEN = (_LUA_DIR / "unseen.lua").read_text()
_LUA_DEADLETTER = (_LUA_DIR / "deadletter.lua").read_text()
_LUA_CACHE = (_LUA_DIR / "cache.lua").read_text()
_LUA_FORGET = (_LUA_DIR / "forget.lua").read_text()


_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

#: characters of an event id's fingerprint (48 bits): for a user and platform remembering
#: 500 ids, the chance that a new event is taken for one of them is ~2e-12
FP_WIDTH = 8


def event_fp(event_id: str) -> str:
    """The fixed-width fingerprint the apply script remembers of an event id (BLAKE2b,
    6 bytes, URL-safe base64: any event id, however long or structured, costs 8 bytes)."""
    return base64.urlsafe_b64encode(
        hashlib.blake2b(event_id.encode(), digest_size=6).digest()).decode()


class NotReplicatedError(RedisConnectionError):
    """``WAIT`` saw fewer replicas than ``XREC_REDIS_WAIT_REPLICAS`` acknowledge an apply
    in time: retried like an outage (the retry's script skips what was applied)."""


def is_cluster_url(url: str) -> bool:
    return url.startswith(_CLUSTER_SCHEMES)


def is_cluster(r: Any) -> bool:
    """Whether ``r`` is a Redis Cluster client (``redis+cluster://`` URL)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(r, RedisCluster)


def redis_from_url(url: str, timeout_s: float | None = None, decode: bool = True
                   ) -> Any:
    """The worker's Redis clients (state, vectors, head versions). With ``timeout_s`` a
    Redis that stops answering (paused, partitioned) raises after that long, so the call is
    counted and retried with backoff instead of hanging unseen. Retrying is safe: the apply
    script is idempotent.

    ``redis+cluster://[user:password@]host:port[,host:port…]`` (``rediss+cluster://`` for
    TLS) gives a :class:`redis.asyncio.cluster.RedisCluster` seeded with those nodes: with
    it, :class:`RedisState` uses the cluster key layout (:mod:`streams.keys`)."""
    if is_cluster_url(url):
        from streams.security import redis_kwargs  # TLS files from the URL's query

        return _cluster_from_url(url, timeout_s, decode, **redis_kwargs(url))
    return aioredis.Redis.from_url(url, decode_responses=decode, health_check_interval=10,
                                   socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def _cluster_from_url(url: str, timeout_s: float | None, decode: bool, **tls: Any) -> Any:
    from urllib.parse import unquote

    from redis.asyncio.cluster import ClusterNode, RedisCluster

    from streams.errors import ConfigError

    scheme, rest = url.split("://", 1)
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    user = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, password = cred.partition(":")
        user, password = unquote(user) or None, unquote(password) or None
    nodes = []
    for hp in filter(None, netloc.split(",")):
        host, _, port = hp.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"REDIS_URL: {hp!r} is not host:port (expected "
                              "redis+cluster://host:port[,host:port...])")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    if not nodes:
        raise ConfigError("REDIS_URL: redis+cluster:// needs at least one host:port")
    return RedisCluster(startup_nodes=nodes, decode_responses=decode, username=user,
                        password=password, ssl=scheme.startswith("rediss"),
                        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                        health_check_interval=10, **tls)


def redis_keys(r: Any, settings: Settings) -> Keys:
    """The key names for client ``r``: single mode's, or tagged ones on a cluster."""
    return Keys(settings.redis_prefix, settings.redis_shards if is_cluster(r) else 0)


class AggRow:
    """A popularity or co-occurrence list as read from Redis (best first) for the model ⊕
    popco hybrid, with when it was read: ``t`` (monotonic) and ``before``, the number of
    the first apply it does not reflect. A ranking that must not see a batch's own events
    (prequential evaluation) uses only rows with ``before`` ≤ that batch's number."""

    __slots__ = ("items", "vals", "t", "before", "cols", "cvals", "cols_n", "lookup")

    def __init__(self, lst: Sequence[Any], before: int) -> None:
        # (member, score) pairs (RESP3, or built here), or RESP2's flat [member, score, ...]
        if lst and not isinstance(lst[0], (list, tuple)):
            self.items = list(lst[0::2])
            self.vals = np.array(lst[1::2], np.float64)
        else:
            self.items = [x[0] for x in lst]
            self.vals = np.fromiter((x[1] for x in lst), np.float64, len(lst))
        self.t = time.monotonic()
        self.before = before
        #: the serving side's catalog columns of ``items`` (and their values), computed
        #: for a table of ``cols_n`` rows
        self.cols: np.ndarray | None = None
        self.cvals: np.ndarray | None = None
        self.cols_n = -1
        self.lookup: dict[str, float] | None = None  # item → value, made when asked


def row_lookup(row: AggRow) -> dict[str, float]:
    """``row``'s item → value (built once per row, when an explanation needs it)."""
    d = row.lookup
    if d is None:
        d = row.lookup = dict(zip(row.items, row.vals.tolist(), strict=True))
    return d


@dataclass
class Touched:
    """A (user, platform) pair that a batch touched: its recs must be refreshed."""

    events: int = 0
    produced_at: float = math.inf  # oldest produce time covered
    event_time: float = 0.0  # newest event time covered
    recent_pos: list[str] = field(default_factory=list)  # after the batch, newest first
    seen_before: list[str] = field(default_factory=list)  # items had before the batch


class RecsOut:
    """Recommendations (model path and popco scorer), serialised without building pydantic
    objects per item (py-spy: ``RecItem.model_construct`` was 12% of the busy worker's main thread,
    then ``json.dumps`` of the item dicts 13% of the recommend agent's). Same JSON as
    :class:`Recommendations`; consumers validate it as that."""

    def __init__(self, user: str, platform: str, items: list[tuple[str, float]], scorer: str,
                 event_time: float, produced_at: float, published_at: float,
                 events: int, why: Sequence[str] | None = None) -> None:
        self.user, self.platform, self.items, self.scorer = user, platform, items, scorer
        self.event_time, self.produced_at = event_time, produced_at
        self.published_at, self.events = published_at, events
        #: the first items' reasons, as JSON (:mod:`streams.explain`)
        self.why = why or ()

    def model_dump_json(self, **_kw: Any) -> str:
        head = _ITEM_JSON
        parts = []
        why, n_why = self.why, len(self.why)
        for n, (i, sc) in enumerate(self.items):
            pre = head.get(i)
            if pre is None:
                pre = _item_prefix(i)
            if n < n_why:
                parts.append(f'{pre}{sc!r},"why":{why[n]}}}')
            else:
                parts.append(f"{pre}{sc!r}}}")  # float repr is json.dumps' float format
        return (f'{{"user":{_dumps(self.user)},"platform":{_dumps(self.platform)},'
                f'"items":[{",".join(parts)}],"scorer":{_dumps(self.scorer)},'
                f'"event_time":{float(self.event_time)!r},'
                f'"produced_at":{float(self.produced_at)!r},'
                f'"published_at":{float(self.published_at)!r},"events":{int(self.events)}}}')


_dumps = json.JSONEncoder(ensure_ascii=False).encode
#: item id → '{"item":<id as JSON>,"score":' (bounded: cleared when it grows past 10^6)
_ITEM_JSON: dict[str, str] = {}


def _item_prefix(item: str) -> str:
    if len(_ITEM_JSON) > 1_000_000:
        _ITEM_JSON.clear()
    pre = _ITEM_JSON[item] = f'{{"item":{_dumps(item)},"score":'
    return pre


#: one history entry: (platform, item, label, event time)
HistEntry = tuple[str, str, int, float]


@dataclass
class ApplyResult:
    applied: int = 0
    dup_offset: int = 0
    dup_event: int = 0
    touched: dict[tuple[str, str], Touched] = field(default_factory=dict)
    #: (with history) each applied interaction with the user's history before it (empty
    #: for negatives)
    applied_events: list[tuple[Interaction, list[HistEntry]]] = field(default_factory=list)
    #: (with history) each touched user's history after the batch, newest first
    history: dict[str, list[HistEntry]] = field(default_factory=dict)
    #: users whose events this batch skipped because they were erased after producing
    #: them (left out of ``touched``: nothing is recommended to them from those events)
    erased: set[str] = field(default_factory=set)


class RedisState:
    def __init__(self, redis: aioredis.Redis, settings: Settings, unified_topic: str,
                 epoch: str = "0") -> None:
        self.r = redis
        self.s = settings
        self.p = settings.redis_prefix
        self.unified_topic = unified_topic
        self.epoch = epoch
        self.cluster = is_cluster(redis)
        #: key names (single mode: the names above; cluster: :mod:`streams.keys`)
        self.keys = redis_keys(redis, settings)
        self._apply_script = redis.register_script(_LUA_APPLY)
        self._unseen_script = redis.register_script(_LUA_UNSEEN)
        self._deadletter_script = redis.register_script(_LUA_DEADLETTER)
        self._cache_script = redis.register_script(_LUA_CACHE)
        self._forget_sha = redis.register_script(_LUA_FORGET).sha
        self.on_error: Any = None  # called on every retried Redis error (metrics)
        self._pop_cache: dict[str, tuple[float, _Pop]] = {}
        self._co_cache: dict[tuple[str, str], tuple[float, list[tuple[str, float]]]] = {}
        #: the hybrid's rows (:class:`AggRow`): pop:<platform> and co:<platform>:<item>
        self.seq = 0  # applies started
        self.agg_pop: dict[str, AggRow] = {}
        self.agg_co: dict[tuple[str, str], AggRow] = {}
        #: folds of the aggregates ``apply(defer_aggregates=True)`` deferred
        self._folds: set[asyncio.Task[None]] = set()  # running: kept referenced
        #: the last :meth:`cache_later` write (each waits for the one before it)
        self._cache_task: asyncio.Task[None] | None = None
        self.fold_errors = 0

    # ------------------------------------------------------------------ keys
    def k(self, *parts: object) -> str:
        return self.p + ":".join(str(x) for x in parts)

    def wm_key(self, q: int, shard: int = 0) -> str:
        return self.keys.wm(shard, self.epoch, self.unified_topic, q)

    @classmethod
    def from_settings(cls, settings: Settings, unified_topic: str, epoch: str | None = None
                      ) -> RedisState:
        """``RedisState`` on ``settings.redis_url`` (single Redis, or a cluster for a
        ``redis+cluster://`` URL): ``RedisState.from_settings(Settings(redis_url=...), t)``."""
        return cls(redis_from_url(settings.redis_url or "", settings.redis_timeout_s),
                   settings, unified_topic, epoch or settings.state_epoch)

    # --------------------------------------------------------------- retries
    async def _retry(self, what: str, fn):  # type: ignore[no-untyped-def]
        """Back off and retry while Redis is unreachable: the stream waits (backpressure)."""
        delay = 0.1
        while True:
            try:
                return await fn()
            except _RETRIED as exc:
                log.warning("redis unavailable during %s (%s); retrying in %.1fs", what,
                            type(exc).__name__, delay)
                if self.on_error is not None:
                    self.on_error()
                await self._count("redis_errors")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def count_deadletter(self, src_topic: str, src_partition: int, src_offset: int,
                               code: str) -> bool:
        """``deadlettered`` and ``deadletter:<code>`` + 1, exactly once per source record
        (a watermark per source partition, like the state's); waits out Redis outages."""
        keys = [self.keys.dlwm(self.epoch), self.keys.dlstats()]
        args = [f"{src_topic}:{src_partition}", src_offset, code]
        return bool(await self._retry("dead-letter count", lambda: self._deadletter_script(
            keys=keys, args=args)))

    async def _count(self, name: str, n: int = 1) -> None:
        try:
            await self.r.hincrby(self.k("stats"), name, n)
        except Exception:  # noqa: BLE001,S110 - counting must never fail the stream
            pass

    # ------------------------------------------------------------------ apply
    async def apply(self, batch: Sequence[tuple[int, Interaction]], history: int = 0,
                    prefetch: tuple[Iterable[str], Iterable[tuple[str, str]]] | None = None,
                    defer_aggregates: bool = False) -> ApplyResult:
        """Apply a micro-batch of (unified partition, interaction), exactly once in effect.

        One Lua script does the watermark checks and every state update, so the watermark
        and the state it covers change together or not at all. ``prefetch`` (platforms,
        (platform, item) pairs): the hybrid's popularity and co-occurrence rows to read,
        where missing or older than ``_CACHE_TTL_S``, in the same round trip just before
        the script (so they hold nothing of this batch: ``AggRow.before`` = :attr:`seq`).

        ``defer_aggregates``: the batch's popularity and co-occurrence increments (most of
        the script's Redis time: one ``ZINCRBY`` per positive and two per recent positive)
        are queued in Redis with the watermarks, still exactly once, and folded by a call
        this method starts without waiting for it (the serving worker ranks meanwhile); the
        next apply folds first whatever is still queued, so they trail by at most that.
        :meth:`fold` waits for them.
        """
        self.seq += 1
        if not batch:
            return ApplyResult()
        s = self.s
        out = ApplyResult()
        keys = self.keys
        groups: dict[int, tuple[list[Any], list[int]]] = {}  # shard → (rows, batch indices)
        for n, (q, ev) in enumerate(batch):
            t = out.touched.setdefault((ev.user, ev.platform), Touched())
            t.events += 1
            t.produced_at = min(t.produced_at, ev.produced_at)
            t.event_time = max(t.event_time, ev.event_time)
            g = groups.get(sh := keys.shard(ev.user))
            if g is None:
                g = groups[sh] = ([], [])
            g[0].append([q, f"{ev.src_topic}:{ev.src_partition}", ev.src_offset, ev.user,
                         ev.platform, ev.item, ev.label, round(ev.weight, 6),
                         round(ev.event_time, 3), event_fp(ev.event_id),
                         round(ev.produced_at, 3)])
            g[1].append(n)
        cfg = {"win": s.cooc_window, "seen": s.seen_len, "fpw": FP_WIDTH,
               "eids": s.eid_keep, "cokeep": s.cooc_keep,
               "hl": s.popularity_half_life_s, "rebase": _REBASE_EXPONENT, "hist": history,
               "defer": defer_aggregates}
        reqs = {sh: json.dumps({"p": keys.sp(sh), "wm": self.wm_key(0, sh)[:-1], "ev": rows,
                                "cfg": cfg}, separators=(",", ":"))
                for sh, (rows, _) in groups.items()}
        pops, cos = self.agg_stale(*prefetch) if prefetch is not None else ([], [])
        if self.cluster:
            if pops or cos:  # read before the scripts: the rows hold nothing of this batch
                await self._retry("aggregates", lambda: self._fetch_merged(pops, cos,
                                                                           self.seq))
            calls = [(keys.stats(sh), req) for sh, req in reqs.items()]
            raws = await self._retry("apply", lambda: self._eval_many(
                _LUA_APPLY, self._apply_script.sha, calls, wait=True))
            parts = [json.loads(x) for x in raws]
            deferred = [sh for sh, r in zip(reqs, parts, strict=True) if r.get("q")]
            res = _merge_results(parts, [groups[sh][1] for sh in reqs])
        else:
            req = reqs[0]
            if pops or cos:
                raw = await self._retry("apply",
                                        lambda: self._apply_after_reads(req, pops, cos))
            elif s.redis_wait_replicas:
                raw = (await self._retry("apply", lambda: self._eval_many(
                    _LUA_APPLY, self._apply_script.sha, [(None, req)], wait=True)))[0]
            else:
                raw = await self._retry("apply", lambda: self._apply_script(args=[req]))
            res = json.loads(raw)
            deferred = [0] if res.get("q") else []
        if deferred:
            task = asyncio.ensure_future(self._fold(deferred))
            self._folds.add(task)
            task.add_done_callback(self._folds.discard)
        out.applied, out.dup_offset, out.dup_event = res["a"], res["o"], res["e"]
        x = res.get("x")
        if isinstance(x, dict) and x:
            out.erased = set(x)
            for pair in [pair for pair in out.touched if pair[0] in out.erased]:
                del out.touched[pair]
        recent = res.get("r") or {}
        for (u, p), t in out.touched.items():
            rp = recent.get(f"{u}\t{p}") or []
            t.recent_pos = rp if isinstance(rp, list) else []
        if history:
            _histories(out, batch, res, history)
        return out

    def _fold_req(self, shard: int) -> str:
        s = self.s
        return json.dumps({"p": self.keys.sp(shard), "fold": True, "cfg": {
            "hl": s.popularity_half_life_s, "rebase": _REBASE_EXPONENT,
            "cokeep": s.cooc_keep}}, separators=(",", ":"))

    async def _fold(self, shards: Sequence[int]) -> None:
        """Fold the queued aggregate increments of ``shards`` (the apply script's fold
        call). A failure loses nothing: the queue stays, and the next apply folds it."""
        try:
            if self.cluster:
                await self._eval_many(_LUA_APPLY, self._apply_script.sha,
                                      [(self.keys.stats(sh), self._fold_req(sh))
                                       for sh in shards])
            else:
                await self._apply_script(args=[self._fold_req(0)])
        except Exception as exc:  # noqa: BLE001 - the next apply folds what is left
            self.fold_errors += 1
            log.warning("deferred aggregate fold failed (%s: %s); the next apply folds it",
                        type(exc).__name__, exc)

    async def fold(self) -> None:
        """Wait until the aggregates reflect every applied batch: the pending deferred
        fold, then one more of every shard (a crashed worker may have left a queue)."""
        if self._folds:
            await asyncio.gather(*self._folds)
        await self._fold(list(self.keys.all_shards()) if self.cluster else [0])

    async def _eval_many(self, src: str, sha: str,
                         calls: Sequence[tuple[str | None, str | Sequence[Any]]],
                         wait: bool = False) -> list[Any]:
        """Run a script once per (routing key, argument: one JSON string or an ARGV list),
        pipelined (on a cluster: one pipeline per node, the nodes concurrently). ``wait``:
        then ``WAIT`` for
        ``XREC_REDIS_WAIT_REPLICAS`` replicas on each node written (same connection, so it
        covers these writes); fewer acknowledgements raise :class:`NotReplicatedError`."""
        reps = self.s.redis_wait_replicas if wait else 0
        for _ in range(2):
            pipe = self.r.pipeline(transaction=False)
            for key, arg in calls:
                argv = [arg] if isinstance(arg, str) else list(arg)
                if key is None:
                    pipe.evalsha(sha, 0, *argv)
                else:
                    pipe.evalsha(sha, 1, key, *argv)
            n_wait = 0
            if reps:
                ms = self.s.redis_wait_timeout_ms
                if self.cluster:
                    nodes, where = {}, {}
                    for key, _ in calls:
                        node = self.r.get_node_from_key(key)
                        nodes[node.name] = node
                        where[key] = node.name
                    for node in nodes.values():
                        pipe.execute_command("WAIT", reps, ms, target_nodes=node)
                    n_wait = len(nodes)
                else:
                    pipe.execute_command("WAIT", reps, ms)
                    n_wait = 1
            try:
                res = await pipe.execute()
            except NoScriptError:  # a restarted, flushed or new (failed-over) primary
                await self.r.script_load(src)
                continue
            if n_wait:
                acks = res[len(calls):]
                if any(int(a) < reps for a in acks):
                    raise NotReplicatedError(f"WAIT {reps}: acknowledged by {acks}")
                if self.cluster and any(self.r.get_node_from_key(key).name != name
                                        for key, name in where.items()):
                    # a script was redirected (MOVED: failover, resharding), so its WAIT
                    # went elsewhere: again (it skips what it applied, then waits right)
                    raise NotReplicatedError("a slot moved during the apply")
                res = res[:len(calls)]
            return list(res)
        raise RuntimeError("a script could not be loaded into Redis")

    async def _apply_after_reads(self, req: str, pops: list[str], cos: list[tuple[str, str]]
                                 ) -> str:
        """The hybrid's rows, then the apply script, in one pipeline (one round trip)."""
        for _ in range(2):
            pipe = self.r.pipeline(transaction=False)
            self._agg_reads(pipe, pops, cos)
            pipe.evalsha(self._apply_script.sha, 0, req)
            reps = self.s.redis_wait_replicas
            if reps:
                pipe.execute_command("WAIT", reps, self.s.redis_wait_timeout_ms)
            try:
                res = await pipe.execute()
            except NoScriptError:  # a restarted or flushed Redis: load it and go again
                await self.r.script_load(_LUA_APPLY)
                continue
            if reps:
                if int(res[-1]) < reps:
                    raise NotReplicatedError(f"WAIT {reps}: acknowledged by {res[-1]}")
                res = res[:-1]
            self._agg_store(pops, cos, res, self.seq)
            return res[-1]  # type: ignore[no-any-return]
        raise RuntimeError("the apply script could not be loaded into Redis")

    # ------------------------------------------------------ hybrid's aggregates
    def agg_stale(self, pops: Iterable[str], cos: Iterable[tuple[str, str]]
                  ) -> tuple[list[str], list[tuple[str, str]]]:
        """The platforms and (platform, item) pairs whose row is missing or too old."""
        now = time.monotonic()
        ttl = _CACHE_TTL_S
        gp, gc = self.agg_pop.get, self.agg_co.get
        stale_p = [p for p in dict.fromkeys(pops)
                   if (r := gp(p)) is None or now - r.t >= ttl]
        stale_c = [c for c in dict.fromkeys(cos) if (r := gc(c)) is None or now - r.t >= ttl]
        return stale_p, stale_c

    def _agg_reads(self, pipe: Any, pops: list[str], cos: list[tuple[str, str]]) -> None:
        # the raw reply (no ``withscores``: redis-py then leaves it as the server sent it,
        # pairs or a flat list, and AggRow reads either): its conversion into tuples of
        # floats was 6% of a micro-batch (py-spy, bench/hotpath.py)
        for p in pops:
            pipe.execute_command("ZREVRANGE", self.k("pop", p), 0, POP_ROW_MAX - 1, "WITHSCORES")
        n = self.s.cooc_read - 1
        for p, i in cos:
            pipe.execute_command("ZREVRANGE", self.k("co", p, i), 0, n, "WITHSCORES")

    def _agg_store(self, pops: list[str], cos: list[tuple[str, str]], res: Sequence[Any],
                   before: int) -> None:
        for p, lst in zip(pops, res, strict=False):
            self.agg_pop[p] = AggRow(lst, before)
        for c, lst in zip(cos, res[len(pops):], strict=False):
            self.agg_co[c] = AggRow(lst, before)
        if len(self.agg_co) > _CO_CACHE_MAX:  # keep the fresh half
            cutoff = time.monotonic() - _CACHE_TTL_S
            self.agg_co = {k: v for k, v in self.agg_co.items() if v.t >= cutoff}
            if len(self.agg_co) > _CO_CACHE_MAX // 2:
                self.agg_co = {}

    async def fetch_agg(self, pops: Iterable[str], cos: Iterable[tuple[str, str]],
                        seen: Sequence[tuple[str, str]] = ()
                        ) -> dict[tuple[str, str], list[str]]:
        """Read the rows that are missing or too old now (after this batch's apply: their
        ``before`` is the next batch's number); with ``seen`` (user, platform) pairs, also
        their consumed items (as :meth:`seen`), in the same round trip, and return them."""
        stale_p, stale_c = self.agg_stale(pops, cos)
        if not stale_p and not stale_c:
            return await self.seen(seen) if seen else {}
        if self.cluster:
            await self._retry("aggregates", lambda: self._fetch_merged(stale_p, stale_c,
                                                                       self.seq + 1))
            return await self.seen(seen) if seen else {}

        async def _do() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            self._seen_reads(pipe, seen)
            self._agg_reads(pipe, stale_p, stale_c)
            return await pipe.execute()

        res = await self._retry("aggregates", _do)
        n = len(seen)
        self._agg_store(stale_p, stale_c, res[n:], self.seq + 1)
        return {pair: list(lst) for pair, lst in zip(seen, res[:n], strict=True)}

    async def _fetch_merged(self, pops: list[str], cos: list[tuple[str, str]], before: int
                            ) -> None:
        """(cluster) The hybrid's rows, summed over the shards, into ``agg_pop/agg_co``."""
        res = await self._read_merged(pops, cos, POP_ROW_MAX, self.s.cooc_read)
        self._agg_store(pops, cos, res, before)

    async def _read_merged(self, pops: Sequence[str], cos: Sequence[tuple[str, str]],
                           pop_n: int, co_n: int) -> list[list[tuple[str, float]]]:
        """(cluster) Rows of ``pop:<p>`` then ``co:<p>:<item>``, best first, each the sum
        over the shards of the shards' best ``pop_n`` / ``co_n`` entries (an entry that is
        in no shard's best n is missed, as a single Redis's row misses what it trimmed).
        Shard popularity is relative to each shard's anchor: rescaled to the smallest."""
        return await read_merged(self.r, self.keys, pops, cos, pop_n, co_n,
                                 self.s.popularity_half_life_s)

    async def history(self, users: Iterable[str], n: int) -> dict[str, list[HistEntry]]:
        users = list(users)
        rd = self.r.pipeline(transaction=False)
        for u in users:
            rd.zrevrange(self.keys.u(u, "history"), 0, n - 1)
        res = await rd.execute()
        return {u: [_entry(x) for x in lst] for u, lst in zip(users, res, strict=True)}

    async def seen(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
        """Consumed items (``u:<user>:<platform>:seen``) of each (user, platform) pair."""
        pairs = list(pairs)
        if not pairs:
            return {}

        async def _do() -> list[Any]:
            rd = self.r.pipeline(transaction=False)
            self._seen_reads(rd, pairs)
            return await rd.execute()

        res = await self._retry("seen", _do)
        return {pair: list(lst) for pair, lst in zip(pairs, res, strict=True)}

    def _seen_reads(self, pipe: Any, pairs: Iterable[tuple[str, str]]) -> None:
        for u, p in pairs:
            pipe.zrange(self.keys.u(u, p, "seen"), 0, -1)

    # -------------------------------------------------------------- recommend
    async def recommend(self, touched: dict[tuple[str, str], Touched]) -> list[RecsOut]:
        if not touched:
            return []
        return await self._retry("recommend", lambda: self._recommend_once(touched))

    async def _popular(self, platform: str
                       ) -> tuple[list[tuple[str, float]], dict[str, float]]:
        """Top items of a platform, cached for ``_CACHE_TTL_S`` (a global aggregate)."""
        now = time.monotonic()
        hit = self._pop_cache.get(platform)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        if self.cluster:
            lst = (await self._read_merged([platform], [], self.s.pop_candidates, 0))[0]
            self._pop_cache[platform] = (now, (lst, dict(lst)))
            return lst, dict(lst)
        lst = await self.r.zrevrange(self.k("pop", platform), 0, self.s.pop_candidates - 1,
                                     withscores=True)
        lst = [(str(i), float(sc)) for i, sc in lst]
        self._pop_cache[platform] = (now, (lst, dict(lst)))
        return lst, dict(lst)

    async def _neighbours(self, keys: Iterable[tuple[str, str]]
                          ) -> dict[tuple[str, str], list[tuple[str, float]]]:
        now = time.monotonic()
        out: dict[tuple[str, str], list[tuple[str, float]]] = {}
        missing = []
        for key in keys:
            hit = self._co_cache.get(key)
            if hit is not None and now - hit[0] < _CACHE_TTL_S:
                out[key] = hit[1]
            else:
                missing.append(key)
        if missing:
            if self.cluster:
                got = await self._read_merged([], missing, 0, self.s.cooc_read)
            else:
                rd = self.r.pipeline(transaction=False)
                for p, i in missing:
                    rd.zrevrange(self.k("co", p, i), 0, self.s.cooc_read - 1,
                                 withscores=True)
                got = await rd.execute()
            for key, lst in zip(missing, got, strict=True):
                out[key] = [(str(i), float(sc)) for i, sc in lst]
                self._co_cache[key] = (now, out[key])
            if len(self._co_cache) > _CO_CACHE_MAX:
                cutoff = now - _CACHE_TTL_S
                self._co_cache = {k: v for k, v in self._co_cache.items() if v[0] >= cutoff}
                if len(self._co_cache) > _CO_CACHE_MAX // 2:  # all fresh: start over, or
                    self._co_cache = {}  # every batch would pay this O(n) sweep again
        return out

    async def _recommend_once(self, touched: dict[tuple[str, str], Touched]
                              ) -> list[RecsOut]:
        s = self.s
        pop = {p: await self._popular(p) for p in sorted({p for _, p in touched})}
        co = await self._neighbours({(p, i) for (_, p), t in touched.items()
                                     for i in t.recent_pos})
        pairs = list(touched)
        limit = 3 * s.rec_k
        ranked = {}
        for u, p in pairs:
            nb = [co[(p, i)] for i in touched[(u, p)].recent_pos]
            ranked[(u, p)] = popco_scores(pop[p][0], nb, s.cooc_blend, limit, pop[p][1])
        keep = await self._unseen(pairs, ranked, s.rec_k)
        short = [pair for pair in pairs
                 if len(keep[pair]) < s.rec_k and len(ranked[pair]) >= limit]
        if short:  # the user consumed most of the head: rank deeper
            for u, p in short:
                nb = [co[(p, i)] for i in touched[(u, p)].recent_pos]
                ranked[(u, p)] = popco_scores(pop[p][0], nb, s.cooc_blend, 10**6, pop[p][1])
            keep.update(await self._unseen(short, ranked, s.rec_k))
        now = time.time()
        out = []
        n_why = s.explain_top
        for u, p in pairs:
            t = touched[(u, p)]
            lst = ranked[(u, p)]
            # no pydantic objects: validation here cost ~20% of the recommend agent's CPU
            # (py-spy, backlog run)
            items = [lst[i] for i in keep[(u, p)]]
            why = popco_reasons([i for i, _ in items[:n_why]], p, t.recent_pos,
                                [co[(p, i)] for i in t.recent_pos], pop[p][1],
                                pop[p][0][0][1] if pop[p][0] else 0.0, s.cooc_blend) \
                if n_why else None
            out.append(RecsOut(u, p, items, SCORER_VERSION, t.event_time,
                               t.produced_at if math.isfinite(t.produced_at) else now, now,
                               t.events, why))
        return out

    async def _unseen(self, pairs: list[tuple[str, str]],
                      ranked: dict[tuple[str, str], list[tuple[str, float]]], need: int
                      ) -> dict[tuple[str, str], list[int]]:
        """Indices (0-based, in rank order) of the first ``need`` unconsumed items."""
        if self.cluster:  # one call per shard (a user's seen set is in its shard)
            keys = self.keys
            groups: dict[int, list[tuple[str, str]]] = {}
            for pair in pairs:
                groups.setdefault(keys.shard(pair[0]), []).append(pair)
            calls = [(keys.stats(sh), json.dumps(
                {"p": keys.sp(sh), "q": [[u, p, [i for i, _ in ranked[(u, p)]], need]
                                         for u, p in grp]}, separators=(",", ":")))
                for sh, grp in groups.items()]
            raws = await self._eval_many(_LUA_UNSEEN, self._unseen_script.sha, calls)
            pairs = [pair for grp in groups.values() for pair in grp]
            res = [x for raw in raws for x in json.loads(raw)]
        else:
            req = json.dumps({"p": self.p, "q": [[u, p, [i for i, _ in ranked[(u, p)]], need]
                                                 for u, p in pairs]}, separators=(",", ":"))
            res = json.loads(await self._unseen_script(args=[req]))
        return {pair: [i - 1 for i in (idx or [])] if isinstance(idx, list) else []
                for pair, idx in zip(pairs, res, strict=True)}

    async def cache(self, recs: Sequence[tuple[RecsOut, str]]) -> None:
        """Cache each user's latest recommendations: (record, its JSON as published).
        A user erased after the oldest event a record covers is skipped (``cache.lua``)."""
        if not recs:
            return
        if self.cluster:  # one call per shard: the records and the shard's counter
            keys = self.keys
            groups: dict[int, list[Any]] = {}
            for rec, payload in recs:
                sh = keys.shard(rec.user)
                g = groups.get(sh)
                if g is None:
                    g = groups[sh] = [self.s.recs_ttl_s, keys.stats(sh), keys.sk(sh, "erased")]
                g += [keys.recs(rec.platform, rec.user), payload, rec.user,
                      repr(rec.produced_at)]
            sha = self._cache_script.sha
            calls = [(keys.stats(sh), g) for sh, g in groups.items()]
            await self._retry("cache", lambda: self._eval_many(_LUA_CACHE, sha, calls))
            return
        args: list[Any] = [self.s.recs_ttl_s, self.k("stats"), self.k("erased")]
        for rec, payload in recs:
            args += [self.k("recs", rec.platform, rec.user), payload, rec.user,
                     repr(rec.produced_at)]
        await self._retry("cache", lambda: self._cache_script(args=args))

    def cache_later(self, recs: Sequence[tuple[RecsOut, str]]) -> None:
        """:meth:`cache` without waiting for it: the writes keep their order (each waits
        for the one before), and :meth:`cache_flush` waits for all of them (the serving
        worker does before it commits offsets, so what it committed is cached)."""
        if not recs:
            return
        prev = self._cache_task

        async def write() -> None:
            if prev is not None:
                await prev
            await self.cache(recs)

        self._cache_task = asyncio.ensure_future(write())

    async def cache_flush(self) -> None:
        """Wait for every :meth:`cache_later` write (raises what a write raised)."""
        task = self._cache_task
        if task is not None:
            await task
            if self._cache_task is task:
                self._cache_task = None

    # ---------------------------------------------------------------- erasure
    async def forget(self, user: str, at: float, platforms: Sequence[str]) -> int:
        """Erase ``user`` (``lua/forget.lua``, on its shard): mark it erased at ``at``
        (the apply script skips its events produced up to then, wherever they still are)
        and delete every per-user key of the known layout, cached recommendations of
        ``platforms`` included. Idempotent. Returns the keys deleted."""
        sh = self.keys.shard(user)
        req = json.dumps({"p": self.keys.sp(sh), "u": user, "at": round(at, 3),
                          "now": time.time(), "keep": self.s.erasure_keep_s,
                          "plats": sorted(platforms)}, separators=(",", ":"))
        res = await self._retry("forget", lambda: self._eval_many(
            _LUA_FORGET, self._forget_sha, [(self.keys.stats(sh), req)], wait=True))
        return int(res[0])

    async def erased_at(self, users: Iterable[str]) -> dict[str, float]:
        """The erasure time of each of ``users`` that was erased (the others are absent)."""
        users = list(dict.fromkeys(users))
        if not users:
            return {}
        keys = self.keys

        async def _do() -> list[Any]:
            pipe = self.r.pipeline(transaction=False)
            for u in users:
                pipe.zscore(keys.sp(keys.shard(u)) + "erased", u)
            return await pipe.execute()

        res = await self._retry("erased", _do)
        return {u: float(v) for u, v in zip(users, res, strict=True) if v is not None}

    async def erasures_since(self, t: float) -> dict[str, float]:
        """Users erased at a time after ``t`` (every shard): user → erasure time."""
        pipe = self.r.pipeline(transaction=False)
        for sh in self.keys.all_shards():
            pipe.zrangebyscore(self.keys.sp(sh) + "erased", f"({t!r}", "+inf",
                               withscores=True)
        return {(u.decode() if isinstance(u, bytes) else u): float(at)
                for part in await self._retry("erasures", pipe.execute) for u, at in part}

    async def user_keys(self, user: str) -> list[str]:
        """Every key that names ``user`` (a SCAN of the whole key space, every node of a
        cluster: slow on a big deployment; what ``xrec forget`` checks and cleans with)."""
        sp = self.keys.sp(self.keys.shard(user))
        out: list[str] = []
        for pattern in (f"{sp}u:{user}:*", f"{sp}recs:*:{user}"):
            async for k in self.r.scan_iter(match=pattern, count=1000):
                out.append(k.decode() if isinstance(k, bytes) else k)
        return sorted(set(out))

    # ------------------------------------------------------------------ reads
    async def stats(self) -> dict[str, int]:
        """The counters (on a cluster: summed over the shards' and the global hashes)."""
        if not self.cluster:
            raw = await self.r.hgetall(self.k("stats"))
            return {k: int(v) for k, v in raw.items()}
        pipe = self.r.pipeline(transaction=False)
        for key in self.keys.stats_keys():
            pipe.hgetall(key)
        out: dict[str, int] = {}
        for raw in await pipe.execute():
            for k, v in raw.items():
                k = k.decode() if isinstance(k, bytes) else k
                out[k] = out.get(k, 0) + int(v)
        return out

    async def users(self) -> set[str]:
        """Every user key applied (on a cluster: the union of the shards' sets)."""
        pipe = self.r.pipeline(transaction=False)
        for sh in self.keys.all_shards():
            pipe.smembers(self.keys.users(sh))
        return {u for part in await pipe.execute() for u in part}

    async def popular(self, platform: str, n: int) -> list[tuple[str, float]]:
        """``pop:<platform>``'s best ``n`` (on a cluster: merged over the shards)."""
        if self.cluster:
            return (await self._read_merged([platform], [], n, 0))[0]
        lst = await self.r.zrevrange(self.k("pop", platform), 0, n - 1, withscores=True)
        return [(str(i), float(sc)) for i, sc in lst]

    async def neighbours(self, platform: str, item: str, n: int) -> list[tuple[str, float]]:
        """``co:<platform>:<item>``'s best ``n`` (on a cluster: merged over the shards)."""
        if self.cluster:
            return (await self._read_merged([], [(platform, item)], 0, n))[0]
        lst = await self.r.zrevrange(self.k("co", platform, item), 0, n - 1, withscores=True)
        return [(str(i), float(sc)) for i, sc in lst]


async def read_merged(r: Any, keys: Keys, pops: Sequence[str], cos: Sequence[tuple[str, str]],
                      pop_n: int, co_n: int, hl: float) -> list[list[tuple[str, float]]]:
    """(cluster) :meth:`RedisState._read_merged` for any client (the read API uses it)."""
    shards = keys.all_shards()
    pipe = r.pipeline(transaction=False)
    for p in pops:
        for sh in shards:
            pipe.hget(keys.popmeta(sh, p), "anchor")
            pipe.zrevrange(keys.pop(sh, p), 0, pop_n - 1, withscores=True)
    for p, i in cos:
        for sh in shards:
            pipe.zrevrange(keys.co(sh, p, i), 0, co_n - 1, withscores=True)
    raw = await pipe.execute()
    out: list[list[tuple[str, float]]] = []
    at, ns = 0, len(shards)
    for _ in pops:
        part = raw[at:at + 2 * ns]
        at += 2 * ns
        anchors = [float(a) for a in part[0::2] if a is not None]
        a0 = min(anchors, default=0.0)
        rows, weights = [], []
        for a, row in zip(part[0::2], part[1::2], strict=True):
            if row:
                rows.append(row)
                weights.append(2.0 ** ((float(a) - a0) / hl) if a is not None else 1.0)
        out.append(_merge_rows(rows, weights, pop_n))
    for _ in cos:
        out.append(_merge_rows(raw[at:at + ns], None, co_n))
        at += ns
    return out


def _merge_rows(rows: Sequence[Sequence[tuple[Any, float]]], weights: Sequence[float] | None,
                n: int) -> list[tuple[str, float]]:
    """Sum rows of (member, score); the best ``n``, in ZREVRANGE's order (score, then
    member, descending)."""
    acc: dict[str, float] = {}
    get = acc.get
    for k, row in enumerate(rows):
        w = weights[k] if weights is not None else 1.0
        for m, sc in row:
            m = m.decode() if isinstance(m, bytes) else str(m)
            acc[m] = get(m, 0.0) + float(sc) * w
    return sorted(acc.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:n]


def _merge_results(parts: Sequence[dict[str, Any]], index: Sequence[Sequence[int]]
                   ) -> dict[str, Any]:
    """(cluster) The per-shard answers of the apply script as one answer for the batch:
    counts summed, dicts joined (a user is in one shard), ``i`` mapped back to 1-based
    batch positions, in batch order."""
    out: dict[str, Any] = {"a": 0, "o": 0, "e": 0, "r": {}, "h": {}, "s": {}, "i": []}
    for res, idx in zip(parts, index, strict=True):
        out["a"] += res["a"]
        out["o"] += res["o"]
        out["e"] += res["e"]
        for k in ("r", "h", "s"):
            d = res.get(k)
            if isinstance(d, dict):
                out[k].update(d)
        i = res.get("i")
        if isinstance(i, list):
            out["i"].extend(idx[int(x) - 1] + 1 for x in i)
    out["i"].sort()
    return out


def _entry(raw: str) -> HistEntry:
    p, item, label, t = json.loads(raw)[:4]
    return (str(p), str(item), int(label), float(t))


def _histories(out: ApplyResult, batch: Sequence[tuple[int, Interaction]], res: dict,  # type: ignore[type-arg]
               n: int) -> None:
    """Rebuild each applied positive's history-before from the pre-batch lists the script
    read (negatives need none: nothing ranks or trains on them)."""
    hist: dict[str, list[HistEntry]] = {}
    for u, joined in (res.get("h") or {}).items():
        # one parse per user: the script joined the JSON entries [p, item, label, t, eid]
        rows = json.loads("[" + joined + "]") if isinstance(joined, str) and joined else []
        hist[u] = [(r[0], r[1], int(r[2]), float(r[3])) for r in rows]
    seen = res.get("s") or {}
    for (u, p), t in out.touched.items():
        lst = seen.get(f"{u}\t{p}")
        t.seen_before = lst if isinstance(lst, list) else []
    idx = res.get("i") or []
    for i in (idx if isinstance(idx, list) else []):
        ev = batch[int(i) - 1][1]
        h = hist.setdefault(ev.user, [])
        out.applied_events.append((ev, list(h) if ev.label == 1 else []))
        t = float(ev.event_time)
        at = 0  # newest first by event time, as the script keeps it
        while at < len(h) and h[at][3] > t:
            at += 1
        h.insert(at, (ev.platform, ev.item, int(ev.label), t))
        del h[n:]
    out.history = hist
