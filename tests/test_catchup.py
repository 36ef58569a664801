"""A worker that fell behind catches up by itself: a burst is offered faster than the loop
can serve it (the recommend agent's batches grow: everything waiting, up to
XREC_BATCH_MAX), then the offered load drops, and event → recommendation latency returns
to near zero. Real broker, real Redis, the workers `xrec dev` runs (model on)."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest

from consumers.cache import RecsCache
from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.platforms import load_platforms
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings
from xrec.dev import Collector
from xrec.stack import free_port

pytestmark = pytest.mark.integration


def metrics(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def test_a_worker_that_fell_behind_catches_up(stack, ns, worker_factory, tmp_path):
    port = free_port()
    s = make_settings(stack, ns, web_port=port, platforms_path="")
    t, reg = Topics(s), load_platforms("")
    create_all_topics(s)
    burst = simulate(SimConfig(events=3000, seed=3), tmp_path / "burst")
    tail = simulate(SimConfig(events=1200, seed=4), tmp_path / "tail")
    # the layout `xrec dev` runs (xrec.dev.start_workers)
    worker_factory(s, agents="recommend")
    worker_factory(s.model_copy(update={"app_id": f"{s.app_id}-normalize", "web_port": 0}),
                   name="normalizer", agents="normalize,catalog")
    worker_factory(s.model_copy(update={"app_id": f"{s.app_id}-train", "web_port": 0,
                                        "train_cpu_share": 0.3}), name="trainer",
                   agents="train")
    cache = RecsCache(stack.redis_url, s.redis_prefix)
    rep = Replayer(stack.bootstrap)
    rep.replay([Source(tmp_path / "burst" / f, t.catalog(p))
                for p, f in burst["files"]["catalog"].items()], progress=False)
    deadline = time.monotonic() + 120
    while cache.stats().get("catalog_items", 0) < sum(burst["items"].values()):
        assert time.monotonic() < deadline, "catalog not stored"
        time.sleep(0.2)
    time.sleep(2.5)  # item index reload
    col = Collector(stack.bootstrap, [t.recs(p) for p in reg], t.deadletter,
                    from_beginning=True)
    col.start()
    try:
        # 1. a burst as fast as the producer goes: far above what the loop serves
        rep.replay([Source(tmp_path / "burst" / f, t.events(p), reg[p])
                    for p, f in burst["files"]["events"].items()], progress=False)
        t_burst = time.monotonic()
        while cache.stats().get("events_applied", 0) < burst["valid_events"] // 2:
            time.sleep(0.2)
        # 2. the offered load drops to 40 events/s for 30 s; the backlog drains meanwhile
        with col.lock:  # latency of what is produced once the backlog has drained
            col.since = time.time() + 22.0
            col.latencies_ms.clear()
        rep.replay([Source(tmp_path / "tail" / f, t.events(p), reg[p])
                    for p, f in tail["files"]["events"].items()], rate=40, progress=False)
        want = burst["valid_events"] + tail["valid_events"]
        deadline = time.monotonic() + 60
        while sum(cache.stats().get(k, 0) for k in ("events_applied", "duplicates_event")) \
                < want:  # (the two simulated streams may share an event id)
            assert time.monotonic() < deadline, cache.stats()
            time.sleep(0.2)
        time.sleep(1.0)
        m = metrics(port)
    finally:
        col.stop()
        rep.close()
    with col.lock:
        late = np.array(col.latencies_ms)
    n_batches = m["xrec_recommend_batch_events_count"]
    small = m['xrec_recommend_batch_events_bucket{le="20"}']
    print(f"burst + tail applied {time.monotonic() - t_burst:.1f}s after the burst was sent; "
          f"{n_batches:.0f} batches, {n_batches - small:.0f} of them > 20 events; "
          f"tail latency p50 {np.percentile(late, 50):.0f} ms p90 "
          f"{np.percentile(late, 90):.0f} ms over {late.size} records")
    assert n_batches - small >= 5  # behind: batches took what waited, not a few events
    assert late.size >= 100
    assert np.percentile(late, 90) < 1000  # caught up: near real time again
    assert m[f'xrec_consumer_lag_records{{topic="{t.unified}"}}'] <= 50
