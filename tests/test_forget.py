"""Erasure (``xrec forget``) on the real broker and Redis: a user erased mid-stream, the
worker SIGKILLed right after, a new one started. Nothing of the user may remain: no Redis
key naming them, no non-tombstone latest value on any recommendation topic; their events
produced before the erasure that were still in the logs are skipped; a later event starts
a fresh state."""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis as redis_sync
from click.testing import CliRunner

from producers.files import read_records
from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.normalize import Normalizer
from streams.platforms import load_platforms
from streams.records import Interaction
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings, settings_env
from tests.kafka_util import produce, read_all
from tests.test_pipeline import wait_for
from xrec.forget import forget_user, user_key
from xrec.stack import start_worker, wait_worker_ready

pytestmark = pytest.mark.integration


def _victim(s, reg, d, man):  # noqa: ANN001, ANN202
    """The account with the most events, its key as the normalizer makes it, and one of
    its raw records (platform, record) to send a later event with."""
    norm = Normalizer(s, reg)
    count: dict[str, int] = {}
    seen: dict[str, tuple[str, str, dict]] = {}  # account → (key, platform, record)
    for p, f in man["files"]["events"].items():
        for off, raw in enumerate(read_records(d / f)):
            rec = json.loads(raw)
            acct = rec.get("account_id")
            if not acct:
                continue
            count[acct] = count.get(acct, 0) + 1
            if acct not in seen:
                out = norm.normalize(raw, topic=f"events.{p}", partition=0, offset=off,
                                     timestamp_ms=None, platform=p)
                if isinstance(out, Interaction):
                    seen[acct] = (out.user, p, rec)
    acct = max(seen, key=count.__getitem__)
    key, p, rec = seen[acct]
    return acct, key, (p, rec)


def test_forget_mid_stream_then_a_crash_leaves_nothing_of_the_user(stack, ns, tmp_path):
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=20000, users=60, malformed=0.0, seed=23), d)
    s = make_settings(stack, ns, platforms_path="", model_enabled=False)
    t, reg = Topics(s), load_platforms("")
    create_all_topics(s)
    acct, victim, (p_raw, raw_rec) = _victim(s, reg, d, man)
    assert user_key(s, reg, account_id=acct) == victim  # --account-id = the normalizer's key
    env = settings_env(s)
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    started = []

    def stats() -> dict[str, int]:
        return {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}

    def consumed() -> int:
        st = stats()
        return st.get("events_applied", 0) + st.get("erased_skipped", 0)

    valid = man["valid_events"]
    try:
        w1 = start_worker(tmp_path, env, name="worker-1")
        started.append(w1)
        wait_worker_ready(stack.redis_url, s.redis_prefix, w1, timeout=90)
        # every event is produced before the erasure (as fast as the client goes); the
        # worker is still working through them when the erasure comes
        rep = Replayer(stack.bootstrap)
        rep.replay([Source(d / f, t.events(p), reg[p])
                    for p, f in man["files"]["events"].items()], progress=False)
        rep.close()
        wait_for(lambda: r.exists(f"{ns}:u:{victim}:stats") and consumed() > 0.1 * valid,
                 timeout=60, what="the victim has state, the stream is under way")
        out = forget_user(s, reg, victim)
        assert out["keys_deleted"] >= 3 and out["keys_left"] == 0
        w1.proc.send_signal(signal.SIGKILL)  # right after the erasure
        w1.proc.wait(10)
        at_kill = consumed()
        w2 = start_worker(tmp_path, env, name="worker-2")
        started.append(w2)
        wait_worker_ready(stack.redis_url, s.redis_prefix, w2, timeout=90)
        assert at_kill < valid, "the erasure was not mid-stream"
        wait_for(lambda: consumed() >= valid, timeout=120, what="every event consumed")
        time.sleep(2)  # redelivered records have arrived
        st = stats()
        assert st.get("erased_skipped", 0) > 0  # the mark stopped the victim's older events
        named = [k for k in r.scan_iter(f"{ns}*", count=5000) if victim in k]
        assert named == [], named
        assert not r.sismember(f"{ns}:users", victim)
        assert r.zscore(f"{ns}:erased", victim) == pytest.approx(out["erased_at"], abs=1e-3)
        for p in reg:
            latest: dict[bytes | None, bytes | None] = {}
            for k, v in read_all(stack.bootstrap, t.recs(p), idle_s=2.0):
                latest[k] = v
            assert latest.get(victim.encode()) is None, p  # a tombstone, or nothing at all
        assert int(r.hget(f"{ns}:stats", "events_applied") or 0) > 0

        # a later event of the same user: a fresh state with that event only
        new = dict(raw_rec, event_id="after-the-erasure-1")
        produce(stack.bootstrap, t.events(p_raw), [json.dumps(new).encode()])
        wait_for(lambda: r.exists(f"{ns}:u:{victim}:stats"), timeout=30,
                 what="the later event applied")
        assert r.hget(f"{ns}:u:{victim}:stats", f"{p_raw}:events") == "1"
        assert r.strlen(f"{ns}:u:{victim}:{p_raw}:ef") == 8  # one event remembered
        assert w2.alive()
    finally:
        for w in started:
            w.stop()
        r.close()


def test_forget_cli_contract_and_identity_options(stack, ns, monkeypatch):
    """The command's last stdout line (--json), the raw-id → key mapping of the normalizer,
    a repeated erasure (harmless) and the clear errors."""
    from xrec.cli import cli

    s = make_settings(stack, ns, platforms_path="")
    create_all_topics(s)
    for k, v in settings_env(s).items():
        monkeypatch.setenv(k, v)
    reg = load_platforms("")
    norm = Normalizer(s, reg)
    raw = json.dumps({"event_id": "x1", "customer_id": "c-42", "sku": "sku-1",
                      "event_type": "purchase", "ts": 1_750_000_000_000}).encode()
    ev = norm.normalize(raw, topic="e", partition=0, offset=0, timestamp_ms=None,
                        platform="shop")
    if isinstance(ev, Interaction):  # the key the normalizer gives c-42 on shop
        assert user_key(s, reg, raw_id="c-42", platform="shop") == ev.user
    key = user_key(s, reg, raw_id="c-42", platform="shop")
    runner = CliRunner()
    for _ in range(2):  # repeating it is harmless
        res = runner.invoke(cli, ["forget", "--raw-id", "c-42", "--platform", "shop", "--json"])
        assert res.exit_code == 0, res.output
        last = json.loads(res.stdout.strip().splitlines()[-1])
        assert list(last) == ["user", "erased_at", "keys_deleted", "keys_left", "tombstones",
                              "control_topic", "erasure_id"]
        assert last["user"] == key and last["keys_left"] == 0
        assert last["tombstones"] == len(reg)
    res = runner.invoke(cli, ["forget", "--raw-id", "c-42"])
    assert res.exit_code == 2 and "--platform" in res.output
    res = runner.invoke(cli, ["forget"])
    assert res.exit_code == 2 and "exactly one" in res.output


def test_recommendations_of_a_batch_applied_before_an_erasure_are_not_cached_after_it(stack, ns):
    """A micro-batch applied just before `xrec forget` caches its recommendations after
    the erasure deleted the user's keys: they must not come back (a returning user's later
    events, produced after the erasure, are cached again)."""
    import asyncio

    from streams.state import RecsOut, RedisState

    s = make_settings(stack, ns, platforms_path="")
    t = Topics(s)
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)

    async def go():  # noqa: ANN202
        st = RedisState.from_settings(s, t.unified)
        try:
            now = time.time()
            await st.forget("victim", now, ["shop"])

            def rec(user, produced):  # noqa: ANN001, ANN202
                return RecsOut(user=user, platform="shop", items=[("i1", 1.0)],
                               scorer="popco", event_time=produced, produced_at=produced,
                               published_at=now, events=1)

            out = [rec("victim", now - 1.0), rec("other", now - 1.0)]  # applied before
            await st.cache([(o, "{}") for o in out])
            before = (r.exists(f"{ns}:recs:shop:victim"), r.exists(f"{ns}:recs:shop:other"))
            await st.cache([(rec("victim", now + 1.0), "{}")])  # the user came back later
            after = r.exists(f"{ns}:recs:shop:victim")
            return before, after
        finally:
            await st.r.aclose()

    before, after = asyncio.run(go())
    assert before == (0, 1)
    assert after == 1
    r.close()
