"""Streamed load: does the loop keep up, and at what latency, at 200, 400, 800, 1600 events/s?

For each offered rate, on a fresh embedded stack (Tansu + Redis: Tansu slows down as
record batches accumulate, DESIGN.md), with the workers ``xrec dev`` runs (recommend;
normalize + catalog; train; the learned model and the drift monitor on):

1. load the simulator's catalogs and wait until every item is encoded;
2. stream ``rate × duration`` simulated events at ``rate`` (``xrec replay --rate``);
3. read every recommendation record from outside, as a consumer would (latency =
   platform event produced → recommendation published, from the records);
4. ``applied_per_s`` = valid events / (first event sent → last event applied); a worker
   that keeps up applies at the offered rate, one that falls behind drains afterwards
   and scores lower.

Also, on a fresh broker in the same run: the bare Faust pass-through rate over a
pre-loaded backlog (``bench/throughput.py``'s phase (a)), the peer for scale. Per rate,
the serving worker's per-stage costs (``/metrics``: ``xrec_recommend_stage_ms``) and
batch sizes, head freshness and prequential quality go on a ``details`` line.

``--json``: the last stdout line is exactly ``{"bare_events_per_s": ..., "rates":
[{"offered": 200, "applied_per_s": ..., "latency_ms_p50": ..., "latency_ms_p99": ...},
...], "max_sustained_rate": ...}``; ``max_sustained_rate`` is the highest offered rate
with applied ≥ 0.97 × offered and p99 ≤ 250 ms (0 if none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from throughput import bare_rate, cpu_ticks  # noqa: E402

from consumers.cache import RecsCache  # noqa: E402
from producers.replay import Replayer, Source  # noqa: E402
from producers.simulate import SimConfig, simulate  # noqa: E402
from streams.agents.context import RECOMMEND_STAGES  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import Topics  # noqa: E402
from xrec.dev import Collector, start_workers  # noqa: E402
from xrec.stack import (  # noqa: E402
    create_topics,
    embedded_partitions,
    free_port,
    start_redis,
    start_tansu,
    wait_worker_ready,
)

TARGET_SHARE, TARGET_P99_MS = 0.97, 250.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scrape(port: int) -> dict[str, float]:
    """The serving worker's /metrics as {series: value} (our exposition, one per line)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _mean(m: dict[str, float], name: str) -> float | None:
    n = m.get(f"{name}_count", 0.0)
    return round(m.get(f"{name}_sum", 0.0) / n, 1) if n else None


def stage_figures(m: dict[str, float]) -> dict[str, object]:
    batches = m.get("xrec_recommend_batch_events_count", 0.0)
    events = m.get("xrec_recommend_batch_events_sum", 0.0)
    per_batch = {}
    for stage in RECOMMEND_STAGES:
        total = m.get(f'xrec_recommend_stage_ms_sum{{stage="{stage}"}}', 0.0)
        per_batch[stage] = round(total / batches, 3) if batches else None
    per_event_ms = sum(v for v in per_batch.values() if v) * batches / events if events else None
    return {"batches": int(batches), "events_per_batch": round(events / batches, 1)
            if batches else None, "stage_ms_per_batch": per_batch,
            "recommend_ms_per_event": round(per_event_ms, 4) if per_event_ms else None,
            # where an event's time goes: produced → its micro-batch starting, then → published
            "input_lag_ms_mean": _mean(m, "xrec_input_lag_ms"),
            "event_to_recs_ms_mean": _mean(m, "xrec_event_to_recs_latency_ms"),
            "cross_refreshes": int(m.get('xrec_recommendations_total{refresh="cross"}', 0)),
            "event_refreshes": int(m.get('xrec_recommendations_total{refresh="event"}', 0))}


def start_loop(wd: Path, settings: Settings, topics: Topics, man: dict, started: list
               ) -> tuple[Any, Any, list[Any], int, dict[str, str]]:
    """A fresh embedded stack and the workers `xrec dev` runs (the recommend one serving a
    free web port), with the simulator's catalogs (``man``, under ``wd/sim``) stored and
    indexed. Returns (broker, Redis, workers, web port, the workers' environment); every
    process started is appended to ``started`` (the caller stops them)."""
    platforms = load_platforms(settings.platforms_path)
    tansu = start_tansu(wd)
    started.append(tansu)
    redis = start_redis(wd)
    started.append(redis)
    plan = topics.plan(platforms, embedded_partitions(settings))
    create_topics(tansu.url, plan, plan)
    port = free_port()
    env = {"KAFKA_BOOTSTRAP_SERVERS": tansu.url, "REDIS_URL": redis.url,
           "XREC_ENV": "dev", "XREC_LOG_LEVEL": "INFO", "XREC_STATE_EPOCH": "b"}
    workers = start_workers(wd, env, settings, serve_env={"XREC_WEB_PORT": str(port)})
    started += workers
    for w in workers:
        wait_worker_ready(redis.url, settings.redis_prefix, w, timeout=120)
    cache = RecsCache(redis.url, settings.redis_prefix)
    rep = Replayer(tansu.url)
    rep.replay([Source(wd / "sim" / f, topics.catalog(p), None)
                for p, f in man["files"]["catalog"].items()], progress=False)
    rep.close()
    n_items = sum(man["items"].values())
    deadline = time.monotonic() + 180
    while cache.stats().get("catalog_items", 0) < n_items:
        if time.monotonic() > deadline:
            raise SystemExit("the catalog was not stored in time")
        time.sleep(0.2)
    time.sleep(2.5)  # every worker reloads its item index (every 2 s)
    return tansu, redis, workers, port, env


def run_rate(rate: float, duration: float, seed: int, wd: Path, drain_s: float) -> dict:
    settings = Settings()
    topics, platforms = Topics(settings), load_platforms(settings.platforms_path)
    events = int(rate * duration)
    man = simulate(SimConfig(events=events, seed=seed), wd / "sim")
    started: list[Any] = []
    try:
        tansu, redis, workers, port, _ = start_loop(wd, settings, topics, man, started)
        cache = RecsCache(redis.url, settings.redis_prefix)
        rep = Replayer(tansu.url)
        sim = wd / "sim"
        col = Collector(tansu.url, [topics.recs(p) for p in platforms], topics.deadletter,
                        from_beginning=True, quality_topic=topics.quality)
        col.start()
        procs = {"broker": tansu.pid, "redis": redis.pid, "bench (replay + reader)":
                 os.getpid(), **{w.name: w.pid for w in workers}}
        c0 = {k: cpu_ticks(v) for k, v in procs.items()}
        t0 = time.monotonic()
        rep.replay([Source(sim / f, topics.events(p), platforms[p])
                    for p, f in man["files"]["events"].items()], rate=rate, progress=False)
        rep.close()
        replay_s = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        cpu = {k: round(100.0 * (cpu_ticks(v) - c0[k]) / hz / replay_s, 1)
               for k, v in procs.items()}
        want = man["valid_events"]
        deadline = time.monotonic() + drain_s
        done_at = None
        while time.monotonic() < deadline:
            st = cache.stats()
            if st.get("events_applied", 0) + st.get("duplicates_event", 0) >= want:
                done_at = time.monotonic()
                break
            time.sleep(0.05)
        applied = cache.stats().get("events_applied", 0)
        elapsed = (done_at or time.monotonic()) - t0
        time.sleep(1.0)
        metrics = scrape(port)
        col.stop()
        snap = col.snapshot()
        swaps = cache.head_swaps()
        with col.lock:
            lat = np.array(col.latencies_ms)
        p50, p99 = (float(x) for x in np.percentile(lat, [50, 99])) if lat.size else (
            float("nan"), float("nan"))
        used = np.array([s["used_after_s"] for s in swaps]) if swaps else np.zeros(0)
        e2u = np.array([s.get("event_to_use_s", np.nan) for s in swaps]) if swaps else \
            np.zeros(0)
        return {"offered": int(rate), "applied_per_s": round(applied / elapsed, 1),
                "latency_ms_p50": round(p50, 1), "latency_ms_p99": round(p99, 1),
                "details": {"events": want, "applied": applied, "drained": done_at is not None,
                            "replay_s": round(replay_s, 1), "elapsed_s": round(elapsed, 1),
                            "recommendations": int(lat.size),
                            "head_versions": cache.head_version(),
                            "head_used_after_s_p50": round(float(np.median(used)), 3)
                            if used.size else None,
                            "head_used_after_s_max": round(float(used.max()), 3)
                            if used.size else None,
                            "head_event_to_use_s_p50": round(float(np.nanmedian(e2u)), 3)
                            if e2u.size else None,
                            "quality_all": snap["quality"].get("all/all"),
                            "cpu_percent_during_replay": cpu,
                            **stage_figures(metrics)}}
    finally:
        for svc in reversed(started):
            svc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,400,800,1600", help="offered rates, events/s")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds streamed per rate")
    ap.add_argument("--bare-events", type=int, default=10000)
    ap.add_argument("--drain", type=float, default=120.0,
                    help="seconds to wait after the replay for the last events")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="xrec-streamed-"))
    log(f"bare Faust pass-through over {a.bare_events:,} pre-loaded events ...")
    sim = simulate(SimConfig(events=a.bare_events, seed=1), wd / "bare-sim")
    files = [wd / "bare-sim" / f for f in sim["files"]["events"].values()]
    bare_dir = wd / "bare"
    bare_dir.mkdir()
    tansu = start_tansu(bare_dir)
    try:
        bare = bare_rate(tansu.url, files, a.bare_events, bare_dir)
    finally:
        tansu.stop()
    log(f"    bare: {bare:,.0f} events/s")
    rows = []
    for r in [float(x) for x in a.rates.split(",")]:
        log(f"offered {r:,.0f} events/s for {a.duration:.0f} s ...")
        res = run_rate(r, a.duration, a.seed, wd / f"r{int(r)}", a.drain)
        d = res["details"]
        log(f"    applied {res['applied_per_s']:,.1f}/s, latency p50 {res['latency_ms_p50']} "
            f"ms p99 {res['latency_ms_p99']} ms; {d['events_per_batch']} events/batch, "
            f"{d['recommend_ms_per_event']} ms/event in the recommend agent; "
            f"{d['head_versions']} head versions; quality {d['quality_all']}")
        log(f"    CPU % of a core during the replay: {d['cpu_percent_during_replay']}")
        log("    stage ms/batch: " + " ".join(f"{k} {v}" for k, v in
                                               d["stage_ms_per_batch"].items()))
        rows.append(res)
    ok = [r["offered"] for r in rows if r["applied_per_s"] >= TARGET_SHARE * r["offered"]
          and r["latency_ms_p99"] <= TARGET_P99_MS]
    out = {"bare_events_per_s": round(bare, 1),
           "rates": [{k: r[k] for k in ("offered", "applied_per_s", "latency_ms_p50",
                                        "latency_ms_p99")} for r in rows],
           "max_sustained_rate": max(ok) if ok else 0}
    print("details " + json.dumps({str(r["offered"]): r["details"] for r in rows}))
    for r in rows:
        print(f"offered {r['offered']:>5}/s | applied {r['applied_per_s']:>8,.1f}/s | "
              f"p50 {r['latency_ms_p50']:>8} ms | p99 {r['latency_ms_p99']:>8} ms")
    print(f"bare Faust {bare:,.0f} events/s | max sustained {out['max_sustained_rate']}/s")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
