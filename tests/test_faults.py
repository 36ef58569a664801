"""Faults on the real broker and Redis: a worker killed (SIGKILL) or stopped (SIGTERM) in the
middle of a replay, then restarted: every valid event is applied exactly once, the bad
ones are dead-lettered, and SIGTERM stops the worker within a bound. Redis or the broker
paused (SIGSTOP) for 6 s mid-stream: the worker waits, resumes, and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis as redis_sync

from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.platforms import load_platforms
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings
from tests.test_pipeline import state_dump, wait_for

pytestmark = pytest.mark.integration


def applied(r, ns) -> int:
    return int(r.hget(f"{ns}:stats", "events_applied") or 0)


def start_and_replay(stack, ns, worker_factory, d, man, **kw):
    """A worker without the model (this is about the state guarantees: faster restarts,
    same code path) on this test's topics; the simulated events replayed at 1,500/s.
    Returns (settings, worker, Redis client)."""
    url = kw.get("redis_url", stack.redis_url)
    s = make_settings(stack, ns, platforms_path="", model_enabled=False, **kw)
    t = Topics(s)
    reg = load_platforms("")
    create_all_topics(s)
    w = worker_factory(s)
    r = redis_sync.Redis.from_url(url, decode_responses=True)
    rep = Replayer(stack.bootstrap)
    rep.replay([Source(d / f, t.events(p), reg[p]) for p, f in man["files"]["events"].items()],
               rate=1500, progress=False)
    rep.close()
    return s, w, r


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_worker_stopped_mid_replay_loses_nothing_and_applies_nothing_twice(
        stack, ns, worker_factory, tmp_path, sig):
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=3000, users=80, malformed=0.02, seed=21), d)
    s, w, r = start_and_replay(stack, ns, worker_factory, d, man)
    wait_for(lambda: applied(r, ns) >= 600, what="some events applied")
    assert applied(r, ns) < man["valid_events"]  # stopped mid-stream
    t0 = time.monotonic()
    w.proc.send_signal(sig)
    w.proc.wait(30)
    stop_s = time.monotonic() - t0
    if sig == signal.SIGTERM:
        assert stop_s < 15, f"SIGTERM took {stop_s:.1f}s"  # XREC_SHUTDOWN_TIMEOUT_S = 10
        assert w.proc.returncode in (0, 143, -signal.SIGTERM)
    worker_factory(s, name="restarted")
    wait_for(lambda: applied(r, ns) >= man["valid_events"], timeout=120,
             what="every event applied after the restart")
    time.sleep(2)  # anything redelivered has arrived by now
    st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
    assert st["events_applied"] == man["valid_events"]  # none lost, none applied twice
    # every bad event counted once, though a crash may have published its dead letter twice
    assert st["deadlettered"] == sum(man["deadletter_expected"].values())
    if sig == signal.SIGTERM and w.proc.returncode != 143:  # 143: the deadline, not graceful
        # the graceful stop committed what it had applied: nothing comes back
        assert st["duplicates_offset"] == 0

    # the state equals that of an uninterrupted run over the same events
    s2 = make_settings(stack, ns + "b", platforms_path="", model_enabled=False,
                       topic_prefix=f"{ns}.", app_id=f"{ns}-clean")
    worker_factory(s2, name="clean")
    wait_for(lambda: applied(r, ns + "b") >= man["valid_events"], timeout=120,
             what="the uninterrupted run")
    time.sleep(1)

    def norm(dump, prefix):
        return {k[len(prefix):]: v for k, v in dump.items()
                if not k[len(prefix):].startswith(("wm:", "co:"))}

    a = norm(state_dump(stack.redis_url, f"{ns}:"), f"{ns}:")
    b = norm(state_dump(stack.redis_url, f"{ns}b:"), f"{ns}b:")
    users = {k for k in a if k.startswith("u:") and k.endswith(":ef")}
    assert users and users == {k for k in b if k.startswith("u:") and k.endswith(":ef")}
    for k in users:
        assert a[k] == b[k], k  # every user's applied event ids: exactly the same, in order


def _get(port: int, path: str) -> tuple[int, str]:
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name)] in " {"))


@pytest.mark.parametrize("victim", ["redis", "broker"])
def test_redis_or_broker_paused_mid_replay_then_resumed(stack, ns, worker_factory, tmp_path,
                                                         victim):
    """SIGSTOP (unreachable, connections hang), then SIGCONT: the worker waits instead of
    dropping or crashing, resumes, and applies every event exactly once. A Redis outage
    longer than the stall bound shows on /healthz (503, the stalled agent) and in /metrics
    (Redis errors, the stall), and clears when Redis is back."""
    from streams.watchdog import Watchdog  # noqa: F401 - the module the worker reports from
    from xrec.stack import free_port, start_redis

    d = tmp_path / "sim"
    man = simulate(SimConfig(events=2500, users=80, seed=23), d)
    redis_svc = start_redis(tmp_path) if victim == "redis" else None
    port = free_port()
    try:
        url = redis_svc.url if redis_svc else stack.redis_url
        s = make_settings(stack, ns, platforms_path="", model_enabled=False, redis_url=url,
                          web_port=port, stall_after_s=4.0, redis_timeout_s=1.0)
        t = Topics(s)
        reg = load_platforms("")
        create_all_topics(s)
        w = worker_factory(s)
        r = redis_sync.Redis.from_url(url, decode_responses=True)
        rep = Replayer(stack.bootstrap)
        sources = [Source(d / f, t.events(p), reg[p]) for p, f in man["files"]["events"].items()]
        rep.replay(sources[:1], progress=False)
        wait_for(lambda: applied(r, ns) >= 300, what="some events applied")
        pid = redis_svc.pid if redis_svc is not None else stack.services[0].pid  # Tansu
        seen_stall: dict = {}
        os.kill(pid, signal.SIGSTOP)
        try:
            if victim == "redis":
                rep.replay(sources[1:2], progress=False)  # input keeps arriving
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not seen_stall:
                    code, body = _get(port, "/healthz")
                    if code == 503 and json.loads(body)["stalled"]:
                        seen_stall = {"code": code, **json.loads(body)}
                    time.sleep(0.5)
                _, text = _get(port, "/metrics")
                seen_stall["metrics"] = text
            else:
                time.sleep(6)
            assert w.alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        if victim == "redis":
            assert seen_stall.get("code") == 503, "no stall reported within 30 s"
            assert "recommend" in seen_stall["stalled"] or "normalize" in seen_stall["stalled"]
            assert seen_stall["live"] is True
            text = seen_stall["metrics"]
            assert _metric(text, "xrec_redis_errors_total") > 0  # timeouts, counted
            assert _metric(text, "xrec_agent_stalled") >= 1
            assert _metric(text, "xrec_stalls_total") >= 1
        rep.replay(sources[1:] if victim == "broker" else sources[2:], progress=False)
        rep.close()
        wait_for(lambda: applied(r, ns) >= man["valid_events"], timeout=120,
                 what="every event applied after the pause")
        time.sleep(1)
        st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        assert st["events_applied"] == man["valid_events"]
        assert w.alive()  # waited through the pause: no crash, nothing dropped
        # the stall clears once the agents complete work again
        wait_for(lambda: _get(port, "/healthz")[0] == 200, timeout=30,
                 what="/healthz back to 200")
        text = _get(port, "/metrics")[1]
        assert _metric(text, "xrec_agent_stalled") == 0
    finally:
        if redis_svc is not None:
            redis_svc.stop()


def test_redis_killed_and_restarted_mid_replay(stack, ns, worker_factory, tmp_path):
    """Redis (durable: append-only file, fsync always) SIGKILLed mid-stream and restarted
    3 s later on the same port and files: the worker retries through the refused
    connections, resumes, and every event is applied exactly once."""
    from xrec.stack import start_redis

    d = tmp_path / "sim"
    man = simulate(SimConfig(events=2500, users=80, malformed=0.02, seed=29), d)
    rdir = tmp_path / "redis"
    rs = start_redis(rdir, durable=True)
    port = int(rs.url.rsplit(":", 1)[1].split("/")[0])
    try:
        _, w, r = start_and_replay(stack, ns, worker_factory, d, man, redis_url=rs.url,
                                   redis_timeout_s=1.0)
        wait_for(lambda: applied(r, ns) >= 500, what="some events applied")
        before = applied(r, ns)
        assert before < man["valid_events"]
        rs.proc.kill()
        rs.proc.wait(10)
        rs.stop()
        time.sleep(3)
        assert w.alive()
        rs = start_redis(rdir, port=port, durable=True)
        assert applied(r, ns) >= before  # nothing acknowledged was lost
        wait_for(lambda: applied(r, ns) >= man["valid_events"], timeout=120,
                 what="every event applied after the restart")
        time.sleep(1)
        st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        assert st["events_applied"] == man["valid_events"]
        assert st["duplicates_event"] == man["duplicates"]
        assert w.alive()
        assert "redis unavailable during" in w.log_path.read_text()  # visible in the log
    finally:
        rs.stop()


def test_worker_killed_while_training_heads_stay_monotonic_and_loadable(stack, ns,
                                                                        worker_factory, tmp_path):
    """The learned model on: a worker SIGKILLed after a few head versions, then restarted.
    Training examples are redone, never the model corrupted: versions on the heads topic
    strictly increase across the crash, the stored weights load and are finite, and the
    restarted worker keeps publishing newer versions."""
    import threading

    from models.heads import load_model
    from tests.kafka_util import read_all

    d = tmp_path / "sim"
    man = simulate(SimConfig(events=5000, users=60, seed=31), d)  # 12.5 s at 400/s
    s = make_settings(stack, ns, platforms_path="")
    t = Topics(s)
    reg = load_platforms("")
    create_all_topics(s)
    w = worker_factory(s)
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)

    def version() -> int:
        return int(r.get(f"{ns}:heads:version") or 0)

    rep = Replayer(stack.bootstrap)
    rep.replay([Source(d / f, t.catalog(p)) for p, f in man["files"]["catalog"].items()],
               progress=False)
    wait_for(lambda: int(r.hget(f"{ns}:stats", "catalog_encoded") or 0)
             >= sum(man["items"].values()), what="catalog encoded")
    sender = threading.Thread(target=rep.replay, daemon=True, kwargs={
        "sources": [Source(d / f, t.events(p), reg[p])
                    for p, f in man["files"]["events"].items()],
        "rate": 400, "progress": False})
    sender.start()
    wait_for(lambda: version() >= 2, timeout=120, what="a few head versions")
    w.proc.kill()
    assert w.proc.wait(10) == -signal.SIGKILL
    killed_at = version()
    assert applied(r, ns) < man["valid_events"]  # mid-stream
    sender.join()
    rep.close()
    worker_factory(s, name="restarted")
    wait_for(lambda: applied(r, ns) >= man["valid_events"], timeout=180,
             what="every event applied after the restart")
    wait_for(lambda: version() > killed_at, timeout=60, what="a head version after the crash")
    last = [-1, time.monotonic()]

    def settled() -> bool:  # no new version for 3 s: the trainer has caught up
        v = version()
        if v != last[0]:
            last[:] = [v, time.monotonic()]
        return time.monotonic() - last[1] > 3

    wait_for(settled, timeout=120, what="training to settle")
    versions = [json.loads(v)["version"] for _, v in read_all(stack.bootstrap, t.heads)]
    assert versions == sorted(set(versions))  # strictly increasing across the crash
    assert versions[-1] == version() and versions[-1] > killed_at
    m = load_model(redis_sync.Redis.from_url(stack.redis_url).get(f"{ns}:heads:blob"))
    assert all(bool(p.isfinite().all()) for p in m.parameters())
    assert applied(r, ns) == man["valid_events"]
