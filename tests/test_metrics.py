"""Prequential metrics on hand-computed cases; the worker's Prometheus exposition
(streams.metrics on prometheus_client) read back with the library's own parsers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from models.metrics import PointwiseStats, RankingStats, auc, rank_of
from streams.agents.context import WorkerMetrics
from streams.metrics import Counter, Gauge, Histogram, Registry


def test_rank_counts_greater_and_half_of_ties_and_skips_excluded():
    s = np.array([0.9, 0.5, 0.7, 0.5, 0.1])
    assert rank_of(s, 1) == (2.5, 5)  # 0.9, 0.7 greater; one tie → +0.5
    assert rank_of(s, 1, np.array([0, 2])) == (0.5, 3)  # excluded items are not candidates
    assert rank_of(s, 0) == (0.0, 5)
    assert rank_of(s, 0, np.array([0])) == (0.0, 5)  # the target is never excluded
    assert rank_of(np.zeros(11), 4) == (5.0, 11)  # all tied: the random expectation


def test_ranking_stats_by_hand():
    st = RankingStats()
    for r in (0, 1, 9, 10, 19, 25):
        st.add(r)
    sm = st.summary()
    assert sm["n"] == 6
    assert sm["recall@10"] == pytest.approx(3 / 6, abs=1e-5)
    assert sm["recall@20"] == pytest.approx(5 / 6, abs=1e-5)
    ndcg = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 6
    assert sm["ndcg@10"] == pytest.approx(ndcg, abs=1e-5)
    mrr = (1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 20 + 1 / 26) / 6
    assert sm["mrr"] == pytest.approx(mrr, abs=1e-5)
    assert RankingStats().summary()["ndcg@10"] is None


def test_auc_by_hand():
    # positives 0.8, 0.4; negatives 0.6, 0.4 → pairs: (0.8>0.6)=1, (0.8>0.4)=1,
    # (0.4<0.6)=0, (0.4=0.4)=0.5 → 2.5 / 4
    assert auc(np.array([0.8, 0.4, 0.6, 0.4]), np.array([1, 1, 0, 0])) == pytest.approx(0.625)
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    assert auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0


def test_f1_uses_online_calibration_learned_before_each_prediction():
    pw = PointwiseStats()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        y = int(rng.random() < 0.5)
        pw.add(0.8 if y else 0.2, y)  # a perfectly separating score
    sm = pw.summary()
    assert sm["auc"] == 1.0
    assert sm["f1"] > 0.95  # calibration converges; the first predictions were wrong
    assert pw.fp + pw.fn > 0


# ------------------------------------------------------------------ Prometheus exposition

#: what /metrics exported before prometheus_client (the hand-written exposition, every
#: metric given one sample): sample name → label names. The move must not change it.
BEFORE = {
    "xrec_agent_idle_seconds": {"agent"}, "xrec_agent_stalled": {"agent"},
    "xrec_batch_latency_ms_bucket": {"le"}, "xrec_batch_latency_ms_count": set(),
    "xrec_batch_latency_ms_sum": set(), "xrec_broker_client_errors_total": set(),
    "xrec_consumer_lag_records": {"topic"}, "xrec_deadlettered_total": {"reason"},
    "xrec_drift_signals_total": {"platform", "signal"},
    "xrec_event_to_recs_latency_ms_bucket": {"le"},
    "xrec_event_to_recs_latency_ms_count": set(), "xrec_event_to_recs_latency_ms_sum": set(),
    "xrec_events_in_total": {"topic"}, "xrec_head_version": set(),
    "xrec_input_lag_ms_bucket": {"le"}, "xrec_input_lag_ms_count": set(),
    "xrec_input_lag_ms_sum": set(), "xrec_recommend_batch_events_bucket": {"le"},
    "xrec_recommend_batch_events_count": set(), "xrec_recommend_batch_events_sum": set(),
    "xrec_recommend_stage_ms_bucket": {"stage", "le"},
    "xrec_recommend_stage_ms_count": {"stage"}, "xrec_recommend_stage_ms_sum": {"stage"},
    "xrec_recommendations_total": {"refresh"}, "xrec_records_out_total": {"topic"},
    "xrec_redis_errors_total": set(), "xrec_stalls_total": {"agent"},
    "xrec_train_batch_ms_bucket": {"le"}, "xrec_train_batch_ms_count": set(),
    "xrec_train_batch_ms_sum": set(), "xrec_train_skipped_total": set(),
}
#: added with the dashboard (quality, drift values, head freshness)
ADDED = {
    "xrec_quality_recall_at_10": {"platform", "cohort"},
    "xrec_quality_ndcg_at_10": {"platform", "cohort"},
    "xrec_quality_window_events": {"platform", "cohort"},
    "xrec_drift_value": {"platform", "signal"}, "xrec_head_version_published": set(),
    "xrec_train_loss": set(), "xrec_erasures_total": set(),
    "xrec_consumer_skipped_records_total": set(), "xrec_delivery_errors_total": set(),
    **{f"xrec_head_{h}_seconds_{s}": ({"le"} if s == "bucket" else set())
       for h in ("used_after", "event_to_use", "event_to_publish")
       for s in ("bucket", "count", "sum")},
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_exposition_parses_and_gives_the_values_observed():
    reg = Registry(process=False)
    c = reg.add(Counter("xrec_t_events_total", "events", ["topic"]))
    g = reg.add(Gauge("xrec_t_version", "a version"))
    h = reg.add(Histogram("xrec_t_ms", "a latency", (1, 10, 100), ["stage"]))
    c.inc(3, "a")
    c.inc(2, "a")
    c.inc(1, 'we"ird\\')  # escaped by the library
    g.set(7)
    for v in (0.5, 1.0, 7.0):
        h.observe(v, "x")
    h.observe_many([50.0, 1e6], "x")
    got = _samples(reg.render())
    assert got[("xrec_t_events_total", (("topic", "a"),))] == 5
    assert got[("xrec_t_events_total", (("topic", 'we"ird\\'),))] == 1
    assert got[("xrec_t_version", ())] == 7
    buckets = {dict(lab)["le"]: v for (n, lab), v in got.items() if n == "xrec_t_ms_bucket"}
    assert buckets == {"1": 2, "10": 3, "100": 4, "+Inf": 5}  # cumulative, le ≤
    assert got[("xrec_t_ms_count", (("stage", "x"),))] == 5
    assert got[("xrec_t_ms_sum", (("stage", "x"),))] == pytest.approx(1_000_058.5)
    text = reg.render()
    assert "# TYPE xrec_t_events_total counter" in text  # names on the wire as written
    assert 'xrec_t_ms_bucket{le="+Inf",stage="x"} 5.0' in text


def test_unlabelled_series_show_zero_before_their_first_update():
    reg = Registry(process=False)
    reg.add(Counter("xrec_t_errors_total", "errors"))
    reg.add(Gauge("xrec_t_lag", "lag", ["topic"]))
    reg.add(Histogram("xrec_t_ms", "latency", (1, 2)))
    got = _samples(reg.render())
    assert got[("xrec_t_errors_total", ())] == 0
    assert got[("xrec_t_ms_count", ())] == 0 and got[("xrec_t_ms_bucket", (("le", "+Inf"),))] == 0
    assert not any(n == "xrec_t_lag" for n, _ in got)  # labelled: no sample until set
    assert "# TYPE xrec_t_lag gauge" in reg.render()


def test_counters_are_named_with_total_and_names_are_unique():
    with pytest.raises(ValueError, match="_total"):
        Counter("xrec_t_events", "no suffix")
    reg = Registry(process=False)
    reg.add(Gauge("xrec_t_a", "a"))
    with pytest.raises(ValueError):
        reg.add(Gauge("xrec_t_a", "again"))


def test_worker_metric_names_and_labels_are_kept():
    m = WorkerMetrics(process=False)
    for x in m.registry.metrics:  # one sample in every series
        labels = ["v"] * len(x.labelnames)
        if isinstance(x, Histogram):
            x.observe(1.0, *labels)
        elif isinstance(x, Gauge):
            x.set(1.0, *labels)
        else:
            x.inc(1, *labels)
    got: dict[str, set[str]] = {}
    for (name, labels), _ in _samples(m.registry.render()).items():
        got.setdefault(name, set()).update(k for k, _ in labels)
    assert got == {**BEFORE, **ADDED}


def test_the_worker_registry_has_the_process_collectors():
    text = WorkerMetrics().registry.render()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info",
            "python_gc_collections"} <= names


def test_openmetrics_when_the_scraper_asks_for_it():
    m = WorkerMetrics(process=False)
    m.events_in.inc(4, "xrec.unified")
    m.e2r_ms.observe_many([12.0, 80.0])
    body, ctype = m.registry.exposition("application/openmetrics-text; version=1.0.0,"
                                        "text/plain;version=0.0.4;q=0.5")
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in openmetrics_families(text)}
    assert [s.value for s in fams["xrec_events_in"].samples] == [4]
    assert fams["xrec_events_in"].samples[0].name == "xrec_events_in_total"
    e2r = {s.labels.get("le"): s.value for s in fams["xrec_event_to_recs_latency_ms"].samples
           if s.name.endswith("_bucket")}
    assert e2r["10"] == 0 and e2r["20"] == 1 and e2r["100"] == 2 and e2r["+Inf"] == 2
    body, ctype = m.registry.exposition(None)  # plain text 0.0.4 otherwise
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    assert body.decode() == m.registry.render()


def test_the_metrics_page_serves_the_exposition_the_scraper_asks_for():
    """streams.agents.ops's /metrics page, called as Faust's aiohttp driver calls it."""
    import asyncio
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from aiohttp.test_utils import make_mocked_request
    from faust.web.drivers.aiohttp import Web

    from streams.agents import ops

    pages = {}
    app = MagicMock()
    app.page.side_effect = lambda path: lambda fn: pages.setdefault(path, fn)
    m = WorkerMetrics()
    m.deadlettered.inc(2, "bad_json")
    ctx = SimpleNamespace(app=app, settings=SimpleNamespace(stall_after_s=30.0), metrics=m,
                          watchdog=MagicMock(), server=None, batch_stats={}, wanted=set())
    ops.install(ctx)  # type: ignore[arg-type]
    web = Web.__new__(Web)  # its response helpers need no server

    def get(accept):
        headers = {"Accept": accept} if accept else {}
        req = make_mocked_request("GET", "/metrics", headers=headers)
        resp = asyncio.run(pages["/metrics"](web, req))
        return resp.headers["Content-Type"], resp.body.decode()

    ctype, text = get(None)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    assert _samples(text)[("xrec_deadlettered_total", (("reason", "bad_json"),))] == 2
    assert "process_cpu_seconds_total" in text
    ctype, text = get("application/openmetrics-text;version=1.0.0;q=0.6,text/plain;q=0.4")
    assert ctype.startswith("application/openmetrics-text") and text.endswith("# EOF\n")


def test_head_swaps_this_worker_logged_feed_the_freshness_histograms_once():
    import asyncio
    import json
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from streams.agents import ops

    timers = {}
    app = MagicMock()
    app.timer.side_effect = lambda period: lambda fn: timers.setdefault(fn.__name__, fn)
    import time

    now = time.time() + 60
    swaps = [  # HeadRegistry.note_swap's log, newest first, two workers
        {"version": 3, "worker": "w1", "used_after_s": 0.4, "event_to_use_s": 2.0, "at": now},
        {"version": 3, "worker": "w2", "used_after_s": 9.0, "event_to_use_s": 9.0, "at": now},
        {"version": 2, "worker": "w1", "used_after_s": 0.2, "event_to_use_s": 40.0, "at": now},
        # an earlier process with the same worker id (a pid) before this one started
        {"version": 1, "worker": "w1", "used_after_s": 5.0, "event_to_use_s": 5.0, "at": 1.0}]

    async def lrange(key, start, stop):
        return [json.dumps(x).encode() for x in swaps]

    reg = SimpleNamespace(r=SimpleNamespace(lrange=lrange), k=lambda name: name)
    server = SimpleNamespace(version=3, reg=reg)
    m = WorkerMetrics(process=False)
    ctx = SimpleNamespace(app=app, settings=SimpleNamespace(stall_after_s=30.0), metrics=m,
                          watchdog=MagicMock(), server=server, batch_stats={}, wanted=set(),
                          worker="w1")
    ops.install(ctx)  # type: ignore[arg-type]
    asyncio.run(timers["head_freshness"]())
    asyncio.run(timers["head_freshness"]())  # nothing new: counted once
    got = _samples(m.registry.render())
    assert got[("xrec_head_used_after_seconds_count", ())] == 2
    assert got[("xrec_head_used_after_seconds_sum", ())] == pytest.approx(0.6)
    assert got[("xrec_head_event_to_use_seconds_bucket", (("le", "2.5"),))] == 1
    swaps.insert(0, {"version": 4, "worker": "w1", "used_after_s": 1.0, "event_to_use_s": 1.0,
                     "at": now})
    server.version = 4
    asyncio.run(timers["head_freshness"]())
    assert _samples(m.registry.render())[("xrec_head_used_after_seconds_count", ())] == 3
