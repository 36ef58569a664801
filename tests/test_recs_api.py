"""``GET /recs/{user_key}`` (streams/agents/api.py) on a real worker process, real broker and
real Redis: the cached record with ``k`` and ``explain`` applied, the documented 404 for an
unknown user, the popular fallback (less consumed items) for a known user without
recommendations on a platform, 400 for a bad query. State and cache entries are written
through the real ``RedisState.apply`` / ``RedisState.cache``, with the recommend path's own
serialisations (``RecsOut``, ``Recommendations``); the worker runs the normalize agent only
(the page is on every worker with a web port) so it starts quickly."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.agents.api import ApiError, _shape, parse_query
from streams.records import Evidence, Interaction, Recommendations, Why
from streams.settings import Settings
from streams.state import RecsOut, RedisState, redis_from_url
from tests.conftest import create_all_topics, make_settings, settings_env
from xrec.stack import free_port, start_worker, wait_worker_ready

pytestmark = pytest.mark.integration

T0 = 1_750_000_000.0
WHY_HIST = {"kind": "history", "platform": None,
            "evidence": [{"platform": "music", "item": "m12", "share": 0.4},
                         {"platform": "shop", "item": "s3", "share": 0.6}]}


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory) -> Iterator[tuple[str, Settings]]:
    """A worker serving the page: (base URL, its settings)."""
    ns = "t" + uuid.uuid4().hex[:8]
    port = free_port()
    s = make_settings(stack, ns, web_port=port, encoder_backend="none", model_enabled=False,
                      rec_k=5)
    create_all_topics(s)
    w = start_worker(tmp_path_factory.mktemp("api"), settings_env(s), agents="normalize")
    try:
        wait_worker_ready(s.redis_url or "", s.redis_prefix, w, timeout=120)
        yield f"http://127.0.0.1:{port}", s
    finally:
        w.stop()


def get(url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers.get_content_type() == "application/json"
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers.get_content_type() == "application/json"
        return exc.code, json.loads(exc.read())


def write(s: Settings, events: list[tuple[str, str, str, float]],
          cached: list[tuple[str, str, str]]) -> None:
    """Apply (user, platform, item, weight) events and cache (platform, user, JSON) records
    through the real state store."""

    async def go() -> None:
        r = redis_from_url(s.redis_url or "")
        st = RedisState(r, s, f"{s.topic_prefix}events.unified", epoch="api")
        off = int(await r.incrby(f"{s.redis_prefix}test:off", len(events))) - len(events)
        batch = [(0, Interaction(platform=p, user=u, item=i, kind="play", label=1, weight=w,
                                 event_time=T0, event_id=f"e{off + n}", produced_at=T0,
                                 src_topic="src", src_partition=0, src_offset=off + n))
                 for n, (u, p, i, w) in enumerate(events)]
        if batch:
            res = await st.apply(batch)
            assert res.applied == len(batch)
        recs = [(Recommendations.model_construct(user=u, platform=p, produced_at=T0), payload)
                for p, u, payload in cached]
        await st.cache(recs)
        await r.aclose()

    asyncio.run(go())


def test_cached_recs_k_and_explain(api):
    base, s = api
    hit = RecsOut("u-hit", "music", [(f"m{i}", 1.0 - i / 10) for i in range(5)], "popco-2",
                  T0, T0 + 1, T0 + 1.05, 3).model_dump_json()
    why = [Why.model_validate(WHY_HIST).model_dump_json(),
           Why(kind="cooccurrence", evidence=[Evidence(platform="video", item="v9", share=1.0)]
               ).model_dump_json()]
    # as the recommend agent writes it: reasons on the first items only, no key after them
    explained = RecsOut("u-hit", "video", [("v1", 2.0), ("v2", 1.5), ("v3", 1.0)], "heads-7",
                        T0, T0, T0 + 0.1, 1, why).model_dump_json()
    assert '"why"' not in json.dumps(json.loads(explained)["items"][2])
    write(s, [], [("music", "u-hit", hit), ("video", "u-hit", explained)])

    code, body = get(f"{base}/recs/u-hit?platform=music")
    want = json.loads(hit)
    assert code == 200 and body == {**want, "fallback": None}  # the record as published

    code, body = get(f"{base}/recs/u-hit?platform=music&k=2")
    assert code == 200 and body["items"] == want["items"][:2]

    code, body = get(f"{base}/recs/u-hit?platform=video")
    assert code == 200 and body["scorer"] == "heads-7"
    assert body["items"] == [{"item": "v1", "score": 2.0}, {"item": "v2", "score": 1.5},
                             {"item": "v3", "score": 1.0}]  # no "why" key at all

    code, body = get(f"{base}/recs/u-hit?platform=video&explain=1&k=2")
    assert code == 200 and [it["item"] for it in body["items"]] == ["v1", "v2"]
    assert body["items"][0]["why"] == WHY_HIST
    assert body["items"][1]["why"]["kind"] == "cooccurrence"
    code, body = get(f"{base}/recs/u-hit?platform=video&explain=true")
    assert "why" not in body["items"][2]  # beyond the explained head: as cached


def test_unknown_user_is_a_documented_404(api):
    base, _ = api
    code, body = get(f"{base}/recs/nobody-{uuid.uuid4().hex}?platform=music")
    assert code == 404
    assert body["error"] == "unknown_user" and body["platform"] == "music"
    assert body["user"].startswith("nobody-") and body["message"]


def test_known_user_without_recs_gets_popular_less_consumed(api):
    base, s = api
    # popularity on music (same event time, so by weight): m1 > m2 > m3 > m4;
    # "cold" consumed m1 on music and has no cached recommendations anywhere
    write(s, [("a", "music", "m1", 5.0), ("a", "music", "m2", 4.0), ("b", "music", "m3", 3.0),
              ("b", "music", "m4", 2.0), ("cold", "music", "m1", 1.0)], [])

    code, body = get(f"{base}/recs/cold?platform=music&k=2")
    assert code == 200
    assert body["fallback"] == "popular" and body["scorer"] == "popular"
    assert [it["item"] for it in body["items"]] == ["m2", "m3"]  # m1 consumed: read deeper
    assert all("why" not in it for it in body["items"])
    assert body["items"][0]["score"] > body["items"][1]["score"] > 0

    code, body = get(f"{base}/recs/cold?platform=music&explain=1")
    assert [it["item"] for it in body["items"]] == ["m2", "m3", "m4"]
    assert all(it["why"] == {"kind": "popular", "platform": "music"} for it in body["items"])

    # "b" consumed m3 and m4: the head, less those
    code, body = get(f"{base}/recs/b?platform=music")
    assert code == 200 and [it["item"] for it in body["items"]] == ["m1", "m2"]
    # a platform the user never used and nobody has yet: an empty list, still marked
    code, body = get(f"{base}/recs/a?platform=podcast")
    assert code == 200 and body["items"] == [] and body["fallback"] == "popular"


def test_bad_queries_are_400(api):
    base, _ = api
    code, body = get(f"{base}/recs/u-hit?platform=tv")
    assert code == 400 and body["error"] == "unknown_platform"
    assert set(body["platforms"]) >= {"shop", "video", "music", "podcast"}
    for q in ("", "?k=3", "?platform=music&k=0", "?platform=music&k=abc",
              "?platform=music&k=1001", "?platform=music&explain=maybe"):
        code, body = get(f"{base}/recs/u-hit{q}")
        assert code == 400 and body["error"] == "bad_request", q
    code, body = get(f"{base}/recs/{'x' * 300}?platform=music")
    assert code == 400


def test_requests_are_timed_on_metrics(api):
    base, _ = api
    get(f"{base}/recs/nobody?platform=music")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'xrec_api_request_ms_count{code="404"}' in text


# ------------------------------------------------------------------ no network


def test_parse_query():
    plats = ("shop", "music")
    assert parse_query("u", {"platform": "music"}, plats, 20) == ("music", 20, False)
    assert parse_query("u", {"platform": "shop", "k": "3", "explain": "1"}, plats, 20) == (
        "shop", 3, True)
    with pytest.raises(ApiError) as e:
        parse_query("u", {"platform": "tv"}, plats, 20)
    assert e.value.status == 400 and e.value.body["platforms"] == ["shop", "music"]


def test_shape_keeps_unknown_fields_and_drops_why():
    raw = json.dumps({"user": "u", "platform": "p", "extra": 1,
                      "items": [{"item": "a", "score": 1.0, "why": WHY_HIST},
                                {"item": "b", "score": 0.5}]})
    assert json.loads(_shape(raw, 1, False)) == {
        "user": "u", "platform": "p", "extra": 1, "items": [{"item": "a", "score": 1.0}],
        "fallback": None}
    assert json.loads(_shape(raw, 5, True))["items"][0]["why"] == WHY_HIST


def test_standalone_server_answers_the_same(api, tmp_path):
    """``xrec serve`` (``python -m streams.agents.api``): the page alone in its process."""
    from xrec.stack import Service, _popen

    base, s = api
    write(s, [("alone-u", "music", "m1", 1.0)],
          [("video", "alone-u", RecsOut("alone-u", "video", [("v1", 1.0)], "heads-1", T0, T0,
                                        T0, 1, []).model_dump_json())])
    port = free_port()
    xrec = str(Path(sys.executable).with_name("xrec"))
    proc, log_path, fh = _popen("api", [xrec, "serve", "--port", str(port)], tmp_path,
                                {**os.environ, **settings_env(s)})
    svc = Service("api", proc, "", log_path, fh)
    try:
        alone = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{alone}/healthz", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, svc.log_tail()
                time.sleep(0.2)
        for path, code in (("/recs/alone-u?platform=music&explain=1", 200),  # fallback
                           ("/recs/alone-u?platform=video&k=1", 200), ("/recs/nobody?platform"
                           "=music", 404), ("/recs/alone-u?platform=tv", 400)):
            got = get(alone + path)
            assert got[0] == code and got == get(base + path), path
    finally:
        svc.stop()
