"""The recommend agent's body on a real Redis, without Faust (``Recommender.handle``):
stage timings, exclusions, one ranking per (user, platform), the cross-platform refresh
schedule and the training-example contract. The producer is a recording sink; the
real-broker path is in test_pipeline.py and test_catchup.py."""

import asyncio
import json
import time

import numpy as np
import pytest
import redis as redis_sync

from models.heads import HeadsModel, save_model
from models.index import ItemIndex
from streams.agents.context import RECOMMEND_STAGES, Context, WorkerMetrics
from streams.agents.recommend import CrossRefresh, Recommender
from streams.heads import HeadRegistry, ModelServer, model_config
from streams.platforms import load_platforms
from streams.records import Interaction, Recommendations, TrainingExample
from streams.state import RedisState, redis_from_url
from streams.topics import Topics
from streams.vectors import VectorStore
from streams.watchdog import Watchdog
from tests.conftest import make_settings

DIM = 32
PLATS = ("shop", "video", "music")


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.sent.append((topic, key, value))
        fut = asyncio.get_running_loop().create_future()  # the client's delivery future
        fut.set_result(None)
        return fut


class App:
    def __init__(self) -> None:
        self.producer = Sink()


async def make_core(stack, ns, **kw):
    s = make_settings(stack, ns, model_dim=16, model_buckets=256, hist_len=20,
                      platforms_path="", **kw)
    platforms = load_platforms("")
    topics = Topics(s)
    rng = np.random.default_rng(0)
    vs = VectorStore(s.redis_url, s.redis_prefix, "test-enc", DIM)
    for p in PLATS:
        vs.index[p] = ItemIndex(DIM)
        vs.index[p].upsert([f"{p}-{i}" for i in range(30)],
                           rng.standard_normal((30, DIM)).astype(np.float32))
    redis = redis_from_url(s.redis_url)
    app = App()
    ctx = Context(app=app, settings=s, platforms=platforms, topics=topics, redis=redis,
                  state=RedisState(redis, s, topics.unified, epoch="t"),
                  metrics=WorkerMetrics(), watchdog=Watchdog(30), wanted={"recommend"},
                  worker="test", vectors=vs)
    reg = HeadRegistry(s.redis_url, s.redis_prefix)
    await reg.publish(save_model(HeadsModel(model_config(s, DIM), PLATS), compact=True), {})
    ctx.server = ModelServer(s, vs, "test")
    assert await ctx.server.poll()
    return Recommender(ctx), ctx, app.producer


def msg(ctx, off, user, platform, item, label=1, t=None):
    now = time.time()
    ev = Interaction(platform=platform, user=user, item=item, kind="x", label=label,
                     weight=1.0, event_time=t or now - 100 + off, event_id=f"e{off}",
                     produced_at=now, src_topic="src", src_partition=0, src_offset=off)
    return (ctx.topics.unified, 0, off, ev.model_dump_json().encode())


def recs_of(ctx, sink):
    return [Recommendations.model_validate_json(v) for t, _, v in sink.sent
            if t.startswith(ctx.topics.recs(""))]


def test_a_batch_runs_every_stage_and_the_metrics_show_them(stack, ns):
    async def go():
        core, ctx, sink = await make_core(stack, ns)
        batch = [msg(ctx, n, f"u{n % 5}", PLATS[n % 3], f"{PLATS[n % 3]}-{n}") for n in range(30)]
        batch.append((ctx.topics.unified, 0, 99, b"not json"))
        rep = await core.handle(batch)
        return rep, ctx, sink

    rep, ctx, sink = asyncio.run(go())
    assert rep["events"] == 31 and rep["applied"] == 30
    stages = set(RECOMMEND_STAGES) - {"drift"}  # no drift monitor here
    assert set(rep["ms"]) == stages
    text = ctx.metrics.registry.render()
    for stage in stages:
        assert f'xrec_recommend_stage_ms_count{{stage="{stage}"}} 1' in text
        assert f'xrec_recommend_stage_ms_bucket{{le="+Inf",stage="{stage}"}} 1' in text
    assert "xrec_recommend_batch_events_sum 31" in text
    assert any(t == ctx.topics.deadletter for t, _, _ in sink.sent)  # the bad record


def test_one_ranking_per_user_and_platform_without_consumed_items(stack, ns):
    async def go():
        core, ctx, sink = await make_core(stack, ns, rec_k=10)
        # u1: five events on video in one batch (one positive twice), one on music
        batch = [msg(ctx, 0, "u1", "video", "video-1"), msg(ctx, 1, "u1", "video", "video-2"),
                 msg(ctx, 2, "u1", "video", "video-3", label=0),
                 msg(ctx, 3, "u1", "video", "video-1"), msg(ctx, 4, "u1", "music", "music-9"),
                 msg(ctx, 5, "u2", "video", "video-1")]
        await core.handle(batch)
        return ctx, sink

    ctx, sink = asyncio.run(go())
    recs = recs_of(ctx, sink)
    pairs = [(r.user, r.platform) for r in recs]
    assert sorted(pairs) == sorted({("u1", "video"), ("u1", "music"), ("u2", "video")})
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    for rec in recs:
        seen = set(r.zrange(f"{ctx.settings.redis_prefix}u:{rec.user}:{rec.platform}:seen",
                            0, -1))
        items = [i.item for i in rec.items]
        assert seen and not seen & set(items) and len(items) == 10
        assert rec.scorer == "xrec-heads-v1"
    u1v = next(x for x in recs if (x.user, x.platform) == ("u1", "video"))
    assert u1v.events == 4


def test_other_platforms_refresh_on_a_bounded_schedule(stack, ns):
    async def go():
        core, ctx, sink = await make_core(stack, ns, cross_refresh_s=0.5)
        out = []
        off = 0
        for round_ in range(4):  # u1 plays music; it also has a video history
            if round_ == 0:
                await core.handle([msg(ctx, off, "u1", "video", "video-1")])
                off += 1
            sink.sent.clear()
            await core.handle([msg(ctx, off, "u1", "music", f"music-{off}")])
            off += 1
            out.append(sorted(r.platform for r in recs_of(ctx, sink)))
            if round_ == 2:
                await asyncio.sleep(0.6)
        return out, ctx

    out, ctx = asyncio.run(go())
    # video was refreshed by its own event just before the first music event: not due
    # again until 0.5 s later, however many music events come meanwhile
    assert out[0] == ["music"]
    assert out[1] == ["music"] and out[2] == ["music"]
    assert out[3] == ["music", "video"]
    text = ctx.metrics.registry.render()
    assert 'xrec_recommendations_total{refresh="cross"} 1' in text


def test_cross_refresh_policy_unit():
    now = [0.0]
    c = CrossRefresh(10.0, keep=2, clock=lambda: now[0])
    assert c.due(("u", "p"))
    c.mark(("u", "p"))
    now[0] = 9.9
    assert not c.due(("u", "p"))
    now[0] = 10.0
    assert c.due(("u", "p"))
    c.mark(("a", "p"))
    c.mark(("b", "p"))  # keep=2: the oldest pair is forgotten (then due: safe)
    assert c.due(("u", "p")) and not c.due(("b", "p"))
    assert CrossRefresh(0.0).due(("x", "y"))


def test_training_examples_keep_the_contract(stack, ns):
    async def go():
        core, ctx, sink = await make_core(stack, ns)
        await core.handle([msg(ctx, 0, "u1", "video", "video-1"),
                           msg(ctx, 1, "u1", "music", "music-2", label=0),
                           msg(ctx, 2, "u1", "shop", "shop-3")])
        return ctx, sink

    ctx, sink = asyncio.run(go())
    raw = [v for t, _, v in sink.sent if t == ctx.topics.train_examples]
    assert len(raw) == 2  # positives only
    ex = [TrainingExample.model_validate_json(v) for v in raw]
    assert [e.item for e in ex] == ["video-1", "shop-3"]
    assert [h[1] for h in ex[1].history] == ["music-2", "video-1"]  # newest first
    for v, e in zip(raw, ex, strict=True):  # the same JSON pydantic would write
        assert json.loads(v) == json.loads(e.model_dump_json())


@pytest.mark.parametrize("n", [1, 7])
def test_recs_json_is_what_consumers_validate(stack, ns, n):
    async def go():
        core, ctx, sink = await make_core(stack, ns, rec_k=n)
        await core.handle([msg(ctx, 0, "u1", "video", "video-1")])
        await ctx.state.cache_flush()  # written in the background, flushed before commits
        return ctx, sink

    ctx, sink = asyncio.run(go())
    (rec,) = recs_of(ctx, sink)
    assert len(rec.items) == n and rec.platform == "video" and rec.events == 1
    cached = redis_sync.Redis.from_url(stack.redis_url).get(
        f"{ctx.settings.redis_prefix}recs:video:u1")
    assert Recommendations.model_validate_json(cached) == rec


def _warm_batch(ctx):
    """Ten users watch video-1; six also video-2, three video-3, one video-4."""
    out, off = [], 0
    for j in range(10):
        for item in ["video-1"] + [f"video-{n}" for n, k in ((2, 6), (3, 3), (4, 1)) if j < k]:
            out.append(msg(ctx, off, f"a{j}", "video", item))
            off += 1
    return out, off


def test_the_served_ranking_is_the_model_plus_weighted_popco(stack, ns):
    async def go(weight):
        core, ctx, sink = await make_core(stack, f"{ns}w{int(weight)}", rec_k=3,
                                          hybrid_weight=weight)
        warm, off = _warm_batch(ctx)
        await core.handle(warm)
        await asyncio.sleep(1.05)  # the rows read during it are now due for a re-read
        sink.sent.clear()
        await core.handle([msg(ctx, off, "u", "video", "video-1")])
        (rec,) = recs_of(ctx, sink)
        return [i.item for i in rec.items], ctx

    # a weight that dwarfs the model's standardised scores: popco's order, which is
    # co-occurrence with video-1 (6 > 3 > 1 users) blended with popularity
    items, ctx = asyncio.run(go(1e6))
    assert items == ["video-2", "video-3", "video-4"]
    assert ctx.state.agg_co and ctx.state.agg_pop
    # weight 0: the model alone, and no rows are read for it
    items0, ctx0 = asyncio.run(go(0.0))
    assert not ctx0.state.agg_co and not ctx0.state.agg_pop
    assert len(items0) == 3 and "video-1" not in items0


def test_prequential_asks_never_see_their_own_batch_in_popco_rows(stack, ns):
    async def go():
        core, ctx, sink = await make_core(stack, ns, hybrid_weight=0.5)
        warm, off = _warm_batch(ctx)
        await core.handle(warm)
        await asyncio.sleep(1.05)
        seen: list[tuple[int, list]] = []
        answer = ctx.server.answer

        def spy(asks, k, clock=None):
            seen.append((ctx.state.seq, list(asks)))
            return answer(asks, k, clock)

        ctx.server.answer = spy
        # u: video-1, then video-5 in the same batch: nobody watched video-5 before, so
        # a row read before this batch has no video-1 → video-5 co-occurrence
        await core.handle([msg(ctx, off, "u", "video", "video-1"),
                           msg(ctx, off + 1, "u", "video", "video-5")])
        return seen

    ((seq, asks),) = asyncio.run(go())
    evals = [a for a in asks if a.target is not None]
    recs = [a for a in asks if a.target is None]
    ev5 = next(a for a in evals if a.target == "video-5")
    assert ev5.co and ev5.pop is not None
    for a in evals:
        assert all(r.before <= seq for r in [*a.co, a.pop] if r is not None)
    (row1,) = ev5.co  # video-1's row, as of before this batch
    assert "video-2" in row1.items and "video-5" not in row1.items
    assert "video-5" not in ev5.pop.items
    (rec,) = recs  # video-5's row and video-1's, newest first
    assert len(rec.co) == 2 and rec.pop is not None
