"""An outside client that is not kafka-python (issue 14): confluent-kafka (librdkafka)
produces raw video events in the platform's own format against the embedded broker, a real
worker applies them, and confluent-kafka consumes the recommendations (in a consumer group)
and the dead letter of a bad event. The settings used here are the ones the README's client
table names: ``session.timeout.ms`` 6000 (librdkafka's default, 45 s, made the group join
take ~23 s on Tansu)."""

from __future__ import annotations

import json
import time

import pytest
import redis as redis_sync
from confluent_kafka import Consumer, KafkaError, Producer

from streams.normalize import Pseudonymizer
from streams.platforms import load_platforms
from streams.records import DeadLetter, Recommendations
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings
from tests.test_pipeline import wait_for

pytestmark = pytest.mark.integration

USERS = 4


def _events(now: float) -> list[dict]:
    """Watch sessions as the video platform sends them: four viewers over six videos, so
    each viewer has videos the others watched (something to recommend)."""
    out = []
    for u in range(USERS):
        for j in range(3):
            item = (u + j) % 6
            out.append({"event_id": f"ck-{u}-{j}", "viewer_id": f"ck-viewer-{u}",
                        "video_id": f"ck-vid-{item}", "seconds_watched": 500.0 + 10 * j,
                        "duration": 600.0, "watched_at": now - 120 + u * 10 + j})
    out[0]["rating"] = 5  # a rate event too
    return out


def test_confluent_kafka_produces_events_and_consumes_recommendations(stack, ns,
                                                                       worker_factory):
    s = make_settings(stack, ns, rec_k=5)
    t = Topics(s)
    reg = load_platforms(s.platforms_path)
    create_all_topics(s)
    worker_factory(s)

    events = _events(time.time())
    pseudo = Pseudonymizer(s.secret_bytes(), s.pseudonym_hex_chars)
    expected = {pseudo.user_key(reg["video"], ev) for ev in events}
    assert len(expected) == USERS

    failures: list[KafkaError] = []
    producer = Producer({"bootstrap.servers": stack.bootstrap, "client.id": f"{ns}-ck",
                         "linger.ms": 5, "message.timeout.ms": 20000})
    for ev in events:  # keyed by the platform's user id, as a platform producer would
        producer.produce(t.events("video"), key=ev["viewer_id"].encode(),
                         value=json.dumps(ev).encode(),
                         on_delivery=lambda err, _msg: err and failures.append(err))
    producer.produce(t.events("video"), key=b"ck-viewer-bad", value=b'{"event_id": "ck-bad", ')
    assert producer.flush(20) == 0, "confluent-kafka could not deliver every event"
    assert not failures, failures

    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        wait_for(lambda: int(r.hget(f"{ns}:stats", "events_applied") or 0) >= len(events),
                 timeout=40, what="the worker to apply the confluent-kafka events")
    finally:
        r.close()

    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"{ns}-ck-recs",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                         "enable.auto.commit": False})
    recs: dict[str, Recommendations] = {}
    dead: list[DeadLetter] = []
    try:
        consumer.subscribe([t.recs("video"), t.deadletter])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (set(recs) >= expected and dead):
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            if msg.topic() == t.deadletter:
                dead.append(DeadLetter.model_validate_json(msg.value()))
            else:
                rec = Recommendations.model_validate_json(msg.value())
                assert msg.key() == rec.user.encode()
                recs[rec.user] = rec
        if recs or dead:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    assert set(recs) == expected, f"recommendations for {len(recs)} of {USERS} users"
    for rec in recs.values():
        assert rec.platform == "video" and len(rec.items) <= 5
    assert any(rec.items for rec in recs.values())
    assert [(d.code, d.src_topic, d.platform) for d in dead] == [
        ("invalid_json", t.events("video"), "video")]
