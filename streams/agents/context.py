"""What every agent of one worker shares: settings, topics, Redis state, metrics, producer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import TopicPartition

from streams.metrics import (
    MS_BUCKETS,
    SECONDS_BUCKETS,
    SIZE_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    Registry,
)
from streams.platforms import PlatformRegistry
from streams.records import DeadLetter
from streams.settings import Settings
from streams.state import RedisState
from streams.topics import Topics
from streams.watchdog import Watchdog

log = logging.getLogger("xrec.worker")

__all__ = ["Context", "WorkerMetrics", "STAGE_BUCKETS", "RECOMMEND_STAGES"]

#: per-stage milliseconds of one micro-batch: most stages take well under a millisecond
STAGE_BUCKETS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
#: records of one partition that :meth:`Context.publish_many` hands over as one batch
PUBLISH_BATCH_MIN = 32
#: the recommend agent's stages, in the order a micro-batch runs them (the recommendations
#: are published before the last three)
RECOMMEND_STAGES = ("decode", "apply", "tower", "evaluate", "rank", "publish", "drift",
                    "examples", "cache")


class WorkerMetrics:
    """Every Prometheus series a worker exports (``/metrics``), on one
    ``prometheus_client`` registry with the library's process, platform and GC collectors.
    A worker exports them all whatever agents it runs (series without samples show only
    their ``# HELP`` / ``# TYPE`` lines), so the dashboard's queries have one list to match
    (tests/test_compose.py)."""

    def __init__(self, process: bool = True) -> None:
        reg = self.registry = Registry(process=process)
        self.events_in = reg.add(Counter("xrec_events_in_total", "records consumed, by topic",
                                         ["topic"]))
        self.records_out = reg.add(Counter("xrec_records_out_total",
                                           "records produced, by topic", ["topic"]))
        self.deadlettered = reg.add(Counter("xrec_deadlettered_total",
                                            "dead-lettered records, by reason", ["reason"]))
        self.erasures = reg.add(Counter("xrec_erasures_total", "erasures (xrec forget) "
                                        "carried out in order with the users' events"))
        self.batch_ms = reg.add(Histogram("xrec_batch_latency_ms",
                                          "recommend micro-batch processing time"))
        self.stage_ms = reg.add(Histogram(
            "xrec_recommend_stage_ms", "time one recommend micro-batch spent in each stage "
            "(" + ", ".join(RECOMMEND_STAGES) + ")", STAGE_BUCKETS, ["stage"]))
        self.batch_events = reg.add(Histogram(
            "xrec_recommend_batch_events", "events per recommend micro-batch (adaptive: "
            "everything waiting, up to XREC_BATCH_MAX)", SIZE_BUCKETS))
        self.input_lag_ms = reg.add(Histogram("xrec_input_lag_ms",
                                              "produce → recommend micro-batch delay"))
        self.e2r_ms = reg.add(Histogram("xrec_event_to_recs_latency_ms", "oldest covered "
                                        "event produced → recommendations published",
                                        MS_BUCKETS))
        self.recs_out = reg.add(Counter("xrec_recommendations_total", "recommendation "
                                        "records published, by refresh (event: the event's "
                                        "platform; cross: another platform of the user)",
                                        ["refresh"]))
        self.train_batch_ms = reg.add(Histogram("xrec_train_batch_ms", "time one training "
                                                "batch took (steps + publishing the version)",
                                                MS_BUCKETS))
        self.train_skipped = reg.add(Counter("xrec_train_skipped_total", "training examples "
                                             "left out of a batch bigger than "
                                             "XREC_TRAIN_LEARN_MAX (the trainer was behind)"))
        self.head_version = reg.add(Gauge("xrec_head_version",
                                          "head version the recommender serves"))
        self.consumer_skipped = reg.add(Counter(
            "xrec_consumer_skipped_records_total", "records the Kafka consumer skipped: an "
            "offset hole within an assignment, or a first record after a rebalance beyond "
            "the committed offset (should stay 0; logged as an error)"))
        self.delivery_errors = reg.add(Counter(
            "xrec_delivery_errors_total", "produced records (or record batches) the broker "
            "did not take; the worker then stops committing and exits (should stay 0)"))
        self.redis_errors = reg.add(Counter("xrec_redis_errors_total",
                                            "Redis errors (retried with backoff)"))
        self.drift_signals = reg.add(Counter("xrec_drift_signals_total",
                                             "drift detector alarms", ["platform", "signal"]))
        self.broker_errors = reg.add(Counter(
            "xrec_broker_client_errors_total", "warnings and errors logged by the Kafka "
            "client (connection lost, request timed out, ...)"))
        self.consumer_lag = reg.add(Gauge("xrec_consumer_lag_records", "records the broker "
                                          "holds beyond this worker's committed offsets, by "
                                          "topic", ["topic"]))
        self.agent_stalled = reg.add(Gauge("xrec_agent_stalled", "1 while the watchdog "
                                           "finds the agent stalled", ["agent"]))
        self.stalls = reg.add(Counter("xrec_stalls_total", "stalls the watchdog noticed",
                                      ["agent"]))
        self.agent_idle = reg.add(Gauge("xrec_agent_idle_seconds", "seconds since the agent "
                                        "last completed an event or micro-batch", ["agent"]))
        # quality, drift and head freshness: what the reports on xrec.metrics.* say
        self.quality_recall = reg.add(Gauge(
            "xrec_quality_recall_at_10", "prequential recall@10 of the served model over the "
            "last quality window (XREC_QUALITY_WINDOW_S), by platform ('all': every one) and "
            "cohort (all / coldstart)", ["platform", "cohort"]))
        self.quality_ndcg = reg.add(Gauge(
            "xrec_quality_ndcg_at_10", "prequential NDCG@10 of the served model over the last "
            "quality window, by platform and cohort", ["platform", "cohort"]))
        self.quality_events = reg.add(Gauge(
            "xrec_quality_window_events", "positive events ranked prequentially in the last "
            "quality window, by platform and cohort", ["platform", "cohort"]))
        self.drift_value = reg.add(Gauge(
            "xrec_drift_value", "each drift signal's current value (the drift windows of "
            "xrec.metrics.drift), by platform ('all' too) and signal", ["platform", "signal"]))
        self.head_published = reg.add(Gauge("xrec_head_version_published", "head version the "
                                            "train agent last published"))
        self.head_event_to_publish_s = reg.add(Histogram(
            "xrec_head_event_to_publish_seconds", "newest event a head version was trained "
            "on produced → that version published by the train agent", SECONDS_BUCKETS))
        self.train_loss = reg.add(Gauge("xrec_train_loss", "training loss (sampled softmax) of "
                                        "the batch that produced the last published version"))
        self.head_used_after_s = reg.add(Histogram(
            "xrec_head_used_after_seconds", "a head version's training batch arrived at the "
            "trainer → that version in use in this recommender", SECONDS_BUCKETS))
        self.head_event_to_use_s = reg.add(Histogram(
            "xrec_head_event_to_use_seconds", "newest event a head version was trained on "
            "produced → that version in use in this recommender", SECONDS_BUCKETS))


@dataclass
class Context:
    """One worker's shared parts. Agents get it from :func:`streams.app.create_app`."""

    app: Any  # faust.App
    settings: Settings
    platforms: PlatformRegistry
    topics: Topics
    redis: Any  # redis.asyncio.Redis (decoded)
    state: RedisState
    metrics: WorkerMetrics
    watchdog: Watchdog
    wanted: set[str]
    worker: str
    vectors: Any = None  # streams.vectors.VectorStore when an encoder is configured
    encoder: Any = None
    #: topic → the agent consuming it (lag per agent for the watchdog)
    agent_of_topic: dict[str, str] = field(default_factory=dict)
    #: the recommend agent's running figures, reported every 10 s and on /healthz
    batch_stats: dict[str, Any] = field(default_factory=lambda: {
        "batches": 0, "events": 0, "ms": 0.0, "lag_ms": [], "last": None})
    server: Any = None  # streams.heads.ModelServer in recommend workers with the model

    @property
    def use_model(self) -> bool:
        return self.settings.model_enabled and self.vectors is not None

    #: records (or closed record batches) whose delivery failed; once non-zero the worker
    #: commits no more offsets and stops (:meth:`guard_commits`)
    delivery_failures: int = 0

    def _delivered(self, fut: Any) -> None:
        """Done-callback of every produce: a failed delivery is an error, never silent."""
        if fut.cancelled():
            exc: BaseException | None = RuntimeError("cancelled")
        else:
            exc = fut.exception()
        if exc is None:
            return
        self.delivery_failures += 1
        self.metrics.delivery_errors.inc()
        log.error("a produced record was not delivered (%r): this worker commits no more "
                  "offsets and stops, so its input is read again", exc)

    def guard_commits(self, consumer: Any) -> None:
        """Commit offsets only while every record produced so far was delivered. Faust
        flushes the producer before committing (at-least-once), but a flush completes
        failed deliveries too: without this a record that failed would be committed past
        and lost. After a failure the worker crashes (its supervisor restarts it) and
        its input is read again from the last good commit. The same when a background
        write of the read API's cache failed (its retries cover Redis outages)."""
        if getattr(consumer, "_xrec_commit", None) is not None:
            return
        original = consumer._xrec_commit = consumer._commit

        async def commit(offsets: Any) -> bool:
            state = getattr(self, "state", None)
            if state is not None:  # what the committed batches cached (RedisState.cache_later)
                try:
                    await state.cache_flush()
                except Exception as exc:  # noqa: BLE001 - as a failed delivery: no commit
                    log.error("not committing %d offset(s): a background cache write failed "
                              "(%s: %s)", len(offsets), type(exc).__name__, exc)
                    await self.app.crash(exc)
                    return False
            await asyncio.sleep(0)  # let the flushed deliveries' callbacks run
            if self.delivery_failures:
                log.error("not committing %d offset(s): %d record(s) were not delivered",
                          len(offsets), self.delivery_failures)
                await self.app.crash(RuntimeError("a produced record was not delivered"))
                return False
            return bool(await original(offsets))

        consumer._commit = commit

    async def publish(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Straight to the transport producer: Faust flushes it before every offset commit
        (at-least-once holds: :meth:`guard_commits`), and it skips ~4 layers of per-message
        Python in Topic.send."""
        fut = await self.app.producer.send(topic, key, value, None, None, None)
        fut.add_done_callback(self._delivered)
        self.metrics.records_out.inc(1, topic)

    async def publish_many(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]
                           ) -> None:
        """Many records of one topic. Where a partition gets at least
        ``PUBLISH_BATCH_MIN`` of them and the client holds nothing queued for it, they go
        to the Kafka client as one closed record batch (aiokafka ``send_batch``) instead
        of a ``send`` per record (a coroutine chain and a future each): the backlog case.
        Otherwise record by record (:meth:`publish`), joining the lingering batch: a
        closed batch waits for the one queued ahead of it to be sent, which at low rates
        cost a micro-batch ~1.5 ms per topic and raised p99 latency (measured). Same
        partitions as :meth:`publish` (the app's partitioner), order kept within a
        partition; Faust's flush before a commit waits for both kinds of batch."""
        prod = getattr(self.app.producer, "_producer", None)
        queued = getattr(getattr(prod, "_message_accumulator", None), "_batches", None)
        parts: list[int] = []
        if len(records) >= PUBLISH_BATCH_MIN and queued is not None and hasattr(
                prod, "send_batch"):
            await prod.client._wait_on_metadata(topic)
            parts = sorted(prod.client.cluster.partitions_for_topic(topic) or ())
        if not parts:
            for key, value in records:
                await self.publish(topic, key, value)
            return
        partitioner = self.app.conf.producer_partitioner or DefaultPartitioner()
        by_part: dict[int, list[tuple[bytes | None, bytes]]] = {}
        for key, value in records:
            by_part.setdefault(partitioner(key, parts, parts), []).append((key, value))
        batched = 0  # (records sent alone are counted by publish)
        for part, recs in by_part.items():
            if len(recs) < PUBLISH_BATCH_MIN or queued.get(TopicPartition(topic, part)):
                for key, value in recs:
                    await self.publish(topic, key, value)
                continue
            batch = prod.create_batch()
            for key, value in recs:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full
                    if batch.record_count():
                        batch.close()
                        fut = await prod.send_batch(batch, topic, partition=part)
                        fut.add_done_callback(self._delivered)
                        batch = prod.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        await self.publish(topic, key, value)  # larger than a batch
                        continue
                batched += 1
            if batch.record_count():
                batch.close()  # complete: sent without lingering
                fut = await prod.send_batch(batch, topic, partition=part)
                fut.add_done_callback(self._delivered)
        self.metrics.records_out.inc(batched, topic)

    async def dead(self, d: DeadLetter) -> None:
        await self.publish(self.topics.deadletter, None, d.model_dump_json().encode())
        self.metrics.deadlettered.inc(1, d.code)
        # the record may be republished after a crash (at-least-once; consumers dedupe by
        # its source coordinates); the counters in Redis count it once
        await self.state.count_deadletter(d.src_topic, d.src_partition, d.src_offset, d.code)

    def bad_unified(self, topic: str, partition: int, offset: int, value: bytes | None,
                    message: str) -> DeadLetter:
        return DeadLetter(src_topic=topic, src_partition=partition, src_offset=offset,
                          platform=None, code="bad_unified", message=message[:200],
                          excerpt="", size=len(value or b""), at=time.time())
