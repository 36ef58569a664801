"""Agents driven in memory with Faust's test_context(); only the producer boundary is
captured (the real-broker tests are in test_pipeline.py)."""

import asyncio
import json
import time

from streams.app import create_app
from streams.records import DeadLetter, Interaction
from tests.conftest import make_settings


def _delivered() -> asyncio.Future:
    """What the Kafka client's send returns: a future, here already delivered."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


def test_normalize_agent_routes_good_and_bad(stack, ns):
    s = make_settings(stack, ns)
    app = create_app(s, agents="normalize")
    app.finalize()
    sent: list[tuple[str, bytes | None, bytes]] = []

    async def capture(topic, key, value, partition, timestamp, headers, **kw):
        sent.append((topic, key, value))
        return _delivered()

    app.producer.send = capture
    agent = app.agents["xrec.normalize"]
    good = {"platform": "music", "event_id": "m1", "listener_id": "raw-l-1",
            "track_id": "trk-1", "ms_played": 200000, "skipped": False,
            "played_at": int(time.time() * 1000)}

    async def go():
        async with agent.test_context() as a:
            await a.put(json.dumps(good).encode())
            await a.put(b"{not json")
            await a.put(json.dumps({**good, "platform": "telegraph"}).encode())

    asyncio.run(go())
    assert [t for t, _, _ in sent] == [f"{ns}.events.unified", f"{ns}.deadletter",
                                       f"{ns}.deadletter"]
    inter = Interaction.model_validate_json(sent[0][2])
    assert sent[0][1] == inter.user.encode() and inter.label == 1 and inter.platform == "music"
    codes = [DeadLetter.model_validate_json(v).code for _, _, v in sent[1:]]
    assert codes == ["invalid_json", "unknown_platform"]


def test_recommend_agent_applies_and_publishes(stack, ns):
    s = make_settings(stack, ns, batch_interval_s=0.01)
    app = create_app(s, agents="recommend")
    app.finalize()
    sent = []

    async def capture(topic, key, value, partition, timestamp, headers, **kw):
        sent.append((topic, key, value))
        return _delivered()

    app.producer.send = capture
    agent = app.agents["xrec.recommend"]
    now = time.time()

    def inter(off, item):
        return Interaction(platform="shop", user="u" * 32, item=item, kind="purchase", label=1,
                           weight=1.0, event_time=now, event_id=f"e{off}", produced_at=now,
                           src_topic="x", src_partition=0, src_offset=off)

    async def go():
        async with agent.test_context() as a:
            await a.put(inter(0, "sku-1").model_dump_json().encode())
            await a.put(inter(1, "sku-2").model_dump_json().encode())
            await a.put(b"corrupt")
            await asyncio.sleep(0.5)
        return await app.xrec_state.stats()

    st = asyncio.run(go())
    topics = [t for t, _, _ in sent]
    assert f"{ns}.recs.shop" in topics and f"{ns}.deadletter" in topics
    assert st["events_applied"] == 2


def test_adaptive_batches_take_everything_waiting_and_serve_a_lone_event_at_once(stack, ns):
    """Behind: the next batch is all that arrived while one was processed (Faust's
    take_events would stop buffering meanwhile). Caught up: a lone event at once."""
    from streams.agents.batching import consume_batches
    from streams.app import base_app

    app = base_app(make_settings(stack, ns), f"{ns}-batching")
    topic = app.topic(f"{ns}.in", value_type=bytes, value_serializer="raw")
    batches: list[tuple[float, list[bytes]]] = []

    async def handle(events):
        batches.append((time.monotonic(), [e.value for e in events]))
        if len(batches) == 1:
            await asyncio.sleep(0.3)  # a slow batch: the next events pile up

    @app.agent(topic)
    async def agent(stream):
        await consume_batches(stream, 50, 0.0, handle)

    async def go():
        async with agent.test_context() as a:
            await a.put(b"first")
            await asyncio.sleep(0.05)
            for i in range(20):  # arrive while the first batch is processed
                await a.put(f"w{i}".encode())
            await asyncio.sleep(0.6)
            t_lone = time.monotonic()
            await a.put(b"lone")
            await asyncio.sleep(0.2)
            for i in range(120):  # more than the bound: batches of at most 50
                await a.put(f"b{i}".encode())
            await asyncio.sleep(0.5)
            return t_lone

    t_lone = asyncio.run(go())
    sizes = [len(b) for _, b in batches]
    assert sizes[:3] == [1, 20, 1], sizes
    assert batches[2][1] == [b"lone"] and batches[2][0] - t_lone < 0.1
    assert sum(sizes[3:]) == 120 and max(sizes) <= 50
    flat = [v for _, b in batches for v in b]
    assert flat[1:21] == [f"w{i}".encode() for i in range(20)]  # order kept


def test_a_record_faust_skips_in_a_rebalance_is_not_committed(stack, ns, monkeypatch):
    """During a rebalance Faust's stream skips a record it was already handed (flow
    stopped, or fetched in the previous consumer generation). Its pure-Python iterator (used
    where faust's C extension is not built) then acks it although no agent processed it,
    so the next commit would move the group past it: lost. The ack guard
    (streams.agents.batching.guard_acks) lets only processed records count."""
    import faust.streams
    from faust.types.tuples import ConsumerMessage

    from streams.agents.batching import consume_batches
    from streams.app import base_app

    monkeypatch.setattr(faust.streams, "_CStreamIterator", None)  # the pure-Python path
    app = base_app(make_settings(stack, ns), f"{ns}-skip")
    name = f"{ns}.in"
    topic = app.topic(name, value_type=bytes, value_serializer="raw")
    seen: list[bytes] = []

    async def handle(events):
        seen.extend(e.value for e in events)

    @app.agent(topic)
    async def agent(stream):
        await consume_batches(stream, 50, 0.0, handle)

    async def go():
        async with agent.test_context() as a:
            app.topics.acking_topics.add(name)  # as the conductor does for a subscribed topic
            channel, consumer = a.stream().channel, app.consumer
            gen = app.consumer_generation_id
            msgs = []
            for offset, generation in ((0, gen), (1, gen - 1), (2, gen)):  # 1: stale
                m = ConsumerMessage(name, 0, offset, time.time(), 0, None, None,
                                    f"v{offset}".encode(), b"", generation_id=generation)
                msgs.append(m)
                await channel.put(await channel.decode(m))
                await asyncio.sleep(0.1)
            return msgs, consumer._new_offset(msgs[0].tp), consumer._xrec_refused

    msgs, commit_at, refused = asyncio.run(go())
    assert seen == [b"v0", b"v2"]  # Faust skipped the stale record
    assert msgs[1].acked and refused == 1  # its ack was let go...
    assert commit_at == 1  # ...without its offset: the commit stops before it, so it is read again


def test_offset_trail_reports_records_the_consumer_skipped():
    """A hole within an assignment, or a first record after a rebalance beyond the committed
    offset, is counted; records read again are not."""
    from types import SimpleNamespace

    from faust.types import TP

    from streams.agents.batching import OffsetTrail

    consumer = SimpleNamespace(_committed_offset={})
    trail = OffsetTrail(consumer)
    counted: list[int] = []
    trail.on_skip = counted.append
    a, b = TP("t", 0), TP("t", 1)

    def see(tp, *offsets):
        for o in offsets:
            trail.see(SimpleNamespace(tp=tp, offset=o))

    see(a, 0, 1, 2)  # nothing committed yet: the first record is not checked
    see(b, 7, 8)
    assert trail.skipped == 0
    see(a, 5)  # 3 and 4 were never taken
    assert trail.skipped == 2 and counted == [2]
    see(a, 4, 5, 6)  # read again (a rebalance, a crash): expected, not counted
    assert trail.skipped == 2
    trail.reset()  # a rebalance: the group committed a@6, b@9
    consumer._committed_offset.update({a: 6, b: 9})
    see(a, 6, 7)
    see(b, 11)  # 9 and 10 skipped at the seek
    assert trail.skipped == 4 and counted == [2, 2]


def test_a_failed_delivery_stops_the_commits(stack, ns):
    """Faust flushes the producer before committing, but a flush also completes failed
    deliveries: a record the broker did not take must stop the commits (and the worker),
    or the input it came from would be committed past and lost."""
    from aiokafka.errors import KafkaTimeoutError

    s = make_settings(stack, ns)
    app = create_app(s, agents="normalize")
    app.finalize()
    ctx = app.xrec_guard_commits.__self__
    outcomes: list[BaseException | None] = []

    async def send(topic, key, value, partition, timestamp, headers, **kw):
        fut = asyncio.get_running_loop().create_future()
        exc = outcomes.pop(0)
        fut.set_exception(exc) if exc else fut.set_result(None)
        return fut

    app.producer.send = send
    committed: list[dict] = []
    crashed: list[BaseException] = []

    async def commit(offsets):
        committed.append(offsets)
        return True

    async def crash(exc):
        crashed.append(exc)

    app.crash = crash

    async def go():
        consumer = type("C", (), {"_commit": staticmethod(commit)})()
        ctx.guard_commits(consumer)
        outcomes.append(None)
        await ctx.publish("t", None, b"ok")
        first = await consumer._commit({"tp": 1})
        outcomes.append(KafkaTimeoutError())
        await ctx.publish("t", None, b"lost?")
        second = await consumer._commit({"tp": 2})
        return first, second

    first, second = asyncio.run(go())
    assert first is True and second is False
    assert committed == [{"tp": 1}]  # nothing committed after the failure
    assert ctx.delivery_failures == 1 and len(crashed) == 1
    assert ctx.metrics.delivery_errors.values[()] == 1


def test_a_commit_waits_for_the_background_cache_writes(stack, ns):
    """The serving worker writes the read API's copy of its recommendations in the
    background (``RedisState.cache_later``): an offset commit must come after those
    writes, or a crash right after it would leave committed recommendations uncached."""
    import redis as redis_sync

    from streams.state import RecsOut

    s = make_settings(stack, ns)
    app = create_app(s, agents="recommend")
    app.finalize()
    ctx = app.xrec_guard_commits.__self__
    key = f"{s.redis_prefix}recs:video:u1"
    r = redis_sync.Redis.from_url(stack.redis_url)
    seen_at_commit: list[bool] = []

    async def commit(offsets):
        seen_at_commit.append(r.exists(key) == 1)
        return True

    async def go():
        consumer = type("C", (), {"_commit": staticmethod(commit)})()
        ctx.guard_commits(consumer)
        rec = RecsOut("u1", "video", [("v1", 1.0)], "popco", 1.0, time.time(), time.time(), 1)
        ctx.state.cache_later([(rec, rec.model_dump_json())])
        assert r.exists(key) == 0  # not written yet: nothing ran since
        return await consumer._commit({"tp": 1})

    assert asyncio.run(go()) is True
    assert seen_at_commit == [True]


def test_a_failed_background_cache_write_stops_the_commits(stack, ns):
    """A background cache write that failed (not an outage: those are retried) is treated
    as a failed delivery: nothing is committed and the worker crashes, so the batches are
    read again and cached then."""
    s = make_settings(stack, ns)
    app = create_app(s, agents="recommend")
    app.finalize()
    ctx = app.xrec_guard_commits.__self__
    committed: list[object] = []
    crashed: list[BaseException] = []

    async def commit(offsets):
        committed.append(offsets)
        return True

    async def crash(exc):
        crashed.append(exc)

    async def broken(recs):
        raise ValueError("script refused")

    async def go():
        consumer = type("C", (), {"_commit": staticmethod(commit)})()
        ctx.guard_commits(consumer)
        ctx.app.crash = crash
        ctx.state.cache = broken
        ctx.state.cache_later([("rec", "{}")])
        return await consumer._commit({"tp": 1})

    assert asyncio.run(go()) is False
    assert committed == [] and [type(e) for e in crashed] == [ValueError]
