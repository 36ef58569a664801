"""The learned model on the real broker and Redis: the train agent in its own worker
process, recommenders hot-swapping head versions while events keep flowing, training
examples and quality windows on their topics."""

from __future__ import annotations

import json
import re
import socket
from urllib.request import urlopen

import pytest
import redis as redis_sync

from models.heads import load_model
from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.platforms import load_platforms
from streams.records import (
    DriftReaction,
    DriftSignal,
    DriftWindow,
    HeadVersion,
    QualityWindow,
    Recommendations,
    TrainingExample,
)
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings
from tests.kafka_util import read_all
from tests.test_pipeline import wait_for

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replay_sim(stack, s, d, man, rate: float):
    """Catalog first (wait until encoded), then the events at ``rate``; wait until every
    valid event is applied. Returns a Redis client."""
    t = Topics(s)
    reg = load_platforms(s.platforms_path)
    ns = s.redis_prefix.rstrip(":")
    rep = Replayer(stack.bootstrap)
    rep.replay([Source(d / f, t.catalog(p)) for p, f in man["files"]["catalog"].items()],
               progress=False)
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    wait_for(lambda: int(r.hget(f"{ns}:stats", "catalog_encoded") or 0)
             >= sum(man["items"].values()), what="catalog encoded")
    rep.replay([Source(d / f, t.events(p), reg[p]) for p, f in man["files"]["events"].items()],
               rate=rate, progress=False)
    rep.close()
    wait_for(lambda: int(r.hget(f"{ns}:stats", "events_applied") or 0) >= man["valid_events"],
             what="every event applied")
    return r


def test_train_agent_in_its_own_worker_and_hot_swap_under_load(stack, ns, worker_factory,
                                                                tmp_path):
    man = simulate(SimConfig(events=1500, users=60, seed=5), tmp_path / "sim")
    d = tmp_path / "sim"
    s = make_settings(stack, ns, quality_window_s=1.0, train_interval_s=0.1,
                      head_poll_s=0.1, platforms_path="")
    t = Topics(s)
    reg = load_platforms("")
    create_all_topics(s)
    worker_factory(s, name="stream", agents="normalize,recommend,catalog")
    worker_factory(make_settings(stack, ns, app_id=f"{ns}-train", platforms_path=""),
                   name="trainer", agents="train")
    # the stream keeps flowing while head versions are trained and swapped in
    r = replay_sim(stack, s, d, man, rate=300)
    wait_for(lambda: r.llen(f"{ns}:heads:swaps") >= 2, what="two head swaps")
    st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
    assert st["events_applied"] == man["valid_events"]  # nothing lost across the swaps

    # training examples: one per applied positive, history before the event, no raw ids
    raw = read_all(stack.bootstrap, t.train_examples)
    exs = [TrainingExample.model_validate_json(v) for _, v in raw]
    assert exs and all(len(x.history) <= s.hist_len for x in exs)
    # history *before* the event (arrival order): never the event itself
    assert all((x.platform, x.item, x.event_time) not in {(h[0], h[1], h[3]) for h in x.history}
               for x in exs)
    assert any({h[0] for h in x.history} - {x.platform} for x in exs)  # cross-platform
    assert not re.search(rb"(shop|video|music)-user-\d{5}|acct-\d{5}",
                         b"".join(k + v for k, v in raw))

    # head versions: every example learned; in Redis and on the topic, strictly increasing
    def all_learned():
        hv = [HeadVersion.model_validate_json(v) for _, v in read_all(stack.bootstrap, t.heads)]
        return hv if hv and hv[-1].trained_examples == len(exs) else None

    heads = wait_for(all_learned, what="every training example learned")
    versions = [h.version for h in heads]
    assert len(versions) >= 2 and versions == sorted(set(versions))
    assert all(h.skipped_nonfinite == 0 and h.device in ("cpu", "cuda") for h in heads)
    rb = redis_sync.Redis.from_url(stack.redis_url)
    assert int(rb.get(f"{ns}:heads:version")) == versions[-1]
    model = load_model(rb.get(f"{ns}:heads:blob"))
    assert set(model.platforms) == {"shop", "video", "music"}

    # recommendations ranked by the model, on every platform a user is active on
    recs = [Recommendations.model_validate_json(v) for p in reg
            for _, v in read_all(stack.bootstrap, t.recs(p))]
    by_model = [x for x in recs if x.scorer.startswith("xrec-heads-v")]
    assert by_model and all(x.items for x in by_model[-50:])
    assert any(x.events == 0 for x in by_model)  # cross-platform refresh (no event there)

    # each of the best XREC_EXPLAIN_TOP items says why; the evidence is the user's own
    # positives (checked for users whose whole history is still in Redis: ≤ XREC_HIST_LEN)
    whys = [(x.user, w) for x in by_model for w in (i.why for i in x.items[:s.explain_top])]
    assert whys and all(w is not None for _, w in whys)
    cited = [(u, w) for u, w in whys if w.evidence]
    assert {w.kind for _, w in cited} >= {"history"}
    n_events = {u: sum(int(v) for k, v in r.hgetall(f"{ns}:u:{u}:stats").items()
                       if k.endswith(":events")) for u in {u for u, _ in cited}}
    whole = [(u, w) for u, w in cited if n_events[u] <= s.hist_len]
    assert len(whole) >= 50
    for u, w in whole:
        hist = {(h[0], h[1]) for h in map(json.loads, r.zrange(f"{ns}:u:{u}:history", 0, -1))
                if h[2] == 1}
        assert {(e.platform, e.item) for e in w.evidence} <= hist
    cross = [w for x in by_model for i in x.items[:s.explain_top] if (w := i.why) is not None
             and any(e.platform != x.platform for e in w.evidence)]
    assert cross  # a recommendation on one platform because of another platform's item

    # prequential quality windows
    wait_for(lambda: read_all(stack.bootstrap, t.quality), what="a quality window")
    q = [QualityWindow.model_validate_json(v) for _, v in read_all(stack.bootstrap, t.quality)]
    assert any(w.platform == "all" and w.cohort == "all" and w.n > 0 for w in q)
    assert all(w.recall_at_10 is None or 0 <= w.recall_at_10 <= 1 for w in q)


def test_injected_drift_reaches_the_drift_topic_and_the_trainer_reacts(stack, ns,
                                                                      worker_factory, tmp_path):
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=2400, users=60, seed=9,
                             drift=["labels@1200:video", "catalog@1200"]), d)
    port = free_port()
    s = make_settings(stack, ns, platforms_path="", drift_window=100, drift_check_every=20,
                      web_port=port,
                      drift_min_events=200, drift_cooldown=300, drift_delta=0.01,
                      quality_window_s=1.0,
                      train_interval_s=0.1)
    t = Topics(s)
    create_all_topics(s)
    worker_factory(s)
    replay_sim(stack, s, d, man, rate=400)

    def records():
        return [json.loads(v) for _, v in read_all(stack.bootstrap, t.drift)]

    def labels_signal():
        return [x for x in records() if x["kind"] == "signal" and x["platform"] == "video"
                and x["signal"] == "labels"]

    sig = DriftSignal.model_validate(wait_for(labels_signal, what="a labels drift signal")[0])
    assert sig.detector == "ADWIN" and sig.value < sig.reference  # the positive rate fell
    assert sig.events >= 200
    # the new item family moves the item distribution: the train agent reacts (weights)
    reacted = wait_for(lambda: [x for x in records() if x["kind"] == "reaction"
                                and x["signal"] in ("popularity", "centroid")],
                       what="the train agent's reaction")
    rx = DriftReaction.model_validate(reacted[0])
    assert "EMA re-anchored" in rx.actions and any(a.startswith("lr×") for a in rx.actions)
    # labels drift alone triggers no reaction by default (measured: it slowed recovery)
    assert not [x for x in records() if x["kind"] == "reaction" and x["signal"] == "labels"]
    windows = [DriftWindow.model_validate(x) for x in records() if x["kind"] == "window"]
    assert any(w.platform == "video" and "labels" in w.values for w in windows)

    # the worker's web port: Prometheus metrics and health
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    got = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            got[name] = float(value)
    assert got[f'xrec_events_in_total{{topic="{t.unified}"}}'] == man["valid_events"]
    assert got['xrec_drift_signals_total{platform="video",signal="labels"}'] >= 1
    assert got['xrec_event_to_recs_latency_ms_bucket{le="+Inf"}'] > 0
    assert got["xrec_head_version"] >= 1
    assert "# TYPE xrec_batch_latency_ms histogram" in text
    health = json.loads(urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read())
    assert health["live"] and health["ready"] and health["head_version"] >= 1
