"""Agents driven in memory with Faust's test_context(); only the producer boundary is
captured (the real-broker tests are in test_pipeline.py)."""

import asyncio
import json
import time

from streams.app import create_app
from streams.records import DeadLetter, Interaction
from tests.conftest import make_settings


def test_normalize_agent_routes_good_and_bad(stack, ns):
    s = make_settings(stack, ns)
    app = create_app(s, agents="normalize")
    app.finalize()
    sent: list[tuple[str, bytes | None, bytes]] = []

    async def capture(topic, key, value, partition, timestamp, headers, **kw):
        sent.append((topic, key, value))

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
