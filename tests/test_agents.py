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
    s = make_settings(stack, ns, batch_within_s=0.01)
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
