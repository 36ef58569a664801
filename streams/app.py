"""The Faust app: thin agents around the core in :mod:`streams.normalize` and :mod:`streams.state`.

Agents (all in one worker by default; ``XREC_AGENTS`` / ``xrec worker --agents`` picks a subset):

* ``normalize``: ``xrec.events.<platform>`` and ``xrec.events.ingest`` → validate,
  pseudonymize → ``xrec.events.unified`` (key = user key), bad events → ``xrec.deadletter``.
* ``recommend``: ``xrec.events.unified`` in micro-batches (``stream.take_events``) →
  idempotent state update in Redis → score → ``xrec.recs.<platform>`` + Redis cache.
* ``catalog``: ``xrec.catalog.<platform>`` → item metadata and text in Redis.
* ``train``: ``xrec.train.examples`` in micro-batches → optimizer steps on the heads →
  weights to Redis, ``HeadVersion`` → ``xrec.models.heads``; recommenders hot-swap.

With the learned model on (``XREC_MODEL_ENABLED``, needs the encoder), the recommend agent
also ranks each positive with the served head version *before* applying it (prequential
quality → ``xrec.metrics.quality``), ranks with the model (popularity ⊕ co-occurrence until a
first head version exists), refreshes the user's recommendations on every platform they
are active on, and emits a ``TrainingExample`` per applied positive.

Delivery is at-least-once (Tansu supports no transactions); state effects are
exactly-once through the offset watermarks described in :mod:`streams.state`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from pydantic import ValidationError

from models.drift import DriftMonitor, Reactions
from streams.catalog import parse_catalog_record
from streams.heads import ModelServer, TrainerService, examples_from
from streams.metrics import Counter, Gauge, Histogram, Registry
from streams.normalize import Normalizer
from streams.platforms import DriftSpec, PlatformRegistry, load_platforms
from streams.records import (
    CatalogItem,
    DeadLetter,
    DriftReaction,
    DriftSignal,
    DriftWindow,
    Interaction,
    TrainingExample,
)
from streams.settings import Settings
from streams.state import RedisState, redis_from_url
from streams.topics import Topics
from streams.vectors import VectorStore, usable_text
from streams.watchdog import LoopWatch, Watchdog

__all__ = ["create_app", "base_app", "AGENTS"]

log = logging.getLogger("xrec.worker")
AGENTS = ("normalize", "recommend", "catalog", "train")


def _patch_fetch_wait() -> None:
    """Faust hard-codes fetch_max_wait_ms=1500; Tansu holds fetches ~half of it (DESIGN.md).

    We set the aiokafka consumer's wait from ``XREC_FETCH_MAX_WAIT_MS`` (default 20 ms):
    p50 produce→agent drops from ~500 ms to ~10 ms.
    """
    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_xrec_patched", False):
        return
    original = cls._create_worker_consumer

    def _create(self, transport):  # type: ignore[no-untyped-def]
        consumer = original(self, transport)
        wait = getattr(self.app, "xrec_fetch_max_wait_ms", None)
        if wait is not None:
            if not hasattr(consumer, "_fetch_max_wait_ms"):  # pragma: no cover
                raise RuntimeError("aiokafka changed: cannot set fetch_max_wait_ms")
            consumer._fetch_max_wait_ms = int(wait)
        return consumer

    cls._create_worker_consumer = _create
    cls._xrec_patched = True


def base_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app with xrec's broker settings (also used by the bare benchmark agent)."""
    from streams.errors import ConfigError

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set (or run `xrec dev`)")
    _patch_fetch_wait()
    faust_dir = Path(tempfile.gettempdir()) / "xrec-faust"
    faust_dir.mkdir(parents=True, exist_ok=True)
    brokers = ";".join(f"kafka://{b.strip()}" for b in settings.kafka_bootstrap_servers.split(","))
    app = faust.App(
        app_id,
        broker=brokers,
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        broker_session_timeout=6,
        broker_heartbeat_interval=2,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_linger=settings.producer_linger_ms / 1000.0,
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
        web_bind=settings.web_bind,
        stream_wait_empty=False,
        # Faust keeps nothing of ours on disk (state is in Redis); keep its folder out of cwd
        datadir=str(faust_dir / "{conf.name}-data"),
    )
    app.xrec_fetch_max_wait_ms = settings.fetch_max_wait_ms  # type: ignore[attr-defined]
    return app


def create_app(settings: Settings, platforms: PlatformRegistry | None = None,
               agents: str | None = None, epoch: str | None = None) -> faust.App:
    """Build the worker app. ``epoch`` namespaces offset watermarks (see streams.state)."""
    from streams.errors import ConfigError

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set (or run `xrec dev`)")
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set (or run `xrec dev`)")
    platforms = platforms or load_platforms(settings.platforms_path)
    wanted = _agents(agents or settings.agents)
    app = base_app(settings, settings.app_id)
    topics = Topics(settings)
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw"}
    unified = app.topic(topics.unified, **raw)
    recs_topic = {p: topics.recs(p) for p in platforms}
    redis = redis_from_url(settings.redis_url, settings.redis_timeout_s)
    state = RedisState(redis, settings, topics.unified, epoch=epoch or settings.state_epoch)
    app.xrec_state = state  # type: ignore[attr-defined]
    reg = Registry()
    m_in = reg.add(Counter("xrec_events_in_total", "records consumed, by topic", ["topic"]))
    m_out = reg.add(Counter("xrec_records_out_total", "records produced, by topic", ["topic"]))
    m_dead = reg.add(Counter("xrec_deadlettered_total", "dead-lettered records, by reason",
                             ["reason"]))
    m_batch = reg.add(Histogram("xrec_batch_latency_ms", "recommend micro-batch processing time"))
    m_lag = reg.add(Histogram("xrec_input_lag_ms", "produce → recommend micro-batch delay"))
    m_e2r = reg.add(Histogram("xrec_event_to_recs_latency_ms",
                              "oldest covered event produced → recommendations published"))
    g_head = reg.add(Gauge("xrec_head_version", "head version the recommender serves"))
    m_redis = reg.add(Counter("xrec_redis_errors_total", "Redis errors (retried with backoff)"))
    m_drift = reg.add(Counter("xrec_drift_signals_total", "drift detector alarms",
                              ["platform", "signal"]))
    m_broker = reg.add(Counter("xrec_broker_client_errors_total", "warnings and errors logged "
                               "by the Kafka client (connection lost, request timed out, ...)"))
    g_lag = reg.add(Gauge("xrec_consumer_lag_records", "records the broker holds beyond this "
                          "worker's committed offsets, by topic", ["topic"]))
    g_stalled = reg.add(Gauge("xrec_agent_stalled", "1 while the watchdog finds the agent "
                              "stalled", ["agent"]))
    m_stalls = reg.add(Counter("xrec_stalls_total", "stalls the watchdog noticed", ["agent"]))
    g_idle = reg.add(Gauge("xrec_agent_idle_seconds", "seconds since the agent last completed "
                           "an event or micro-batch", ["agent"]))
    state.on_error = lambda: m_redis.inc()  # type: ignore[attr-defined]
    app.xrec_metrics = reg  # type: ignore[attr-defined]
    _count_client_errors(m_broker)
    wd = Watchdog(settings.stall_after_s)
    agent_of_topic: dict[str, str] = {}

    async def publish(topic: str, key: bytes | None, value: bytes) -> None:
        """Straight to the transport producer: Faust flushes it before every offset commit
        (at-least-once holds), and it skips ~4 layers of per-message Python in Topic.send."""
        await app.producer.send(topic, key, value, None, None, None)
        m_out.inc(1, topic)

    async def dead(d: DeadLetter) -> None:
        await publish(topics.deadletter, None, d.model_dump_json().encode())
        m_dead.inc(1, d.code)
        # the record may be republished after a crash (at-least-once; consumers dedupe by
        # its source coordinates); the counters in Redis count it once
        await state.count_deadletter(d.src_topic, d.src_partition, d.src_offset, d.code)

    if "normalize" in wanted:
        normalizer = Normalizer(settings, platforms)
        by_topic: dict[str, str | None] = {topics.events(p): p for p in platforms}
        by_topic[topics.ingest] = None
        source = app.topic(*by_topic, **raw)
        agent_of_topic.update(dict.fromkeys(by_topic, "normalize"))
        wd.register("normalize")

        @app.agent(source, name="xrec.normalize")
        async def normalize(stream: Any) -> None:
            async for event in stream.events():
                wd.begin("normalize")
                m = event.message
                m_in.inc(1, m.topic)
                out = normalizer.normalize(
                    event.value, topic=m.topic, partition=m.partition, offset=m.offset,
                    timestamp_ms=(m.timestamp * 1000.0) if m.timestamp else None,
                    platform=by_topic.get(m.topic))
                if isinstance(out, Interaction):
                    await publish(topics.unified, out.user.encode(), out.model_dump_json().encode())
                else:
                    log.info("dead-lettered %s:%s@%s: %s", m.topic, m.partition, m.offset,
                             out.code)
                    await dead(out)
                wd.done("normalize")

    batch_stats: dict[str, Any] = {"batches": 0, "events": 0, "ms": 0.0, "lag_ms": []}

    if "recommend" in wanted:
        agent_of_topic[topics.unified] = "recommend"
        wd.register("recommend")

        @app.agent(unified, name="xrec.recommend")
        async def recommend(stream: Any) -> None:
            async for events in stream.take_events(settings.batch_max, settings.batch_within_s):
                wd.begin("recommend")
                batch: list[tuple[int, Interaction]] = []
                m_in.inc(len(events), topics.unified)
                for ev in events:
                    m = ev.message
                    try:
                        batch.append((m.partition, Interaction.model_validate_json(ev.value)))
                    except ValidationError as exc:
                        await dead(DeadLetter(
                            src_topic=m.topic, src_partition=m.partition, src_offset=m.offset,
                            platform=None, code="bad_unified", message=str(exc)[:200],
                            excerpt="", size=len(ev.value or b""), at=time.time()))
                t_batch = time.perf_counter()
                now = time.time()
                batch_stats["lag_ms"].extend((now - ev.produced_at) * 1000 for _, ev in batch)
                for _, ev in batch:
                    m_lag.observe((now - ev.produced_at) * 1000)
                result = await state.apply(batch, history=settings.hist_len if use_model else 0)
                ranks: list[float | None] = [None] * len(result.applied_events)
                if server is not None and server.ready:
                    ranks = server.evaluate(result.applied_events,
                                            {k: t.seen_before for k, t in result.touched.items()})
                    recs = await state.recommend_model(server, result)
                else:
                    recs = await state.recommend(result.touched)
                if monitor is not None:
                    await watch_drift(result.applied_events, ranks)
                if use_model:
                    for ex in examples_from(result.applied_events, time.time(),
                                            server.horizon if server is not None else None):
                        await publish(topics.train_examples, ex.user.encode(),
                                      ex.model_dump_json().encode())
                published_at = time.time()
                payloads = []
                for rec in recs:
                    rec.__dict__["published_at"] = published_at  # frozen model, fresh stamp
                    payload = rec.model_dump_json()  # once: the topic and the cache share it
                    payloads.append((rec, payload))
                    await publish(recs_topic[rec.platform], rec.user.encode(), payload.encode())
                await state.cache(payloads)
                batch_stats["batches"] += 1
                batch_stats["events"] += len(events)
                batch_ms = (time.perf_counter() - t_batch) * 1000
                batch_stats["ms"] += batch_ms
                batch_stats["last"] = time.time()
                m_batch.observe(batch_ms)
                for rec in recs:
                    m_e2r.observe((published_at - rec.produced_at) * 1000)
                if server is not None:
                    g_head.set(server.version)
                wd.done("recommend")

    vectors: VectorStore | None = None
    encoder = None
    enc_cfg = settings.encoder_config()
    if enc_cfg is not None and wanted & {"catalog", "recommend", "train"}:
        from models.encoder import load_encoder

        encoder = load_encoder(enc_cfg)  # exports/quantizes once, then cached on disk
        vectors = VectorStore(settings.redis_url, settings.redis_prefix, encoder.id,
                              encoder.dim, timeout_s=settings.redis_timeout_s)
        log.info("item encoder %s on %s", encoder.id, encoder.device)
    app.xrec_vectors = vectors  # type: ignore[attr-defined]
    encode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrec-encode")

    use_model = settings.model_enabled and vectors is not None
    server: ModelServer | None = None
    if use_model and "recommend" in wanted:
        assert vectors is not None
        server = ModelServer(settings, vectors, worker=str(os.getpid()))
        app.xrec_server = server  # type: ignore[attr-defined]

        @app.timer(settings.head_poll_s)
        async def swap_heads() -> None:
            try:
                await server.poll()
            except Exception as exc:  # noqa: BLE001 - retried at the next tick
                log.warning("head version check failed: %s", exc)

        @app.timer(settings.quality_window_s)
        async def quality() -> None:
            try:
                for w in server.quality_windows():
                    await publish(topics.quality, w.platform.encode(),
                                  w.model_dump_json().encode())
            except Exception:  # a report must never take the worker down
                log.exception("quality window report failed")

    monitor: DriftMonitor | None = None
    if settings.drift_enabled and "recommend" in wanted:
        monitor = DriftMonitor(settings.drift_config())
        worker_name = str(os.getpid())

        async def watch_drift(applied: list[tuple[Interaction, Any]],
                              ranks: list[float | None]) -> None:
            """Feed the monitor; publish signals; ask the train agent to react."""
            assert monitor is not None
            for (ev, _), rank in zip(applied, ranks, strict=True):
                # only positives feed the centroid: no vector lookup (a copy) for the rest
                idx = vectors.index.get(ev.platform) if vectors is not None and ev.label \
                    else None
                vec = idx.vector(ev.item) if idx is not None else None
                hit = None if rank is None else int(rank < 10)
                for sig in monitor.observe(ev.platform, ev.item, ev.label, vec, hit,
                                           now=time.time()):
                    rec = DriftSignal(platform=sig.platform, signal=sig.signal,
                                      detector=sig.detector, value=round(sig.value, 6),
                                      reference=round(sig.reference, 6), window=sig.window,
                                      events=sig.event_index, worker=worker_name,
                                      time=sig.time)
                    log.warning("drift on %s: %s (%s) %.4f vs %.4f", sig.platform,
                                sig.signal, sig.detector, sig.value, sig.reference)
                    await publish(topics.drift, sig.platform.encode(),
                                  rec.model_dump_json().encode())
                    await state._count(f"drift:{sig.signal}")
                    m_drift.inc(1, sig.platform, sig.signal)
                    spec = platforms[sig.platform].drift if sig.platform in platforms \
                        else DriftSpec()
                    rc = spec.reaction_config(settings.drift_reactions)
                    if server is not None and rc.enabled and sig.signal in rc.signals and \
                            sig.signal in rc.horizon_signals and rc.history_horizon_s > 0:
                        server.set_horizon(ev.event_time, rc.history_horizon_s)
                        hx = DriftReaction(platform=sig.platform, signal=sig.signal, actions=[
                            f"histories from now on only, for {rc.history_horizon_s:g} s"],
                            time=time.time())
                        await publish(topics.drift, sig.platform.encode(),
                                      hx.model_dump_json().encode())
                    if settings.drift_reactions:
                        await state._retry("drift reaction", lambda rec=rec: redis.rpush(
                            state.k("drift", "reactions"), rec.model_dump_json()))

        @app.timer(settings.quality_window_s)
        async def drift_windows() -> None:
            assert monitor is not None
            now = time.time()
            try:
                for p, vals in monitor.values().items():
                    pm = monitor.platforms.get(p, monitor.overall)
                    w = DriftWindow(platform=p, values=vals, events=pm.n, worker=worker_name,
                                    time=now)
                    await publish(topics.drift, p.encode(), w.model_dump_json().encode())
            except Exception:  # a report must never take the worker down
                log.exception("drift window report failed")

    if use_model and "train" in wanted:
        assert vectors is not None
        trainer = TrainerService(settings, vectors, list(platforms))
        train_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrec-train")
        train_topic = app.topic(topics.train_examples, **raw)
        agent_of_topic[topics.train_examples] = "train"
        wd.register("train")

        reactions: Reactions | None = None

        async def react_to_drift() -> None:
            """Apply the reactions the recommenders asked for (platform config decides)."""
            nonlocal reactions
            if reactions is None and trainer.trainer is not None:
                reactions = Reactions(trainer.trainer, {
                    p.name: p.drift.reaction_config(settings.drift_reactions)
                    for p in platforms.values()},
                    default=DriftSpec().reaction_config(settings.drift_reactions))
            if reactions is None:
                return
            key = state.k("drift", "reactions")
            while True:
                raw = await state._retry("drift reactions", lambda: redis.lpop(key))
                if raw is None:
                    return
                try:
                    sig = DriftSignal.model_validate_json(raw)
                except ValidationError:
                    continue
                done = reactions.react(sig.platform, sig.signal)
                if done is None:
                    continue
                log.warning("drift reaction on %s (%s): %s", sig.platform, sig.signal,
                            ", ".join(done["actions"]) or "nothing")
                rec = DriftReaction(platform=sig.platform, signal=sig.signal,
                                    actions=done["actions"], time=time.time())
                await publish(topics.drift, sig.platform.encode(), rec.model_dump_json().encode())

        @app.agent(train_topic, name="xrec.train")
        async def train(stream: Any) -> None:
            if trainer.model is None:
                await state._retry("trainer start", trainer.start)
            async for events in stream.take_events(settings.train_batch_max,
                                                   settings.train_batch_within_s):
                wd.begin("train")
                await learn_batch(events)
                wd.done("train")

        async def learn_batch(events: Any) -> None:
            loop = asyncio.get_running_loop()
            arrived = time.time()
            recs = []
            for ev in events:
                try:
                    recs.append(TrainingExample.model_validate_json(ev.value))
                except ValidationError as exc:
                    log.warning("bad training example skipped: %s", str(exc)[:200])
            if not recs:
                return
            await react_to_drift()
            steps = await loop.run_in_executor(train_pool, trainer.learn, recs)
            if reactions is not None and reactions.tick(len(recs)):
                log.info("drift reaction: learning rate back to %g", reactions.base_lr)
            if not steps:
                return
            blob = await loop.run_in_executor(train_pool, trainer.blob)
            newest = max(r.produced_at for r in recs)
            meta = {"batch_arrived_at": arrived, "newest_produced_at": newest}
            version = await state._retry("head publish", lambda: trainer.reg.publish(blob, meta))
            rec = trainer.record(version, len(recs), arrived, newest, len(blob))
            await publish(topics.heads, None, rec.model_dump_json().encode())

    if "catalog" in wanted:
        cat_by_topic = {topics.catalog(p): p for p in platforms}
        cat_source = app.topic(*cat_by_topic, **raw)
        agent_of_topic.update(dict.fromkeys(cat_by_topic, "catalog"))
        wd.register("catalog")

        @app.agent(cat_source, name="xrec.catalog")
        async def catalog(stream: Any) -> None:
            async for events in stream.take_events(256, 0.2):
                wd.begin("catalog")
                latest: dict[tuple[str, str], CatalogItem] = {}
                for ev in events:
                    m = ev.message
                    p = platforms[cat_by_topic[m.topic]]
                    out = parse_catalog_record(ev.value, p, settings, topic=m.topic,
                                               partition=m.partition, offset=m.offset)
                    if isinstance(out, DeadLetter):
                        await dead(out)
                    else:
                        latest[(out.platform, out.item)] = out
                if latest:
                    items = list(latest.values())
                    await state._retry("catalog", lambda items=items: _store_items(items))
                wd.done("catalog")

        async def _store_items(items: list[CatalogItem]) -> None:
            """Store metadata; encode only items whose text changed or has no vector yet."""
            keys = [state.k("item", it.platform, it.item) for it in items]
            rd = redis.pipeline(transaction=False)
            for key in keys:
                rd.hget(key, "text")
            old = await rd.execute()
            todo: dict[str, list[CatalogItem]] = {}
            notext = 0
            prev_text = {(it.platform, it.item): o for it, o in zip(items, old, strict=True)}
            for it in items:
                if not usable_text(it.text):
                    notext += 1
                    continue
                todo.setdefault(it.platform, []).append(it)
            encoded = 0
            if vectors is not None and encoder is not None:
                loop = asyncio.get_running_loop()
                for p, lst in todo.items():
                    missing = await vectors.missing(p, [it.item for it in lst])
                    need = [it for it, miss in zip(lst, missing, strict=True)
                            if miss or prev_text.get((p, it.item)) != it.text]
                    if not need:
                        continue
                    vecs = await loop.run_in_executor(encode_pool, encoder.encode,
                                                      [it.text for it in need])
                    await vectors.put(p, [it.item for it in need], vecs)
                    encoded += len(need)
            pipe = redis.pipeline(transaction=False)
            for it, key in zip(items, keys, strict=True):
                pipe.hset(key, mapping={"text": it.text, "fields": _json(it.fields),
                                        "notext": 0 if usable_text(it.text) else 1})
                pipe.sadd(state.k("items", it.platform), it.item)
            pipe.hincrby(state.k("stats"), "catalog_items", len(items))
            pipe.hincrby(state.k("stats"), "catalog_encoded", encoded)
            pipe.hincrby(state.k("stats"), "catalog_notext", notext)
            await pipe.execute()

    if vectors is not None:
        plist = list(platforms)

        @app.timer(2.0)
        async def refresh_index() -> None:
            """Every worker keeps each platform's vectors in memory, reloading on change."""
            try:
                n = await vectors.refresh(plist)
            except Exception as exc:  # noqa: BLE001 - retried at the next tick
                log.warning("item index refresh failed: %s", exc)
                return
            if n:
                log.info("item index: %s", ", ".join(
                    f"{p} {len(vectors.index.get(p) or [])}" for p in plist))

    worker_id = str(os.getpid())

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.text(reg.render(), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """live: the event loop answers; ready: partitions assigned and recovery done;
        stalled: agents the watchdog found stuck, with the reason. 200 only when ready
        and nothing is stalled."""
        last = batch_stats.get("last")
        body = {"live": True, "ready": bool(worker_info.get("ready")),
                "stalled": dict(stalled), "agents": sorted(wanted), "pid": os.getpid(),
                "last_batch_age_s": None if last is None else round(time.time() - last, 3),
                "head_version": server.version if server is not None else None}
        return web.json(body, status=200 if body["ready"] and not stalled else 503)

    stalled: dict[str, str] = {}

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

    @app.timer(min(5.0, settings.stall_after_s / 3))
    async def watchdog() -> None:
        try:
            lags = consumer_lag()
            per_agent: dict[str, int] = {}
            for topic, n in lags.items():
                g_lag.set(n, topic)
                a = agent_of_topic.get(topic)
                if a is not None:
                    per_agent[a] = per_agent.get(a, 0) + n
            now_stalled = wd.check(per_agent)
            for a in wd.agents:
                g_idle.set(round(wd.idle_s(a), 3), a)
                g_stalled.set(1 if a in now_stalled else 0, a)
                if a in now_stalled and a not in stalled:
                    m_stalls.inc(1, a)
            stalled.clear()
            stalled.update(now_stalled)
        except Exception:  # a report must never take the worker down
            log.exception("watchdog check failed")

    loop_watch = LoopWatch(settings.stall_after_s)

    @app.task
    async def _loop_watch() -> None:
        loop_watch.start()

    @app.timer(1.0)
    async def _loop_beat() -> None:
        loop_watch.beat()

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: Any, **_kw: Any) -> None:
        await _announce(ready=False, partitions=len(assigned))

    @app.on_rebalance_complete.connect
    async def _rebalanced(sender: Any, **_kw: Any) -> None:
        await _announce(ready=True)

    worker_info: dict[str, Any] = {"ready": False}

    async def _announce(**info: Any) -> None:
        """Publish this worker's state (a local snapshot: no read-modify-write races)."""
        worker_info.update(info, agents=sorted(wanted), at=time.time(),
                           host=socket.gethostname())
        try:
            await redis.hset(state.k("workers"), worker_id, json.dumps(worker_info))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not announce worker state: %s", exc)

    @app.timer(5.0)
    async def heartbeat() -> None:
        await _announce()

    @app.timer(10.0)
    async def report() -> None:
        try:
            st = await state.stats()
        except Exception as exc:  # noqa: BLE001
            log.warning("stats unavailable: %s", exc)
            return
        log.info("progress %s", " ".join(f"{k}={v}" for k, v in sorted(st.items())))
        if batch_stats["batches"]:
            b = batch_stats["batches"]
            lag = sorted(batch_stats["lag_ms"]) or [0.0]
            log.info("recommend: %d batches, %.1f events/batch, %.1f ms/batch, produce→batch "
                     "lag p50 %.0f ms p99 %.0f ms", b, batch_stats["events"] / b,
                     batch_stats["ms"] / b, lag[len(lag) // 2], lag[int(len(lag) * 0.99)])
            batch_stats.update(batches=0, events=0, ms=0.0, lag_ms=[])

    return app


class _ClientErrors(logging.Handler):
    def __init__(self, counter: Counter) -> None:
        super().__init__(logging.WARNING)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.inc()


def _count_client_errors(counter: Counter) -> None:
    """Count what the Kafka client logs at WARNING and above (it retries internally and
    only logs): the broker side of the outage metrics."""
    lg = logging.getLogger("aiokafka")
    for h in [h for h in lg.handlers if isinstance(h, _ClientErrors)]:
        lg.removeHandler(h)  # one app per process; tests build several
    lg.addHandler(_ClientErrors(counter))


def _json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _agents(spec: str) -> set[str]:
    from streams.errors import ConfigError

    if spec.strip() in ("", "all"):
        return set(AGENTS)
    names = {a.strip() for a in spec.split(",") if a.strip()}
    bad = names - set(AGENTS)
    if bad:
        raise ConfigError(f"unknown agents {sorted(bad)}; choose from {', '.join(AGENTS)}")
    return names
