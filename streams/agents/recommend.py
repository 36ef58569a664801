"""The recommend agent: one micro-batch of unified events, top to bottom.

=========  ==========================================================================
stage      what it does
=========  ==========================================================================
decode     unified records → :class:`Interaction` (a bad one → dead letter)
apply      one Lua script: watermarks, user state, history, popularity, co-occurrence
tower      (model) one user-tower pass for every ranking request of the batch
evaluate   (model) each new positive ranked by the served version *before* it learns
           from it (prequential quality)
rank       recommendations: exclusions as a mask, top-K by partial sort (model), or
           popularity ⊕ co-occurrence before the first head version / without the model
drift      the drift monitor
examples   a ``TrainingExample`` per applied positive → ``xrec.train.examples``
publish    ``Recommendations`` → ``xrec.recs.<platform>``
cache      the same JSON → Redis ``recs:<platform>:<user>``
=========  ==========================================================================

Each stage's time per micro-batch is on ``/metrics`` (``xrec_recommend_stage_ms{stage}``)
and batch sizes in ``xrec_recommend_batch_events``.

Which recommendations a batch refreshes: for every (user, platform) the batch touched,
that platform's at once; a user's *other* platforms (those in their cross-platform
history) at most once per ``XREC_CROSS_REFRESH_S`` per user and platform, by the first
event after the interval, with the head version served then (:class:`CrossRefresh`). So
the cost of an event does not grow with the number of platforms its user has. A user
touched by several events of one batch is ranked once per platform.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from streams.agents.batching import consume_batches
from streams.agents.context import Context
from streams.agents.drift import DriftWatch
from streams.heads import Ask, ModelServer, examples_json, recent_positives
from streams.metrics import StageClock
from streams.records import DeadLetter, Forget, Interaction
from streams.state import ApplyResult, RecsOut, Touched

__all__ = ["Recommender", "CrossRefresh", "install"]

log = logging.getLogger("xrec.worker")

Pair = tuple[str, str]


class CrossRefresh:
    """When a user's recommendations on a platform other than the event's are due again.

    A pair (user, platform) is due when it was not refreshed for ``every_s`` seconds (or
    never, as far as this worker remembers: the newest ``keep`` pairs). ``every_s`` = 0
    refreshes every platform of the user on every event."""

    def __init__(self, every_s: float, keep: int = 500_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.keep = keep
        self.clock = clock
        self._last: dict[Pair, float] = {}

    def due(self, pair: Pair, now: float | None = None) -> bool:
        last = self._last.get(pair)
        return last is None or (self.clock() if now is None else now) - last >= self.every_s

    def mark(self, pair: Pair, now: float | None = None) -> None:
        self._last.pop(pair, None)  # re-insert: the dict stays ordered oldest first
        self._last[pair] = self.clock() if now is None else now
        if len(self._last) > self.keep:
            del self._last[next(iter(self._last))]


class Recommender:
    """The recommend agent's body, callable without Faust (tests, profiling)."""

    def __init__(self, ctx: Context, drift: DriftWatch | None = None) -> None:
        self.ctx = ctx
        self.s = ctx.settings
        self.drift = drift
        self.cross = CrossRefresh(self.s.cross_refresh_s)
        self.recs_topic = {p: ctx.topics.recs(p) for p in ctx.platforms}
        #: (user, platform) → its recent positive items after the last batch that ranked
        #: it (what the hybrid's co-occurrence rows are read for, ahead of the next apply)
        self._recent: dict[Pair, list[str]] = {}
        self._recent_keep = 500_000

    def _prefetch(self, batch: Sequence[tuple[int, Interaction]]
                  ) -> tuple[list[str], list[tuple[str, str]]]:
        """The rows this batch's rankings will read: each touched platform's popularity,
        and the co-occurrence rows of the touched pairs' recent positives (as remembered)
        and of the batch's positive items."""
        plats: dict[str, None] = {}
        cos: dict[tuple[str, str], None] = {}
        get = self._recent.get
        for _, ev in batch:
            plats[ev.platform] = None
            for i in get((ev.user, ev.platform), ()):
                cos[(ev.platform, i)] = None
            if ev.label == 1:
                cos[(ev.platform, ev.item)] = None
        return list(plats), list(cos)

    def _remember(self, pair: Pair, items: list[str]) -> None:
        r = self._recent
        r.pop(pair, None)  # re-insert: oldest first
        r[pair] = items
        if len(r) > self._recent_keep:
            del r[next(iter(r))]

    @property
    def server(self) -> ModelServer | None:
        return self.ctx.server  # type: ignore[no-any-return]

    async def handle(self, msgs: Sequence[tuple[str, int, int, bytes | None]]
                     ) -> dict[str, Any]:
        """One micro-batch of (topic, partition, offset, value) unified records."""
        ctx, s, m = self.ctx, self.s, self.ctx.metrics
        clock = StageClock()
        batch: list[tuple[int, Interaction]] = []
        bad: list[DeadLetter] = []
        forgets: list[Forget] = []
        for topic, part, off, value in msgs:
            try:
                if value is not None and value.startswith(b'{"forget"'):
                    forgets.append(Forget.model_validate_json(value))
                    continue
                batch.append((part, Interaction.model_validate_json(value or b"")))
            except ValidationError as exc:
                bad.append(ctx.bad_unified(topic, part, off, value, str(exc)))
        m.events_in.inc(len(msgs), ctx.topics.unified)
        for d in bad:
            await ctx.dead(d)
        now = time.time()
        lags = [(now - ev.produced_at) * 1000 for _, ev in batch]
        ctx.batch_stats["lag_ms"].extend(lags)
        m.input_lag_ms.observe_many(lags)
        clock.lap("decode")

        server = self.server
        prefetch = (self._prefetch(batch) if server is not None and server.ready
                    and s.hybrid_weight > 0 else None)
        result = await ctx.state.apply(batch, history=s.hist_len if ctx.use_model else 0,
                                       prefetch=prefetch, defer_aggregates=s.defer_aggregates)
        if forgets:
            await self._forget(forgets, result)
        clock.lap("apply")
        if server is not None and server.ready:
            ranks, recs, n_cross = await self._rank_model(server, result, clock)
        else:
            recs = await ctx.state.recommend(result.touched)
            ranks, n_cross = [None] * len(result.applied_events), 0
            clock.lap("rank")
        published_at = time.time()
        payloads = []
        by_topic: dict[str, list[tuple[bytes | None, bytes]]] = {}
        for rec in recs:
            rec.__dict__["published_at"] = published_at  # frozen model, fresh stamp
            payload = rec.model_dump_json()  # once: the topic and the cache share it
            payloads.append((rec, payload))
            by_topic.setdefault(self.recs_topic[rec.platform], []).append(
                (rec.user.encode(), payload.encode()))
        for topic, records in by_topic.items():
            await ctx.publish_many(topic, records)
        clock.lap("publish")
        # after the recommendations are out: nothing below delays them
        if self.drift is not None:
            await self.drift.watch(result.applied_events, ranks)
            clock.lap("drift")
        if ctx.use_model:
            await ctx.publish_many(ctx.topics.train_examples, examples_json(
                result.applied_events, time.time(),
                server.horizon if server is not None else None))
            clock.lap("examples")
        # the read API's copy, written while the next batch runs (in order; flushed before
        # offsets are committed: Context.guard_commits)
        ctx.state.cache_later(payloads)
        clock.lap("cache")

        for stage, ms in clock.ms.items():
            m.stage_ms.observe(ms, stage)
        m.batch_events.observe(len(msgs))
        m.batch_ms.observe(clock.total_ms)
        m.recs_out.inc(len(recs) - n_cross, "event")
        if n_cross:
            m.recs_out.inc(n_cross, "cross")
        m.e2r_ms.observe_many([(published_at - rec.produced_at) * 1000 for rec in recs])
        if server is not None:
            m.head_version.set(server.version)
        st = ctx.batch_stats
        st["batches"] += 1
        st["events"] += len(msgs)
        st["ms"] += clock.total_ms
        st["last"] = time.time()
        return {"events": len(msgs), "applied": result.applied, "recs": len(recs),
                "cross": n_cross, "ms": dict(clock.ms)}

    async def _rank_model(self, server: ModelServer, result: ApplyResult, clock: StageClock
                          ) -> tuple[list[float | None], list[Any], int]:
        """Prequential ranks and recommendations from one pass of the served version."""
        ctx, s = self.ctx, self.s
        applied, touched = result.applied_events, result.touched
        evals, meta = server.prequential_asks(
            applied, {k: t.seen_before for k, t in touched.items()})
        hybrid = s.hybrid_weight > 0
        if hybrid:  # rows read before this batch's apply only: nothing of its own events
            self._attach(evals, ctx.state.seq)
        clock.lap("evaluate")

        # items each pair consumed in this batch (the script added them to its seen set)
        consumed: dict[Pair, list[str]] = {}
        for ev, _ in applied:
            consumed.setdefault((ev.user, ev.platform), []).append(ev.item)
        newest: dict[str, Touched] = {}  # per user: the touched pair with the newest event
        for (u, _), t in touched.items():
            if u not in newest or t.event_time > newest[u].event_time:
                newest[u] = t
        mono = time.monotonic()
        cross: list[Pair] = []
        for u, hist in result.history.items():
            if u not in newest:
                continue
            for q in dict.fromkeys(p for p, _, _, _ in hist):
                pair = (u, q)
                if pair not in touched and q in self.recs_topic and self.cross.due(pair, mono):
                    cross.append(pair)
        pairs = [*touched, *cross]
        if hybrid:  # the rows and the cross pairs' consumed items: one round trip
            recent = [recent_positives(result.history.get(u, []), p, s.cooc_window)
                      for u, p in pairs]
            seen = await ctx.state.fetch_agg(
                {p for _, p in pairs},
                [(p, i) for (_, p), r in zip(pairs, recent, strict=True) for i in r], cross)
        else:
            seen = await ctx.state.seen(cross) if cross else {}
        asks = [Ask(result.history.get(u, []), p, newest[u].event_time,
                    exclude=touched[(u, p)].seen_before if (u, p) in touched else seen[(u, p)],
                    extra=consumed.get((u, p), ())) for u, p in pairs]
        if hybrid:
            self._attach(asks, None, recent)
            for pair, r in zip(pairs, recent, strict=True):
                self._remember(pair, r)
        clock.lap("rank")

        answers = server.answer(evals + asks, s.rec_k, clock)
        ranks = server.record_ranks(answers[:len(evals)], meta, len(applied))  # type: ignore[arg-type]
        clock.lap("evaluate")

        now = time.time()
        out: list[Any] = []
        fallback: dict[Pair, Touched] = {}
        n_cross = 0
        for (u, p), a, items in zip(pairs, asks, answers[len(evals):], strict=True):
            t = touched.get((u, p))
            if not items:
                if t is not None:  # nothing the model can rank here: the popco scorer
                    fallback[(u, p)] = t
                continue
            base = t if t is not None else newest[u]
            out.append(RecsOut(u, p, items, server.scorer, base.event_time,  # type: ignore[arg-type]
                               base.produced_at if math.isfinite(base.produced_at) else now,
                               now, t.events if t is not None else 0, a.why))
            self.cross.mark((u, p), mono)
            n_cross += t is None
        if fallback:
            out += await ctx.state.recommend(fallback)
        clock.lap("rank")
        return ranks, out, n_cross


    async def _forget(self, forgets: Sequence[Forget], result: ApplyResult) -> None:
        """Carry out this batch's erasures after its apply: the user's keys deleted and
        marked (``RedisState.forget``: repeated, harmless), nothing of the user ranked,
        trained on or published from this batch, tombstones on every recommendation topic
        (after anything this worker published for the user before: same partition, same
        producer), and what this worker remembers of the user dropped. A crash before the
        batch's offsets are committed redoes all of it."""
        ctx = self.ctx
        gone = {f.forget for f in forgets}
        for f in forgets:
            await ctx.state.forget(f.forget, f.at, list(self.recs_topic))
        for pair in [p for p in result.touched if p[0] in gone]:
            del result.touched[pair]
        result.applied_events = [(ev, h) for ev, h in result.applied_events
                                 if ev.user not in gone]
        for u in gone:
            result.history.pop(u, None)
        for memo in (self._recent, self.cross._last):  # what this worker remembers of them
            for pair in [p for p in memo if p[0] in gone]:
                del memo[pair]
        for topic in self.recs_topic.values():
            for u in sorted(gone):
                await ctx.publish(topic, u.encode(), None)  # type: ignore[arg-type]
        ctx.metrics.erasures.inc(len(forgets))
        log.info("erased %d user(s) in order with their events", len(gone))

    def _attach(self, asks: Sequence[Ask], before: int | None,
                recent: Sequence[list[str]] | None = None) -> None:
        """Give each ask the hybrid's rows: its platform's popularity and the
        co-occurrence rows of its recent positives, only rows read before apply number
        ``before`` when given (a missing row counts as empty)."""
        st, win = self.ctx.state, self.s.cooc_window
        lim = math.inf if before is None else before
        pops, cos = st.agg_pop, st.agg_co
        for n, a in enumerate(asks):
            items = recent[n] if recent is not None else recent_positives(
                a.history, a.platform, win)
            pop = pops.get(a.platform)
            a.pop = pop if pop is not None and pop.before <= lim else None
            co = [(i, r) for i in items if (r := cos.get((a.platform, i))) is not None
                  and r.before <= lim]
            a.co = [r for _, r in co]
            a.co_src = [i for i, _ in co]


def install(ctx: Context) -> Recommender:
    s, app, wd = ctx.settings, ctx.app, ctx.watchdog
    if ctx.use_model:
        ctx.server = ModelServer(s, ctx.vectors, worker=ctx.worker)
        app.xrec_server = ctx.server
    drift = DriftWatch(ctx) if s.drift_enabled else None
    core = Recommender(ctx, drift)
    unified = app.topic(ctx.topics.unified, key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")
    ctx.agent_of_topic[ctx.topics.unified] = "recommend"
    wd.register("recommend")

    async def batch(events: list[Any]) -> None:
        wd.begin("recommend")
        await core.handle([(ev.message.topic, ev.message.partition, ev.message.offset,
                            ev.value) for ev in events])
        wd.done("recommend")

    @app.agent(unified, name="xrec.recommend")
    async def recommend(stream: Any) -> None:
        await consume_batches(stream, s.batch_max, s.batch_interval_s, batch)

    server = ctx.server
    if server is not None:
        @app.timer(s.head_poll_s)
        async def swap_heads() -> None:
            try:
                await server.poll()
            except Exception as exc:  # noqa: BLE001 - retried at the next tick
                log.warning("head version check failed: %s", exc)

        @app.timer(s.quality_window_s)
        async def quality() -> None:
            try:
                m = ctx.metrics
                for w in server.quality_windows():
                    await ctx.publish(ctx.topics.quality, w.platform.encode(),
                                      w.model_dump_json().encode())
                    m.quality_events.set(w.n, w.platform, w.cohort)
                    if w.recall_at_10 is not None:
                        m.quality_recall.set(w.recall_at_10, w.platform, w.cohort)
                    if w.ndcg_at_10 is not None:
                        m.quality_ndcg.set(w.ndcg_at_10, w.platform, w.cohort)
            except Exception:  # a report must never take the worker down
                log.exception("quality window report failed")

    if drift is not None:
        @app.timer(s.quality_window_s)
        async def drift_windows() -> None:
            try:
                await drift.report()
            except Exception:  # a report must never take the worker down
                log.exception("drift window report failed")

    return core
