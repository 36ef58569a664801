"""State in a real Redis: idempotent micro-batches, duplicates, exclusions, decay."""

import asyncio

import pytest
import redis as redis_sync

from streams.records import Interaction, Recommendations
from streams.state import RedisState, redis_from_url
from tests.conftest import make_settings, redis_dump

T0 = 1_750_000_000.0


def ev(user, item, off, *, platform="video", label=1, weight=1.0, t=None, eid=None, src="s:0",
       q=0):
    topic, part = src.split(":")
    return q, Interaction(platform=platform, user=user, item=item, kind="watch", label=label,
                          weight=weight, event_time=t if t is not None else T0 + off,
                          event_id=eid or f"e{src}{off}", produced_at=T0 + off, src_topic=topic,
                          src_partition=int(part), src_offset=off)


def dump(url, prefix):
    # the global counters count duplicates on purpose
    return redis_dump(url, prefix, skip=lambda rest: rest == ":stats")


@pytest.fixture
def state(stack, ns):
    s = make_settings(stack, ns, rec_k=5)
    st = RedisState(redis_from_url(stack.redis_url), s, f"{ns}.events.unified")
    return st


def run(coro):
    return asyncio.run(coro)


def test_redelivered_batch_changes_nothing(state, stack, ns):
    batch = [ev("u1", "a", 0), ev("u1", "b", 1), ev("u2", "a", 2), ev("u2", "c", 3, label=0)]

    async def go():
        r1 = await state.apply(batch)
        before = dump(stack.redis_url, ns)
        r2 = await state.apply(batch)
        return r1, before, r2

    r1, before, r2 = run(go())
    assert (r1.applied, r1.dup_offset, r1.dup_event) == (4, 0, 0)
    assert (r2.applied, r2.dup_offset, r2.dup_event) == (0, 4, 0)
    assert dump(stack.redis_url, ns) == before
    assert before[f"{ns}:u:u1:video:seen"] == [("a", T0), ("b", T0 + 1)]
    assert before[f"{ns}:u:u2:stats"]["video:neg"] == "1"


def test_renormalized_duplicate_and_duplicate_event_id_are_skipped(state):
    async def go():
        await state.apply([ev("u1", "a", 5)])
        # normalize crashed before committing: same source offset, new unified record
        r = await state.apply([ev("u1", "a", 5)])
        assert (r.applied, r.dup_offset) == (0, 1)
        # the platform sent the same event twice: same event id, new source offset
        r = await state.apply([ev("u1", "a", 6, eid="es:05")])
        assert (r.applied, r.dup_event) == (0, 1)
        # a new event is applied; watermarks are per (unified partition, source partition)
        r = await state.apply([ev("u1", "b", 7), ev("u3", "b", 1, src="s:1", q=1)])
        assert r.applied == 2
        return await state.stats()

    st = run(go())
    assert st["events_applied"] == 3 and st["duplicates_offset"] == 1
    assert st["duplicates_event"] == 1


def test_recommendations_exclude_consumed_items_and_use_cooccurrence(state):
    async def go():
        # u1 and u2 both like a then b; u3 likes a: b co-occurs with a
        batch = [ev("u1", "a", 0), ev("u1", "b", 1), ev("u2", "a", 2), ev("u2", "b", 3),
                 ev("u2", "c", 4), ev("u2", "d", 5), ev("u2", "e", 6), ev("u3", "a", 7)]
        await state.apply(batch)
        await asyncio.sleep(1.1)  # let the 1 s aggregate cache expire
        res = await state.apply([ev("u3", "z", 8, label=0)])
        return await state.recommend(res.touched)

    (out,) = run(go())
    rec = Recommendations.model_validate_json(out.model_dump_json())  # what consumers read
    items = [r.item for r in rec.items]
    assert rec.user == "u3" and rec.platform == "video" and rec.scorer == "popco-1"
    assert "a" not in items and "z" not in items  # consumed, positive or negative
    assert items[0] == "b"  # co-occurs with a, u3's last positive
    assert set(items) == {"b", "c", "d", "e"}
    assert [r.score for r in rec.items] == sorted((r.score for r in rec.items), reverse=True)
    # the reasons: b, c, d, e co-occur with a, u3's only positive (a is u3's own history)
    n = state.s.explain_top
    assert all(r.why is not None for r in rec.items[:n])
    assert all(r.why is None for r in rec.items[n:])
    assert rec.items[0].why.kind == "cooccurrence"
    assert [(e.platform, e.item) for e in rec.items[0].why.evidence] == [("video", "a")]


def test_cold_user_on_a_platform_gets_popular_items(state):
    async def go():
        await state.apply([ev("u1", "hit", 0), ev("u2", "hit", 1), ev("u2", "meh", 2)])
        res = await state.apply([ev("newbie", "x", 0, label=0, platform="shop", src="s:9")])
        res.touched[("newbie", "video")] = res.touched.pop(("newbie", "shop"))
        res.touched[("newbie", "video")].recent_pos = []
        return await state.recommend(res.touched)

    (out,) = run(go())
    rec = Recommendations.model_validate_json(out.model_dump_json())
    assert [r.item for r in rec.items] == ["hit", "meh"]
    assert [r.why.kind for r in rec.items] == ["popular", "popular"]  # no history to cite
    assert rec.items[0].why.platform == "video"


def test_popularity_decays_and_rebases_without_overflow(state, stack, ns):
    hl = state.s.popularity_half_life_s
    async def go():
        await state.apply([ev("u1", "old", 0, t=T0)] * 1 + [ev("u2", "old", 1, t=T0)])
        # 300 half-lives later: the anchor must be rebased (2^300 would be huge)
        await state.apply([ev("u3", "new", 2, t=T0 + 300 * hl)])
        await asyncio.sleep(1.1)
        return await state._popular("video")

    lst, _ = run(go())
    assert [i for i, _ in lst] == ["new", "old"]
    assert lst[0][1] == pytest.approx(1.0) and lst[1][1] < 1e-80
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    assert float(r.hget(f"{ns}:popmeta:video", "anchor")) == pytest.approx(T0 + 300 * hl)


def test_history_is_ordered_by_event_time_whatever_the_platform_interleaving(stack, ns):
    """A user's platforms arrive through different source partitions, in an order no one
    controls: the cross-platform history the model reads (and the state) must not depend
    on it. The newest XREC_HIST_LEN by event time are kept."""
    vids = [ev("u1", f"v{i}", i, t=T0 + 2 * i, src="v:0") for i in range(4)]
    songs = [ev("u1", f"m{i}", i, platform="music", t=T0 + 2 * i + 1, src="m:0")
             for i in range(4)]
    orders = {"video first": [vids, songs], "music first": [songs, vids],
              # each source partition keeps its order; the platforms interleave freely
              "mixed": [[songs[0], songs[1]], [vids[0], vids[1], vids[2], songs[2]],
                        [songs[3], vids[3]]]}
    dumps = {}
    for k, (name, batches) in enumerate(orders.items()):
        s = make_settings(stack, f"{ns}{k}", hist_len=5)
        st = RedisState(redis_from_url(stack.redis_url), s, "unified")

        async def go(st=st, batches=batches):
            for b in batches:
                await st.apply(b, history=5)
            return await st.history(["u1"], 10)

        hist = run(go())["u1"]
        assert [h[1] for h in hist] == ["m3", "v3", "m2", "v2", "m1"], name  # newest 5
        dumps[name] = {key.split(":", 1)[1]: v for key, v in redis_dump(
            stack.redis_url, f"{ns}{k}:", skip=lambda rest: rest.startswith(
                ("stats", "wm:", "co:", "pop"))).items()}
    assert dumps["video first"] == dumps["music first"] == dumps["mixed"]


def test_dead_letters_are_counted_once_per_source_record(state):
    async def go():
        got = [await state.count_deadletter("events.video", 1, 7, "schema"),
               await state.count_deadletter("events.video", 1, 7, "schema"),  # redelivered
               await state.count_deadletter("events.video", 0, 7, "too_deep"),
               await state.count_deadletter("events.video", 1, 5, "schema"),  # before: seen
               await state.count_deadletter("events.video", 1, 9, "invalid_json")]
        return got, await state.stats()

    got, st = run(go())
    assert got == [True, False, True, False, True]
    assert st["deadlettered"] == 3
    assert (st["deadletter:schema"], st["deadletter:too_deep"], st["deadletter:invalid_json"]) \
        == (1, 1, 1)


def test_one_batch_or_one_event_at_a_time_leave_the_same_state(stack, ns):
    """The script reads each key once per batch and gathers its writes to the end: the end
    state must be what applying the same events one by one leaves (duplicates inside the
    batch included)."""
    evs = []
    for n in range(72):
        u, p = f"u{n % 3}", ("video", "music")[(n // 3) % 2]
        evs.append(ev(u, f"i{(n * 7) % 5}", n, platform=p, label=int(n % 4 != 3),
                      weight=1.0 + n % 3, t=T0 + n * 0.25, src=f"{p}:0"))
    evs.insert(10, evs[4])  # the same record twice (redelivered inside the batch)
    p7 = evs[70][1].platform  # a re-sent event id, among the last 10 of its (user, platform)
    evs.append(ev(evs[70][1].user, "i9", 99, platform=p7, eid=evs[70][1].event_id,
                  src=f"{p7}:0"))
    got = {}
    for name, batches in (("whole", [evs]), ("one by one", [[e] for e in evs]),
                          ("in threes", [evs[i:i + 3] for i in range(0, len(evs), 3)])):
        s = make_settings(stack, f"{ns}{name[0]}", hist_len=8, seen_len=3, eid_keep=10)
        st = RedisState(redis_from_url(stack.redis_url), s, "unified")

        async def go(st=st, batches=batches):
            return [await st.apply(b, history=8) for b in batches]

        res = run(go())
        assert sum(r.applied for r in res) == 72 and sum(r.dup_offset for r in res) == 1
        assert sum(r.dup_event for r in res) == 1
        got[name] = {k.split(":", 1)[1]: v for k, v in redis_dump(
            stack.redis_url, f"{ns}{name[0]}:", skip=lambda rest: rest.startswith(
                ("co:", "pop"))).items()}
    assert got["whole"] == got["one by one"] == got["in threes"]
    assert any(k.endswith(":ef") for k in got["whole"])


def test_deferred_aggregates_fold_exactly_once_and_in_order(stack, ns):
    """``apply(defer_aggregates=True)`` (the serving worker): popularity and co-occurrence
    end exactly where folding inside the script leaves them, when a deferred fold never
    runs (a worker killed after its apply: the next apply folds the queue first) and when
    a batch is redelivered (its increments are not queued twice)."""
    evs = [ev(f"u{n % 4}", f"i{(n * 5) % 7}", n, platform=("video", "music")[n % 2],
              label=int(n % 5 != 4), weight=1.0 + n % 3, t=T0 + n, src=f"s:{n % 2}")
           for n in range(60)]
    batches = [evs[i:i + 4] for i in range(0, len(evs), 4)]
    got = {}
    for name in ("inline", "deferred"):
        s = make_settings(stack, f"{ns}{name}", hist_len=8)
        st = RedisState(redis_from_url(stack.redis_url), s, "unified")
        defer = name == "deferred"

        async def go(st=st, defer=defer):
            real_fold = st._fold
            for n, b in enumerate(batches):
                if defer and n % 3 == 1:  # killed before its fold: nothing folds it now
                    async def lost(shards):
                        return None
                    st._fold = lost
                r = await st.apply(b, history=8, defer_aggregates=defer)
                st._fold = real_fold
                assert r.applied == len(b)
                if n == 5:  # redelivered: nothing applied, nothing queued again
                    again = await st.apply(b, history=8, defer_aggregates=defer)
                    assert again.applied == 0 and again.dup_offset == len(b)
            await st.fold()

        run(go())
        got[name] = {k.split(":", 1)[1]: v for k, v in redis_dump(
            stack.redis_url, f"{ns}{name}:", skip=lambda rest: not rest.startswith(
                ("co:", "pop", "aggq"))).items()}
    assert got["inline"] == got["deferred"]
    assert any(k.startswith("co:") for k in got["inline"])
    assert not any(k.startswith("aggq") for k in got["deferred"])


def test_user_state_stays_compact_and_remembers_the_last_event_ids(stack, ns):
    """Realistic ids (32-hex user keys, 24-hex event ids): history and seen items keep
    Redis's compact encoding; each applied event costs 8 bytes of fingerprint; an event id
    older than the last XREC_EID_KEEP of its platform is no longer recognised."""
    s = make_settings(stack, ns, eid_keep=20)
    st = RedisState(redis_from_url(stack.redis_url), s, "unified")
    u = "ab" * 16
    evs = [ev(u, f"sku-{n:06d}", n, platform="shop", eid=f"{n:024x}", src="shop:0")
           for n in range(30)]

    async def go():
        await st.apply(evs, history=50)
        early = await st.apply([ev(u, "sku-x", 40, platform="shop", eid=f"{2:024x}",
                                   src="shop:0")])
        late = await st.apply([ev(u, "sku-y", 41, platform="shop", eid=f"{29:024x}",
                                  src="shop:0")])
        return early, late

    early, late = run(go())
    assert early.applied == 1  # id 2 fell out of the last 20: applied again (documented)
    assert late.applied == 0 and late.dup_event == 1
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        for key in (f"{ns}:u:{u}:history", f"{ns}:u:{u}:shop:seen"):
            assert r.object("encoding", key) in ("ziplist", "listpack"), key
        assert r.strlen(f"{ns}:u:{u}:shop:ef") == 20 * 8
        assert max(len(m) for m in r.zrange(f"{ns}:u:{u}:history", 0, -1)) < 64
    finally:
        r.close()


def test_an_event_arriving_after_a_later_one_of_its_partition_is_still_applied(stack, ns):
    """The watermark assumes a source partition's events arrive in offset order. When one
    arrives after a later one (a produce failed and was repeated upstream), it was never
    applied: its (user, platform) remembers every event it applied and not this one, so it
    is applied (``late_applied``); redelivered ones stay skipped. With the pair's window
    full (more events than XREC_EID_KEEP) the old rule holds: skipped."""
    s = make_settings(stack, ns, eid_keep=10)
    st = RedisState(redis_from_url(stack.redis_url), s, "unified")

    async def go():
        await st.apply([ev("u1", "a", 0), ev("u1", "b", 1), ev("u1", "d", 3)])
        late = await st.apply([ev("u1", "c", 2)])  # offset 2 after 3: never applied
        again = await st.apply([ev("u1", "c", 2), ev("u1", "b", 1)])  # redeliveries
        # u2: 12 events (window of 10 full), then a late one: skipped as before
        await st.apply([ev("u2", f"i{k}", k, src="t:0") for k in range(12) if k != 5])
        full = await st.apply([ev("u2", "i5", 5, src="t:0")])
        return late, again, full, await st.stats()

    late, again, full, stats = run(go())
    assert (late.applied, late.dup_offset) == (1, 0)
    assert (again.applied, again.dup_offset) == (0, 2)
    assert (full.applied, full.dup_offset) == (0, 1)
    assert stats["late_applied"] == 1 and stats["events_applied"] == 15
