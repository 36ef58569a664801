"""The whole loop against a real Tansu broker and a real Redis, with the real worker process:
platform events in (kafka-python, from outside), recommendations out; bad events
dead-lettered with reasons; no raw id downstream; a fourth platform by config alone; and a
full redelivery that changes no state."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import redis as redis_sync

from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.platforms import load_platforms
from streams.records import DeadLetter, Interaction, Recommendations
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings, redis_dump
from tests.kafka_util import produce, read_all

pytestmark = pytest.mark.integration


def wait_for(cond, timeout=90.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def state_dump(url: str, prefix: str) -> dict:
    """Everything under the prefix except what legitimately changes on a re-run."""
    return redis_dump(url, prefix, skip=lambda rest: rest in ("stats", "workers")
                      or rest.startswith(("recs:", "vec:", "vecver:", "heads:")))


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("sim")
    man = simulate(SimConfig(events=900, users=60, malformed=0.05, ingest_events=25, seed=11), d)
    return d, man


def test_whole_loop(stack, ns, worker_factory, sim, tmp_path):
    d, man = sim
    s = make_settings(stack, ns, rec_k=10)
    t = Topics(s)
    reg = load_platforms(s.platforms_path)
    create_all_topics(s)
    worker = worker_factory(s)

    rep = Replayer(stack.bootstrap)
    rep.replay([Source(d / f, t.catalog(p)) for p, f in man["files"]["catalog"].items()],
               progress=False)
    rep.replay([Source(d / f, t.events(p), reg[p]) for p, f in man["files"]["events"].items()]
               + [Source(d / man["files"]["ingest"], t.ingest)], progress=False)
    # the fourth platform, declared only in tests/data/podcast.yaml
    now = time.time()
    podcast = [json.dumps({"id": f"p{i}", "listener": f"pod-raw-{i % 3}", "episode": f"ep{i % 4}",
                           "seconds": 600 + i, "at": now - 100 + i}).encode() for i in range(8)]
    produce(stack.bootstrap, t.events("podcast"), podcast)
    rep.close()

    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    valid = man["valid_events"] + len(podcast)
    expected_dl = sum(man["deadletter_expected"].values())

    def drained():
        st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        return st if (st.get("events_applied", 0) >= valid and
                      st.get("deadlettered", 0) >= expected_dl) else None

    st = wait_for(drained, what="every event applied or dead-lettered")
    assert st["events_applied"] == valid
    assert st["deadlettered"] == expected_dl
    # the hostile stream re-sends some events (same event id): skipped, counted, never applied
    assert st["duplicates_offset"] == 0 and st["duplicates_event"] == man["duplicates"]

    # --- dead letters: every bad event, with its reason and source coordinates
    dls = [DeadLetter.model_validate_json(v) for _, v in read_all(stack.bootstrap, t.deadletter)]
    assert Counter(x.code for x in dls) == Counter(man["deadletter_expected"])
    for x in dls:
        assert x.message and x.src_topic.startswith(f"{ns}.events.") and x.src_offset >= 0

    # --- recommendations: every user got some, on every platform they used
    unified = [Interaction.model_validate_json(v) for _, v in read_all(stack.bootstrap, t.unified)]
    assert len(unified) == valid + man["duplicates"]  # re-sent events pass normalize
    pairs = {(i.user, i.platform) for i in unified}
    recs = []
    for p in [*reg]:
        recs += [Recommendations.model_validate_json(v)
                 for _, v in read_all(stack.bootstrap, t.recs(p))]
    got_pairs = {(x.user, x.platform) for x in recs}
    assert got_pairs == pairs
    users = r.smembers(f"{ns}:users")
    assert {u for u, _ in pairs} == users
    consumed = {(i.user, i.platform, i.item) for i in unified}
    last = {}
    for x in recs:
        assert len(x.items) <= 10 and x.published_at >= x.produced_at
        last[(x.user, x.platform)] = x
    for (u, p), x in last.items():  # the latest recs never repeat consumed items
        assert not {(u, p, it.item) for it in x.items} & consumed
    assert any(x.platform == "podcast" and x.items for x in recs)
    cached = Recommendations.model_validate_json(r.get(f"{ns}:recs:podcast:{recs[-1].user}")
                                                 or recs[-1].model_dump_json())
    assert cached.platform

    # --- catalog landed in Redis with its text (it is encoded alongside the events)
    wait_for(lambda: int(r.hget(f"{ns}:stats", "catalog_items") or 0)
             >= sum(man["items"].values()), what="the catalog stored")
    assert r.scard(f"{ns}:items:video") == man["items"]["video"]
    assert "Nebula" in r.hget(f"{ns}:item:video:vid-00000", "text")

    # --- privacy: no raw user id or account id anywhere downstream
    raw_ids = set()
    for f in [*man["files"]["events"].values(), man["files"]["ingest"]]:
        for line in (d / f).read_bytes().splitlines():
            raw_ids |= set(re.findall(rb"(?:shop|video|music|telegraph)-user-\d{5}|acct-\d{5}",
                                      line))
    assert any(x.startswith(b"telegraph-") for x in raw_ids)
    raw_ids |= {f"pod-raw-{i}".encode() for i in range(3)}
    assert len(raw_ids) > 50
    pattern = re.compile(b"|".join(re.escape(x) for x in sorted(raw_ids)))
    haystacks = {}
    for topic in [t.unified, t.deadletter, *[t.recs(p) for p in reg]]:
        haystacks[topic] = b"\n".join((k or b"") + b" " + v
                                      for k, v in read_all(stack.bootstrap, topic))
    rb = redis_sync.Redis.from_url(stack.redis_url)
    for k in rb.scan_iter(f"{ns}*".encode()):
        typ = rb.type(k)
        val = (rb.get(k) if typ == b"string" else repr(rb.hgetall(k)).encode() if typ == b"hash"
               else repr(rb.lrange(k, 0, -1)).encode() if typ == b"list"
               else repr(rb.zrange(k, 0, -1)).encode() if typ == b"zset"
               else repr(rb.smembers(k)).encode())
        haystacks[f"redis {k!r}"] = k + b" " + (val or b"")
    haystacks["worker log"] = Path(worker.log_path).read_bytes()
    leaks = {name: pattern.findall(h)[:3] for name, h in haystacks.items() if pattern.search(h)}
    assert not leaks, f"raw ids leaked downstream: {leaks}"

    # --- full redelivery: a second consumer group replays every topic from the start
    before = state_dump(stack.redis_url, f"{ns}:")
    worker.stop()
    s2 = make_settings(stack, ns, rec_k=10, app_id=f"{ns}-replay")
    worker_factory(s2, name="worker2")

    def redone():
        st2 = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        return st2 if st2.get("duplicates_offset", 0) >= 2 * valid else None

    st2 = wait_for(redone, what="the replayed stream to be skipped")
    assert st2["events_applied"] == valid  # nothing applied twice
    assert state_dump(stack.redis_url, f"{ns}:") == before
