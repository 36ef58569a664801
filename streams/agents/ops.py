"""What operators see of a worker: ``/metrics``, ``/healthz``, the stall watchdog, the
loop watch, the worker's announcements in Redis and a progress line every 10 s."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from streams.agents.context import Context
from streams.gctune import freeze_startup
from streams.watchdog import LoopWatch

__all__ = ["install"]

log = logging.getLogger("xrec.worker")


def install(ctx: Context) -> None:
    app, s, m, wd = ctx.app, ctx.settings, ctx.metrics, ctx.watchdog
    stalled: dict[str, str] = {}
    worker_info: dict[str, Any] = {"ready": False}
    frozen: list[int] = []

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        """prometheus_client's exposition: text 0.0.4, or OpenMetrics when the scraper's
        ``Accept`` asks for it (Prometheus does)."""
        body, content_type = m.registry.exposition(request.headers.get("Accept"))
        return web.bytes(body, headers={"Content-Type": content_type})

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """live: the event loop answers; ready: partitions assigned and recovery done;
        stalled: agents the watchdog found stuck, with the reason. 200 only when ready
        and nothing is stalled."""
        last = ctx.batch_stats.get("last")
        server = ctx.server
        body = {"live": True, "ready": bool(worker_info.get("ready")),
                "stalled": dict(stalled), "agents": sorted(ctx.wanted), "pid": os.getpid(),
                "last_batch_age_s": None if last is None else round(time.time() - last, 3),
                "head_version": server.version if server is not None else None}
        return web.json(body, status=200 if body["ready"] and not stalled else 503)

    def consumer_lag() -> dict[str, int]:
        """Per topic: the broker's log end, as its fetch responses report it, minus this
        worker's committed offset, over its assigned partitions. Exact on Apache Kafka;
        Tansu under-reports the log end when record batches hold several records
        (DESIGN.md). No ListOffsets request per check (see the README's note on it)."""
        out: dict[str, int] = {}
        try:
            c = app.consumer
            committed = c._committed_offset  # Faust's own bookkeeping (next offset to read)
            for tp in c.assignment():
                hw = c.highwater(tp)
                pos = committed.get(tp)
                if hw is None or pos is None:
                    continue
                out[tp.topic] = out.get(tp.topic, 0) + max(0, int(hw) - int(pos))
        except Exception:  # noqa: BLE001 - not started / rebalancing: unknown this tick
            return {}
        return out

    @app.timer(min(5.0, s.stall_after_s / 3))
    async def watchdog() -> None:
        try:
            per_agent: dict[str, int] = {}
            for topic, n in consumer_lag().items():
                m.consumer_lag.set(n, topic)
                a = ctx.agent_of_topic.get(topic)
                if a is not None:
                    per_agent[a] = per_agent.get(a, 0) + n
            now_stalled = wd.check(per_agent)
            for a in wd.agents:
                m.agent_idle.set(round(wd.idle_s(a), 3), a)
                m.agent_stalled.set(1 if a in now_stalled else 0, a)
                if a in now_stalled and a not in stalled:
                    m.stalls.inc(1, a)
            stalled.clear()
            stalled.update(now_stalled)
        except Exception:  # a report must never take the worker down
            log.exception("watchdog check failed")

    server = ctx.server
    if server is not None:
        seen = [0]  # the newest head version whose swap this worker has counted
        started = time.time()  # (worker ids are pids: a restarted container reuses one)

        @app.timer(5.0)
        async def head_freshness() -> None:
            """The swaps this recommender logged (HeadRegistry.note_swap) into the head
            freshness histograms; Redis is read only when the served version moved."""
            if server.version <= seen[0]:
                return
            try:
                reg = server.reg
                raw = await reg.r.lrange(reg.k("swaps"), 0, 99)
            except Exception as exc:  # noqa: BLE001 - retried at the next tick
                log.warning("head swaps unavailable: %s", exc)
                return
            new: dict[int, dict[str, Any]] = {}  # version → its swap here (one each)
            for x in map(json.loads, raw):
                if x.get("worker") == ctx.worker and x.get("version", 0) > seen[0] and \
                        x.get("at", 0) >= started:
                    new.setdefault(int(x["version"]), x)
            for _, x in sorted(new.items()):
                m.head_used_after_s.observe(float(x["used_after_s"]))
                m.head_event_to_use_s.observe(float(x["event_to_use_s"]))
            seen[0] = max([seen[0], *new])  # (a swap not logged yet: the next tick)

    loop_watch = LoopWatch(s.stall_after_s)

    @app.task
    async def _loop_watch() -> None:
        loop_watch.start()

    @app.timer(1.0)
    async def _loop_beat() -> None:
        loop_watch.beat()

    async def announce(**info: Any) -> None:
        """Publish this worker's state (a local snapshot: no read-modify-write races)."""
        worker_info.update(info, agents=sorted(ctx.wanted), at=time.time(),
                           host=socket.gethostname())
        try:
            await ctx.redis.hset(ctx.state.k("workers"), ctx.worker, json.dumps(worker_info))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not announce worker state: %s", exc)

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: Any, **_kw: Any) -> None:
        await announce(ready=False, partitions=len(assigned))

    @app.on_rebalance_complete.connect
    async def _rebalanced(sender: Any, **_kw: Any) -> None:
        if not frozen:  # what the first start loaded lazily, too
            frozen.append(freeze_startup(s.gc_gen0, "worker ready"))
        await announce(ready=True)

    @app.timer(5.0)
    async def heartbeat() -> None:
        await announce()

    @app.timer(10.0)
    async def report() -> None:
        try:
            st = await ctx.state.stats()
        except Exception as exc:  # noqa: BLE001
            log.warning("stats unavailable: %s", exc)
            return
        log.info("progress %s", " ".join(f"{k}={v}" for k, v in sorted(st.items())))
        bs = ctx.batch_stats
        if bs["batches"]:
            b = bs["batches"]
            lag = sorted(bs["lag_ms"]) or [0.0]
            log.info("recommend: %d batches, %.1f events/batch, %.1f ms/batch, produce→batch "
                     "lag p50 %.0f ms p99 %.0f ms", b, bs["events"] / b, bs["ms"] / b,
                     lag[len(lag) // 2], lag[int(len(lag) * 0.99)])
            bs.update(batches=0, events=0, ms=0.0, lag_ms=[])
