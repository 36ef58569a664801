"""The Faust app: :func:`create_app` builds one worker's shared context and wires the
agents it should run, each in its own module under ``streams/agents/``.

Agents (all in one worker by default; ``XREC_AGENTS`` / ``xrec worker --agents`` picks a subset):

* ``normalize``: ``xrec.events.<platform>`` and ``xrec.events.ingest`` → validate,
  pseudonymize → ``xrec.events.unified`` (key = user key), bad events → ``xrec.deadletter``.
* ``recommend``: ``xrec.events.unified`` in adaptive micro-batches → idempotent state
  update in Redis → prequential quality → rank → ``xrec.recs.<platform>`` + Redis cache,
  training examples, drift (``streams/agents/recommend.py`` reads top to bottom).
* ``catalog``: ``xrec.catalog.<platform>`` → item metadata and text in Redis → vectors.
* ``train``: ``xrec.train.examples`` in micro-batches → optimizer steps on the heads →
  weights to Redis, ``HeadVersion`` → ``xrec.models.heads``; recommenders hot-swap.
  ``xrec dev`` and docker-compose run it as its own worker process.

Delivery is at-least-once (Tansu supports no transactions); state effects are
exactly-once through the offset watermarks described in :mod:`streams.state`.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import faust
from aiokafka.partitioner import DefaultPartitioner, murmur2
from faust.transport.drivers import aiokafka as faust_aiokafka

from streams.agents import api, catalog, normalize, ops, recommend, train
from streams.agents.context import Context, WorkerMetrics
from streams.fastdrain import patch_consumer_wait_first
from streams.metrics import Counter
from streams.platforms import PlatformRegistry, load_platforms
from streams.settings import Settings
from streams.state import RedisState, redis_from_url
from streams.topics import Topics
from streams.vectors import VectorStore
from streams.watchdog import Watchdog

__all__ = ["create_app", "base_app", "AGENTS", "CachedPartitioner"]

log = logging.getLogger("xrec.worker")
AGENTS = ("normalize", "recommend", "catalog", "train")
PRODUCER_BATCH_BYTES = 256 * 1024


def _patch_fetch_wait() -> None:
    """Faust hard-codes fetch_max_wait_ms=1500; Tansu holds fetches ~half of it (DESIGN.md).

    We set the aiokafka consumer's wait from ``XREC_FETCH_MAX_WAIT_MS`` (default 50 ms):
    p50 produce→agent drops from ~500 ms to tens of ms. Shorter waits cost Tansu more CPU
    (each fetch costs it in proportion to the record batches a partition holds).
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


class CachedPartitioner:
    """aiokafka's default partitioner (the Java client's murmur2 of the key, so other
    clients agree on where a key goes), with each key's hash remembered: murmur2 is pure
    Python in aiokafka (py-spy: 5% of the normalizer under a backlog), and user keys recur.
    Bounded: the memo is dropped when it reaches ``keep`` keys."""

    def __init__(self, keep: int = 200_000) -> None:
        self.keep = keep
        self._hash: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]
                 ) -> int:
        if key is None:
            return DefaultPartitioner()(key, all_partitions, available)  # type: ignore[no-any-return]
        h = self._hash.get(key)
        if h is None:
            if len(self._hash) >= self.keep:
                self._hash = {}
            h = self._hash[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[h % len(all_partitions)]


def base_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app with xrec's broker settings (also used by the bare benchmark agent)."""
    from streams.errors import ConfigError
    from streams.security import faust_credentials

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set (or run `xrec dev`)")
    _patch_fetch_wait()
    if settings.fast_drain:
        patch_consumer_wait_first()
    faust_dir = Path(tempfile.gettempdir()) / "xrec-faust"
    faust_dir.mkdir(parents=True, exist_ok=True)
    brokers = ";".join(f"kafka://{b.strip()}" for b in settings.kafka_bootstrap_servers.split(","))
    app = faust.App(
        app_id,
        broker=brokers,
        # TLS / SASL from KAFKA_SECURITY_PROTOCOL & co. (streams/security.py); None: plaintext
        broker_credentials=faust_credentials(settings),
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
        # 16 KB (the default) holds five training examples: every few sends closed a batch,
        # made a produce request and left one more record batch in the broker
        producer_max_batch_size=PRODUCER_BATCH_BYTES,
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
        web_bind=settings.web_bind,
        stream_wait_empty=False,
        producer_partitioner=CachedPartitioner(),
        # Faust keeps nothing of ours on disk (state is in Redis); keep its folder out of cwd
        datadir=str(faust_dir / "{conf.name}-data"),
    )
    app.xrec_fetch_max_wait_ms = settings.fetch_max_wait_ms  # type: ignore[attr-defined]
    return app


def worker_id() -> str:
    """This worker's id in Redis (``workers``, head swaps, drift records): its pid, or in a
    container where it is pid 1 (``exec xrec worker``: every replica of a scaled service
    alike) its host name, the container's own."""
    pid = os.getpid()
    return str(pid) if pid != 1 else socket.gethostname()


def create_app(settings: Settings, platforms: PlatformRegistry | None = None,
               agents: str | None = None, epoch: str | None = None) -> faust.App:
    """Build the worker app: the shared context, then each wanted agent's module
    (``streams/agents/``). ``epoch`` namespaces offset watermarks (see streams.state)."""
    from streams.errors import ConfigError

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is not set (or run `xrec dev`)")
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set (or run `xrec dev`)")
    platforms = platforms or load_platforms(settings.platforms_path)
    wanted = _agents(agents or settings.agents)
    app = base_app(settings, settings.app_id)
    topics = Topics(settings)
    redis = redis_from_url(settings.redis_url, settings.redis_timeout_s)
    state = RedisState(redis, settings, topics.unified, epoch=epoch or settings.state_epoch)
    metrics = WorkerMetrics()
    state.on_error = lambda: metrics.redis_errors.inc()  # type: ignore[attr-defined]
    _count_client_errors(metrics.broker_errors)
    ctx = Context(app=app, settings=settings, platforms=platforms, topics=topics, redis=redis,
                  state=state, metrics=metrics, watchdog=Watchdog(settings.stall_after_s),
                  wanted=wanted, worker=worker_id())
    app.xrec_state = state  # type: ignore[attr-defined]
    app.xrec_metrics = metrics.registry  # type: ignore[attr-defined]
    app.xrec_on_skip = lambda n: metrics.consumer_skipped.inc(n)  # type: ignore[attr-defined]
    app.xrec_guard_commits = ctx.guard_commits  # type: ignore[attr-defined]

    enc_cfg = settings.encoder_config()
    if enc_cfg is not None and wanted & {"catalog", "recommend", "train"}:
        from models.encoder import load_encoder

        ctx.encoder = load_encoder(enc_cfg)  # exports/quantizes once, then cached on disk
        ctx.vectors = VectorStore(settings.redis_url, settings.redis_prefix, ctx.encoder.id,
                                  ctx.encoder.dim, timeout_s=settings.redis_timeout_s)
        log.info("item encoder %s on %s", ctx.encoder.id, ctx.encoder.device)
    app.xrec_vectors = ctx.vectors  # type: ignore[attr-defined]

    if "normalize" in wanted:
        normalize.install(ctx)
    if "recommend" in wanted:
        recommend.install(ctx)
    if "train" in wanted and ctx.use_model:
        train.install(ctx)
    if "catalog" in wanted:
        catalog.install(ctx)
    if ctx.vectors is not None and wanted & {"recommend", "train"}:
        # only they read the in-memory index; the catalog agent writes vectors to Redis
        catalog.install_index_refresh(ctx)
    ops.install(ctx)
    api.install(ctx)  # GET /recs/{user}: every worker with a web port (it reads Redis only)
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


def _agents(spec: str) -> set[str]:
    from streams.errors import ConfigError

    if spec.strip() in ("", "all"):
        return set(AGENTS)
    names = {a.strip() for a in spec.split(",") if a.strip()}
    bad = names - set(AGENTS)
    if bad:
        raise ConfigError(f"unknown agents {sorted(bad)}; choose from {', '.join(AGENTS)}")
    return names
