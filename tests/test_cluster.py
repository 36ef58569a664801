"""Redis Cluster mode of the state (streams/keys.py) against a real cluster (redis-server
``--cluster-enabled yes``, started and stopped by PID here): the same events give the same
state as a single Redis, redeliveries change nothing, a primary killed mid-stream loses
and doubles nothing (with ``XREC_REDIS_WAIT_REPLICAS=1``)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.keys import Keys
from streams.records import Interaction
from streams.settings import Settings
from streams.state import RedisState, is_cluster, redis_from_url
from xrec.stack import RedisClusterProcs, Service, start_redis, start_redis_cluster

T0 = 1_750_000_000.0
TOPIC = "t.events.unified"
PLATFORMS = ("video", "shop")


def make_events(n: int, users: int = 40, items: int = 25, seed: int = 7
                ) -> list[tuple[int, Interaction]]:
    """``n`` (unified partition, event): 3 source partitions, offsets in order, users on
    unified partition crc(user) % 2, event times increasing, a few platform duplicates (same
    event id, new offset)."""
    rnd = random.Random(seed)
    offs = [0, 0, 0]
    out: list[tuple[int, Interaction]] = []
    for k in range(n):
        u = f"u{rnd.randrange(users):03d}"
        p = PLATFORMS[rnd.randrange(2)]
        sp = rnd.randrange(3)
        off = offs[sp]
        offs[sp] += 1
        eid = f"e{k}"
        if k > 10 and rnd.random() < 0.05:  # the platform sent an earlier event again
            prev = out[rnd.randrange(len(out))][1]
            u, p, eid = prev.user, prev.platform, prev.event_id
            item, label = prev.item, prev.label
        else:
            item = f"i{min(int(rnd.expovariate(0.15)), items - 1):02d}"
            label = 1 if rnd.random() < 0.8 else 0
        out.append((int(u[1:]) % 2, Interaction(
            platform=p, user=u, item=item, kind="watch", label=label,
            weight=round(rnd.uniform(0.5, 2.0), 3), event_time=T0 + 10 * k, event_id=eid,
            produced_at=T0 + 10 * k, src_topic="src", src_partition=sp, src_offset=off)))
    return out


def batches(evs: list[Any], size: int) -> list[list[Any]]:
    return [evs[i:i + size] for i in range(0, len(evs), size)]


def settings(url: str, prefix: str, **kw: Any) -> Settings:
    return Settings(env="dev", redis_url=url, redis_prefix=prefix, rec_k=5,
                    cooc_keep=1000, **kw)  # type: ignore[arg-type]


async def user_dump(st: RedisState, users: list[str]) -> dict[str, Any]:
    """Every per-user key's content, by (user, suffix): comparable across modes."""
    k = st.keys
    pipe = st.r.pipeline(transaction=False)
    names: list[tuple[str, str]] = []
    for u in users:
        for suffix, cmd in (("history", "z"), ("stats", "h")):
            names.append((u, suffix))
            _read(pipe, cmd, k.u(u, suffix))
        for p in PLATFORMS:
            for suffix, cmd in (("seen", "z"), ("rpos", "l"), ("ef", "s")):
                names.append((u, f"{p}:{suffix}"))
                _read(pipe, cmd, k.u(u, p, suffix))
    return dict(zip(names, await pipe.execute(), strict=True))


def _read(pipe: Any, cmd: str, key: str) -> None:
    if cmd == "z":
        pipe.zrange(key, 0, -1, withscores=True)
    elif cmd == "l":
        pipe.lrange(key, 0, -1)
    elif cmd == "s":
        pipe.get(key)
    else:
        pipe.hgetall(key)


async def agg_dump(st: RedisState) -> dict[str, Any]:
    """Merged popularity rows and co-occurrence rows of every item, and the users."""
    out: dict[str, Any] = {"users": sorted(await st.users())}
    for p in PLATFORMS:
        out[f"pop:{p}"] = await st.popular(p, 1000)
        for i in range(30):
            out[f"co:{p}:i{i:02d}"] = await st.neighbours(p, f"i{i:02d}", 1000)
    stats = await st.stats()
    out["stats"] = {k: stats.get(k, 0) for k in ("events_applied", "duplicates_offset",
                                                 "duplicates_event", "recommendations")}
    return out


def assert_rows_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith(("pop:", "co:")):
            ra, rb = dict(a[key]), dict(b[key])
            assert ra.keys() == rb.keys(), key
            for item in ra:
                assert math.isclose(ra[item], rb[item], rel_tol=1e-9), (key, item)
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def single_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_redis(tmp_path_factory.mktemp("single"))
    try:
        yield svc
    finally:
        svc.stop()


def test_cluster_client_and_layout(redis_cluster: RedisClusterProcs) -> None:
    s = settings(redis_cluster.url, "x:")
    r = redis_from_url(s.redis_url or "")
    st = RedisState(r, s, TOPIC)
    assert is_cluster(r) and st.cluster and st.keys.shards == 16
    # every key of a user and of its shard is in the shard's slot
    k = st.keys
    sh = k.shard("abc")
    slot = r.keyslot(k.u("abc", "history"))
    assert {r.keyslot(x) for x in (k.u("abc", "video", "seen"), k.wm(sh, "0", TOPIC, 3),
                                   k.pop(sh, "video"), k.co(sh, "video", "i1"),
                                   k.users(sh), k.stats(sh), k.recs("video", "abc"))} == {slot}
    assert r.keyslot(k.dlwm("0")) == r.keyslot(k.dlstats())
    # single mode: today's names
    k1 = Keys("x:")
    assert (k1.u("abc", "video", "seen"), k1.wm(0, "0", TOPIC, 3), k1.pop(0, "video"),
            k1.dlwm("0")) == ("x:u:abc:video:seen", f"x:wm:0:{TOPIC}:3", "x:pop:video",
                              "x:dlwm:0")
    asyncio.run(r.aclose())


def test_cluster_equals_single_and_redelivery_is_skipped(
        redis_cluster: RedisClusterProcs, single_redis: Service) -> None:
    evs = make_events(400)
    users = sorted({e.user for _, e in evs})

    async def run(url: str, prefix: str) -> tuple[Any, ...]:
        s = settings(url, prefix)
        st = RedisState(redis_from_url(url), s, TOPIC)
        results, recs = [], []
        for b in batches(evs, 37):
            res = await st.apply(b, history=8, prefetch=(PLATFORMS, [(p, "i01")
                                                                    for p in PLATFORMS]))
            results.append((res.applied, res.dup_offset, res.dup_event,
                            [(e.event_id, h) for e, h in res.applied_events],
                            res.history,
                            {k: (t.recent_pos, t.seen_before) for k, t in res.touched.items()}))
            out = await st.recommend(res.touched)
            recs.append({(o.user, o.platform): o.items for o in out})
            await st.cache([(o, o.model_dump_json()) for o in out])
        dump = await user_dump(st, users)
        agg = await agg_dump(st)
        rows = {p: [(i, v) for i, v in zip(st.agg_pop[p].items, st.agg_pop[p].vals,
                                           strict=True)] for p in PLATFORMS}
        # redelivery: every batch again (same offsets), then a batch half old, half new
        again = [await st.apply(b) for b in batches(evs, 53)]
        dump2, agg2 = await user_dump(st, users), await agg_dump(st)
        cached = await st.r.get(st.keys.recs(evs[-1][1].platform, evs[-1][1].user))
        await st.r.aclose()
        return results, recs, dump, agg, rows, again, dump2, agg2, cached

    single = asyncio.run(run(single_redis.url, "s:"))
    cluster = asyncio.run(run(redis_cluster.url, "c:"))
    assert sum(r[0] for r in single[0]) > 300  # most events applied
    # per-batch answers (applied/dups, histories, recent positives) are the same
    assert single[0] == cluster[0]
    assert single[2] == cluster[2]  # per-user state, key by key
    assert_rows_close(single[3], cluster[3])  # merged popularity / co-occurrence / users
    for p in PLATFORMS:  # the hybrid's prefetched rows
        assert [i for i, _ in single[4][p]] == [i for i, _ in cluster[4][p]]
    for a, b in zip(single[1], cluster[1], strict=True):  # recommendations
        assert a.keys() == b.keys()
        for key in a:
            assert [i for i, _ in a[key]] == [i for i, _ in b[key]], key
    def _rec(raw: str) -> dict[str, Any]:
        d = json.loads(raw)
        d.pop("published_at")
        return d

    assert cluster[8] is not None and _rec(cluster[8]) == _rec(single[8])
    # redelivery applied nothing
    for st in (single, cluster):
        assert all(r.applied == 0 and r.dup_offset == len(b)
                   for r, b in zip(st[5], batches(evs, 53), strict=True))
        assert st[6] == st[2]
        agg_before = {k: v for k, v in st[3].items() if k != "stats"}
        assert {k: v for k, v in st[7].items() if k != "stats"} == agg_before


def _kill_primary_of(cl: RedisClusterProcs, key_slot: int) -> tuple[int, int]:
    """SIGKILL (by PID) the primary that serves ``key_slot``; its (index, port)."""
    import redis as redis_sync

    r = redis_sync.Redis(port=cl.ports[0], decode_responses=True, socket_timeout=2)
    try:
        for lo, hi, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
            if lo <= key_slot <= hi:
                port = int(primary[1])
                break
        else:
            raise AssertionError("slot not served")
    finally:
        r.close()
    idx = cl.ports.index(port)
    os.kill(cl.services[idx].pid, signal.SIGKILL)
    cl.services[idx].proc.wait(5)
    return idx, port


def _restart_node(cl: RedisClusterProcs, idx: int) -> None:
    """Start the killed node again on its folder (it rejoins as a replica of its old
    shard's new primary, from its nodes.conf)."""
    from xrec.stack import _popen, redis_binary

    port = cl.ports[idx]
    d = cl.workdir / f"node{port}"
    old = cl.services[idx]
    argv = [str(redis_binary()), "--port", str(port), "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no",
            "--dir", str(d), "--daemonize", "no"]
    proc, log_path, fh = _popen(f"redis-{port}-2", argv, d)
    cl.services[idx] = Service(old.name, proc, old.url, log_path, fh)


@pytest.mark.parametrize("wait", [1, 0])
def test_primary_killed_mid_stream(tmp_path: Path, single_redis: Service, wait: int) -> None:
    """3 primaries + 3 replicas; a primary is SIGKILLed after a third of the batches and
    restarted (as a replica) 3 s later; the applier retries through the failover. With
    WAIT 1 the end state equals the single-Redis reference exactly. Without WAIT an
    acknowledged write may be lost with the primary (replication is asynchronous): then
    events are missing, never doubled (the script's writes replicate as one transaction,
    watermark and state together)."""
    evs = make_events(600, seed=11)
    users = sorted({e.user for _, e in evs})
    cl = start_redis_cluster(tmp_path, primaries=3, replicas=1, node_timeout_ms=1000)
    try:
        async def reference() -> tuple[Any, Any]:
            st = RedisState(redis_from_url(single_redis.url),
                            settings(single_redis.url, f"ref{wait}:"), TOPIC)
            for b in batches(evs, 20):
                await st.apply(b)
            out = await user_dump(st, users), await agg_dump(st)
            await st.r.aclose()
            return out

        async def clustered() -> tuple[Any, Any, dict[str, Any]]:
            s = settings(cl.url, "f:", redis_wait_replicas=wait, redis_wait_timeout_ms=500,
                         redis_timeout_s=1.0)
            st = RedisState(redis_from_url(cl.url, 1.0), s, TOPIC)
            errors = []
            st.on_error = lambda: errors.append(time.monotonic())
            bs = batches(evs, 20)
            info: dict[str, Any] = {}
            loop = asyncio.get_running_loop()

            def restart() -> None:  # while the applier waits: WAIT 1 needs a replica
                _restart_node(cl, info["killed"][0])
                info["restarted"] = True

            t0 = time.monotonic()
            for n, b in enumerate(bs):
                if n == len(bs) // 3:
                    slot = st.r.keyslot(st.keys.stats(st.keys.shard(b[0][1].user)))
                    info["killed"] = _kill_primary_of(cl, slot)
                    loop.call_later(3.0, restart)
                t = time.monotonic()
                await st.apply(b)
                info["max_apply_s"] = round(max(info.get("max_apply_s", 0),
                                                time.monotonic() - t), 2)
            while "restarted" not in info:
                await asyncio.sleep(0.1)
            info["total_s"] = round(time.monotonic() - t0, 2)
            info["retried_errors"] = len(errors)
            out = await user_dump(st, users), await agg_dump(st), info
            await st.r.aclose()
            return out

        ref_dump, ref_agg = asyncio.run(reference())
        got_dump, got_agg, info = asyncio.run(clustered())
    finally:
        cl.stop()
    print(f"failover (WAIT {wait}): {info}")
    # the kill was felt: retried by us, or inside redis-py (its own retries, a slow apply)
    assert info["retried_errors"] > 0 or info["max_apply_s"] > 0.5
    lost = {k for k in ref_dump if ref_dump[k] != got_dump[k]}
    for k in lost:  # never doubled: each differing key is a prefix of the reference
        assert len(got_dump[k]) <= len(ref_dump[k]), k
    assert got_agg["stats"]["events_applied"] <= ref_agg["stats"]["events_applied"]
    if wait:
        assert not lost
        assert got_agg["stats"]["events_applied"] == ref_agg["stats"]["events_applied"]
        ref_agg.pop("stats"), got_agg.pop("stats")  # retries count duplicates on purpose
        assert_rows_close(ref_agg, got_agg)
    elif lost:
        print(f"without WAIT, lost at failover: {len(lost)} keys, "
              f"{ref_agg['stats']['events_applied'] - got_agg['stats']['events_applied']}"
              " events")


def test_readers_and_single_writer_keys_on_a_cluster(redis_cluster: RedisClusterProcs) -> None:
    """The read API (cache hit, popular fallback, unknown user), head versions (MULTI and
    lease scripts: one slot) and item vectors (MULTI per platform) work on a cluster."""
    import numpy as np

    from streams.agents.api import RecsReader
    from streams.heads import HeadRegistry
    from streams.vectors import VectorStore

    url = redis_cluster.url
    evs = make_events(120, seed=3)

    async def go() -> None:
        st = RedisState(redis_from_url(url), settings(url, "api:"), TOPIC)
        res = await st.apply(evs)
        out = await st.recommend(res.touched)
        await st.cache([(o, o.model_dump_json()) for o in out])
        reader = RecsReader(st.r, "api:")
        o = out[0]
        status, body = await reader.read(o.user, o.platform, 3, False)
        assert status == 200 and json.loads(body)["items"] == [
            {"item": i, "score": sc} for i, sc in o.items[:3]]
        await st.r.delete(st.keys.recs(o.platform, o.user))
        status, fb = await reader.read(o.user, o.platform, 3, False)
        assert status == 200 and fb["fallback"] == "popular"  # type: ignore[index]
        seen = set((await st.seen([(o.user, o.platform)]))[(o.user, o.platform)])
        top = [i for i, _ in await st.popular(o.platform, 100) if i not in seen][:3]
        assert [x["item"] for x in fb["items"]] == top  # type: ignore[index]
        assert (await reader.read("nobody", "video", 3, False))[0] == 404
        # dead letters: counted once (watermark and counters in the {dl} slot)
        assert await st.count_deadletter("src", 0, 5, "bad_json")
        assert not await st.count_deadletter("src", 0, 5, "bad_json")
        stats = await st.stats()
        assert stats["deadlettered"] == 1 and stats["events_applied"] > 100
        await st.r.aclose()

        reg = HeadRegistry(url, "api:")
        assert await reg.lease("tok")  # acquired (the lease script: one slot)
        v = await reg.publish(b"blob", {"a": 1}, token="tok")
        assert v == await reg.version() == 1
        assert (await reg.latest())[:2] == (1, b"blob")
        await reg.r.aclose()

        vs = VectorStore(url, "api:", "enc", 4)
        await vs.put("video", ["a", "b"], np.ones((2, 4), np.float32))
        await vs.put("shop", ["c"], np.ones((1, 4), np.float32))
        vs2 = VectorStore(url, "api:", "enc", 4)
        assert await vs2.refresh(["video", "shop"]) == 2
        await vs.r.aclose()
        await vs2.r.aclose()

    asyncio.run(go())
