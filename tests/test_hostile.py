"""Hostile input through a real worker (broker + Redis), as a hypothesis property:
every bad event lands in the dead-letter topic with the reason its construction implies,
every good event is applied, a re-sent event (same event id) is applied once, and the
worker's memory stays bounded under a flood of bad input."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.records import DeadLetter
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings
from tests.kafka_util import produce, read_all
from tests.test_pipeline import wait_for

pytestmark = pytest.mark.integration

NOW = time.time()
REQUIRED = ("event_id", "viewer_id", "video_id", "seconds_watched", "duration", "watched_at")


def _good(n: int, user: int, item: int, watched: float, duration: float, age_s: float) -> dict:
    return {"event_id": f"h-{n}", "viewer_id": f"raw-viewer-{user}", "video_id": f"vid-{item}",
            "seconds_watched": round(watched * duration, 2), "duration": duration,
            "watched_at": NOW - age_s}


def _dump(ev: dict) -> bytes:
    return json.dumps(ev, separators=(",", ":")).encode()


# each strategy yields (payload, expected outcome): "ok", "dup" or a dead-letter code
_base = st.tuples(st.integers(0, 40), st.integers(0, 200), st.floats(0, 1),
                  st.floats(1, 20_000), st.floats(0, 20 * 86400))
_wrong = st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=3),
                   st.lists(st.integers(), min_size=1, max_size=5))


def _mutations(ev: dict) -> st.SearchStrategy[tuple[bytes, str]]:
    line = _dump(ev)
    return st.one_of(
        st.just((line, "ok")),
        st.sampled_from(REQUIRED[1:]).map(
            lambda k: (_dump({x: v for x, v in ev.items() if x != k}), "schema")),
        st.tuples(st.sampled_from(("viewer_id", "video_id", "seconds_watched", "duration")),
                  _wrong).map(lambda kv: (_dump({**ev, kv[0]: kv[1]}), "schema")),
        st.sampled_from((math.nan, math.inf, -math.inf)).map(
            lambda x: (json.dumps({**ev, "duration": x}).encode(), "invalid_json")),
        st.one_of(st.floats(0, 631_000_000), st.floats(NOW + 2 * 86400, 4e9)).map(
            lambda t: (_dump({**ev, "watched_at": t}), "time_out_of_range")),
        st.integers(257, 5000).map(lambda n: (_dump({**ev, "video_id": "y" * n}), "schema")),
        st.integers(66_000, 200_000).map(lambda n: (_dump({**ev, "pad": "p" * n}), "too_large")),
        st.integers(17, 80).map(lambda d: (_dump({**ev, "x": json.loads("[" * d + "]" * d)}),
                                           "too_deep")),
        st.integers(257, 1500).map(
            lambda n: (_dump({**ev, **{f"f{i}": i for i in range(n)}}), "schema")),
        st.tuples(st.integers(1, len(line) - 1), st.sampled_from((b"\xff", b"\xc3\x28",
                                                                   b"\xed\xa0\x80"))).map(
            lambda ib: (line[:ib[0]] + ib[1] + line[ib[0]:], "invalid_utf8")),
        st.integers(0, len(line) - 1).map(lambda i: (line[:i], "invalid_json")),
        st.sampled_from((b"[]", b"3", b'"x"', b"null", b"true")).map(
            lambda b: (b, "not_an_object")),
        st.just((line, "dup")),  # the same event sent twice
    )


@st.composite
def batches(draw: st.DrawFn, tag: str) -> list[tuple[bytes, str]]:
    out: list[tuple[bytes, str]] = []
    for _ in range(draw(st.integers(1, 12))):
        n = draw(st.integers(0, 10**9))
        user, item, w, d, age = draw(_base)
        ev = _good(n, user, item, w, d, age)
        ev["event_id"] = f"{tag}-{n}"
        payload, outcome = draw(_mutations(ev))
        if outcome == "dup":
            out += [(payload, "ok"), (payload, "ok")]  # the second one counts as a dup
        else:
            out.append((payload, outcome))
    return out


def _stats(r: redis_sync.Redis, ns: str) -> dict[str, int]:
    return {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_hostile_events_through_the_worker(stack, ns, worker_factory):
    s = make_settings(stack, ns, platforms_path="", model_enabled=False)
    t = Topics(s)
    create_all_topics(s)
    w = worker_factory(s)
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    expected: Counter[str] = Counter()
    seen_ids: set[tuple[str, str]] = set()  # (user, event id): dedup is per user

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batches(ns))
    def check(batch: list[tuple[bytes, str]]) -> None:
        # a drawn event id can repeat across examples: the second one is a duplicate too
        want = Counter()
        for payload, outcome in batch:
            if outcome == "ok":
                ev = json.loads(payload)
                key = (ev["viewer_id"], ev["event_id"])
                outcome = "dup" if key in seen_ids else "ok"
                seen_ids.add(key)
            want[outcome] += 1
        before = _stats(r, ns)
        produce(stack.bootstrap, t.events("video"), [p for p, _ in batch])
        dl_codes = Counter({k: v for k, v in want.items() if k not in ("ok", "dup")})

        def done() -> dict[str, int] | None:
            now = _stats(r, ns)
            moved = {k: now.get(k, 0) - before.get(k, 0) for k in now}
            return moved if (moved.get("events_applied", 0) >= want["ok"] and
                             moved.get("deadlettered", 0) >= sum(dl_codes.values()) and
                             moved.get("duplicates_event", 0) >= want["dup"]) else None

        moved = wait_for(done, timeout=60, what=f"batch {dict(want)}")
        time.sleep(0.3)
        moved = {k: v - before.get(k, 0) for k, v in _stats(r, ns).items()}
        assert moved.get("events_applied", 0) == want["ok"]  # every good event, once
        assert moved.get("duplicates_event", 0) == want["dup"]  # re-sent: skipped
        for code, n in dl_codes.items():
            assert moved.get(f"deadletter:{code}", 0) == n, (code, moved)
        expected.update(dl_codes)
        assert w.alive()

    check()
    # every dead letter is on the topic with its reason and source coordinates
    dls = [DeadLetter.model_validate_json(v) for _, v in read_all(stack.bootstrap, t.deadletter)]
    assert Counter(x.code for x in dls) == expected
    assert all(x.message and x.src_topic == t.events("video") for x in dls)
    leaks = [x for x in dls if "raw-viewer-" in x.model_dump_json()]
    assert not leaks, [(x.code, x.message, x.excerpt[:300]) for x in leaks][:3]  # redacted

    # bounded memory: two equal floods of bad input; the second must not grow the worker
    flood = [b'{"x":' + b"[" * 40 + b"]" * 40 + b"}", b"\xff" * 1000, b"p" * 70_000,
             _dump({**_good(0, 1, 1, 0.5, 100, 10), **{f"f{i}": i for i in range(600)}})]
    rss = []
    for _ in range(2):
        target = _stats(r, ns).get("deadlettered", 0)
        produce(stack.bootstrap, t.events("video"), flood * 500)
        wait_for(lambda target=target: _stats(r, ns).get("deadlettered", 0) >= target + 2000,
                 timeout=120, what="the flood dead-lettered")
        rss.append(_rss_mb(w.pid))
    print(f"worker RSS after flood 1: {rss[0]:.0f} MB, after flood 2: {rss[1]:.0f} MB")
    assert rss[1] - rss[0] < 40, f"worker RSS grew {rss[0]:.0f} → {rss[1]:.0f} MB"
    assert w.alive()
