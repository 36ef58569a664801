"""Fixtures: one real Tansu broker and one real Redis per test session (started here,
stopped by PID), unique topic / key prefixes per test, worker subprocesses stopped by PID."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streams.settings import Settings
from streams.topics import Topics
from xrec.stack import (
    RedisClusterProcs,
    Service,
    create_topics,
    sigterm_as_interrupt,
    start_redis,
    start_redis_cluster,
    start_tansu,
    start_worker,
    wait_worker_ready,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


_SIGNALS = contextlib.ExitStack()


def pytest_configure(config: pytest.Config) -> None:
    """A test run stopped with SIGTERM (CI's timeout, `kill`) ends like Ctrl-C: pytest runs the
    fixtures' teardown, so the session's broker, Redis and workers are stopped by PID too.
    Without it they outlived the run (seen: a killed run left its Tansu and Redis behind)."""
    _SIGNALS.enter_context(sigterm_as_interrupt())


def pytest_unconfigure(config: pytest.Config) -> None:
    _SIGNALS.close()


@dataclass
class Stack:
    bootstrap: str
    redis_url: str
    workdir: Path
    services: list[Service] = field(default_factory=list)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    wd = tmp_path_factory.mktemp("stack")
    tansu = start_tansu(wd)
    try:
        redis = start_redis(wd)
    except Exception:
        tansu.stop()
        raise
    st = Stack(tansu.url, redis.url, wd, [tansu, redis])
    try:
        yield st
    finally:
        for svc in reversed(st.services):
            svc.stop()


@pytest.fixture
def ns() -> str:
    """A unique namespace for topics, Redis keys and the consumer group of one test."""
    return "t" + uuid.uuid4().hex[:8]


def make_settings(stack: Stack, ns: str, **kw: object) -> Settings:
    base = dict(env="dev", kafka_bootstrap_servers=stack.bootstrap, redis_url=stack.redis_url,
                topic_prefix=f"{ns}.", redis_prefix=f"{ns}:", app_id=f"{ns}-app", partitions=2,
                platforms_path=str(DATA / "podcast.yaml"))
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def settings_env(s: Settings) -> dict[str, str]:
    """The environment that makes a worker process see exactly these settings."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers or "",
           "REDIS_URL": s.redis_url or ""}
    for name, value in s.model_dump().items():
        if name in ("kafka_bootstrap_servers", "redis_url") or value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"XREC_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def create_all_topics(s: Settings) -> None:
    from streams.platforms import load_platforms

    plan = Topics(s).plan(load_platforms(s.platforms_path), s.partitions)
    create_topics(s.kafka_bootstrap_servers or "", plan, plan)


def redis_dump(url: str, prefix: str, skip=lambda rest: False) -> dict:  # type: ignore[no-untyped-def]
    """Every key under ``prefix`` with its value, for before/after state comparisons;
    ``skip(rest of key)`` leaves out keys that legitimately change."""
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    out = {}
    try:
        for k in sorted(r.scan_iter(f"{prefix}*")):
            if skip(k[len(prefix):]):
                continue
            t = r.type(k)
            out[k] = (r.lrange(k, 0, -1) if t == "list" else r.zrange(k, 0, -1, withscores=True)
                      if t == "zset" else sorted(r.smembers(k)) if t == "set" else r.hgetall(k)
                      if t == "hash" else r.get(k))
    finally:
        r.close()
    return out


@pytest.fixture
def worker_factory(stack: Stack, tmp_path: Path) -> Iterator:
    started: list[Service] = []

    def start(s: Settings, name: str = "worker", agents: str = "all") -> Service:
        w = start_worker(tmp_path, settings_env(s), agents=agents, name=name)
        started.append(w)
        wait_worker_ready(s.redis_url or "", s.redis_prefix, w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    """Three primaries, no replicas, for the module's tests (unique prefixes per test)."""
    cl = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cl
    finally:
        cl.stop()
