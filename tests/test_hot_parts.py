"""Small parts of the hot path that trade memory for CPU: each must give exactly what
the plain version gives, and stay bounded."""

from __future__ import annotations

import gc
import json
import random
import types

from aiokafka.partitioner import DefaultPartitioner

import streams.heads as heads
from streams.app import CachedPartitioner
from streams.gctune import freeze_startup
from streams.records import TrainingExample


def test_cached_partitioner_agrees_with_the_java_compatible_default():
    rnd = random.Random(3)
    part = CachedPartitioner(keep=50)
    keys = [rnd.randbytes(rnd.randint(1, 40)) for _ in range(300)]
    for parts in ([0], [0, 1, 2, 3], list(range(7))):
        for k in keys + keys:  # the second round reads the memo (and refills it past keep)
            assert part(k, parts, parts) == DefaultPartitioner()(k, parts, parts)
    assert len(part._hash) <= 50
    assert part(None, [0, 1, 2], [2]) == 2  # no key: one of the available partitions


def test_examples_json_remembered_fragments_give_the_same_json(monkeypatch):
    monkeypatch.setattr(heads, "_FRAG", {})
    monkeypatch.setattr(heads, "_FRAG_KEEP", 5)
    hist = [("music", f"m{i}", i % 2, 1000.0 + i) for i in range(8)]
    ev = types.SimpleNamespace(user="u1", platform="video", item="v1", label=1, weight=0.5,
                               event_time=2000.0, produced_at=1.5)
    neg = types.SimpleNamespace(**{**vars(ev), "label": 0})
    first = heads.examples_json([(ev, hist), (neg, hist)], now=3.0)
    assert len(first) == 1  # positives only
    again = heads.examples_json([(ev, hist[2:] + hist[:2])], now=3.0)  # memo was full: reset
    assert len(heads._FRAG) <= 8
    for (key, value), h in ((first[0], hist), (again[0], hist[2:] + hist[:2])):
        assert key == b"u1"
        ex = TrainingExample.model_validate_json(value)
        assert [tuple(x) for x in ex.history] == h
        assert json.loads(value) == json.loads(ex.model_dump_json())


def test_freeze_startup_moves_what_is_loaded_out_of_collections():
    before = gc.get_threshold()
    try:
        assert freeze_startup(0, "off") == 0 and gc.get_threshold() == before
        keep = [[i] for i in range(1000)]  # tracked objects alive now
        n = freeze_startup(20_000, "test")
        # (other threads of the test session may free frozen objects meanwhile: the
        # count can shrink below n, never below what this test keeps alive)
        assert n >= len(keep) and gc.get_freeze_count() >= len(keep)
        assert gc.get_threshold()[0] == 20_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_histogram_observe_many_counts_as_observe_does():
    from streams.metrics import Histogram

    rnd = random.Random(5)
    vs = [rnd.expovariate(0.01) for _ in range(500)] + [0.0, 5.0, 1e9, float("nan")]
    one, many = Histogram("one", "x", labels=["a"]), Histogram("many", "x", labels=["a"])
    for v in vs:
        one.observe(v, "l")
    many.observe_many(vs[:100], "l")
    many.observe_many(vs[100:], "l")
    many.observe_many([], "l")
    a, b = one.series[("l",)], many.series[("l",)]
    assert a[:-1] == b[:-1]  # bucket counts and the count (NaN: in no bucket, counted)


def test_item_table_columns_follow_rows_and_new_items():
    import numpy as np

    from models.heads import ItemTable

    t = ItemTable(4, 64)
    t.set_text("a", ["x", "y"], np.eye(2, 4))
    t.ensure("b", "x")  # the same id on another platform: its own column there
    assert t.columns("a") == {"x": 0, "y": 1} and t.columns("b") == {"x": 0}
    t.ensure("a", "z")  # a new item: the memo is rebuilt
    cols = t.columns("a")
    assert cols == {"x": 0, "y": 1, "z": 2}
    assert [t.ids[g] for g in t.rows("a")] == sorted(cols, key=cols.get)


def test_depth_check_fast_path_agrees_with_the_walk():
    from streams.normalize import _depth_exceeds
    from streams.normalize import _depth_walk as walk  # the walk without the shortcut

    for obj in ({}, {"a": 1}, {"a": 1, "b": "x"}, {"a": [1]}, {"a": {"b": {"c": 1}}}, [1, [2]]):
        for limit in range(5):
            assert _depth_exceeds(obj, limit) == walk(obj, limit), (obj, limit)


def test_publish_many_lands_where_publish_would_in_order(stack, ns):
    """Record by record, or one record batch per partition through aiokafka's
    send_batch: either way each key on the partition the Java-compatible partitioner
    picks, a key's records in order across calls, a record larger than a batch sent."""
    import asyncio

    from kafka import KafkaConsumer, TopicPartition

    from streams.agents.context import Context, WorkerMetrics
    from streams.app import base_app
    from tests.conftest import make_settings
    from xrec.stack import create_topics

    topic = f"{ns}.many"
    create_topics(stack.bootstrap, [topic], 4)
    app = base_app(make_settings(stack, ns), f"{ns}-many")
    ctx = Context(app=app, settings=None, platforms=None, topics=None, redis=None,  # type: ignore[arg-type]
                  state=None, metrics=WorkerMetrics(), watchdog=None, wanted=set(),  # type: ignore[arg-type]
                  worker="t")
    rnd = random.Random(2)
    keys = [f"user-{i}".encode() for i in range(40)]
    records = [(k, f"{k.decode()}#{n}".encode()) for n in range(300) for k in [rnd.choice(keys)]]
    big = (b"user-big", b"x" * 300_000)  # over the 256 KB batch size

    batches: list[int] = []

    async def go():
        await app.producer.start()
        prod = app.producer._producer
        send_batch = prod.send_batch

        async def counted(batch, topic, *, partition):
            batches.append(batch.record_count())
            return await send_batch(batch, topic, partition=partition)

        prod.send_batch = counted
        try:
            await ctx.publish_many(topic, records[:10])  # few: record by record, lingering
            await ctx.publish_many(topic, records[10:150] + [big])  # behind them: the same
            await asyncio.sleep(0.1)  # (the lingering batches are sent)
            await ctx.publish_many(topic, records[150:])  # many: one batch per partition
            await app.producer.flush()
        finally:
            await app.producer.stop()

    asyncio.run(go())
    c = KafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=None, fetch_max_wait_ms=100,
                      max_partition_fetch_bytes=1 << 20)
    got: dict[int, list[tuple[bytes, bytes]]] = {}
    try:
        for p in range(4):
            tp = TopicPartition(topic, p)
            c.assign([tp])
            c.seek_to_beginning(tp)
            end = c.end_offsets([tp])[tp]
            while c.position(tp) < end:
                for recs in c.poll(timeout_ms=500).values():
                    got.setdefault(p, []).extend((r.key, r.value) for r in recs)
    finally:
        c.close()
    assert sum(len(v) for v in got.values()) == len(records) + 1
    assert len(batches) >= 4 and sum(batches) >= 100  # the last call: whole batches
    parts = [0, 1, 2, 3]
    for p, recs in got.items():
        for k, _ in recs:
            assert DefaultPartitioner()(k, parts, parts) == p
    for k in keys:  # a key's records in the order they were handed over
        sent = [v for kk, v in records if kk == k]
        assert sent
        p = DefaultPartitioner()(k, parts, parts)
        assert [v for kk, v in got.get(p, []) if kk == k] == sent
    assert ctx.metrics.records_out.values[(topic,)] == len(records) + 1
