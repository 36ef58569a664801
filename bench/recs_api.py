"""The read API under load: ``GET /recs/{user}`` latency while the worker streams events.

On a fresh embedded stack (Tansu + Redis) with the workers ``xrec dev`` runs (recommend,
which serves the web port; normalize + catalog; train; the learned model and the drift
monitor on), after the simulator's catalogs are encoded:

1. simulated events are replayed at ``--rate`` events/s (``xrec replay --rate``) for
   ``--warmup`` + 3 × ``--window`` seconds;
2. the stream is cut into three windows: quiet, load, quiet. During the load window a
   separate process (an asyncio aiohttp client on keep-alive connections, open loop: one
   request every 1/``--req-rate`` s whatever the answers take) requests
   ``/recs/<user>?platform=P`` of the recommend worker (``--serve standalone``: of the page
   alone in its own process, ``python -m streams.agents.api``) for users the worker has applied
   events of (``users`` in Redis; random platforms, so some requests are cold-start
   fallbacks; 20% with ``explain=1``) and, ``--unknown`` of the time, for unknown users
   (404s, expected);
3. per-request latency is measured in that process (request sent → body read);
4. per window: the worker's applied rate (Redis ``events_applied``), the event →
   recommendation latency of the records published (read back from ``xrec.recs.*``, as in
   ``bench/streamed.py``) and the recommend worker's CPU, so that the page's cost to the
   recommend path shows as load vs quiet.

``--json``: the last stdout line is one JSON object: ``requests``, ``rate_per_s``,
``latency_ms_p50`` / ``_p99`` / ``_max``, ``errors`` (transport errors and 5xx; 404s for
unknown users are not errors), ``status``, ``fallbacks``, ``events_applied_per_s`` (during
the load window), ``event_to_rec_ms_p99_quiet`` / ``_load`` (and p50), ``worker_cpu_percent``
per window, ``server_ms_mean`` (the page's own timing, ``xrec_api_request_ms``; worker only),
``target_met``
(p99 ≤ 10 ms and applied ≥ 0.97 × offered).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

TARGET_P99_MS, TARGET_SHARE = 10.0, 0.97


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the load generator


def _loadgen(base: str, paths: list[str], rate: float, start_at: float, out: Any) -> None:
    """Child process: fire ``paths`` at ``rate``/s from wall time ``start_at``; put the
    result dict on ``out``."""
    import asyncio

    import aiohttp

    async def go() -> dict[str, Any]:
        lat: list[float] = []
        late: list[float] = []
        status: dict[str, int] = {}
        fallbacks = errors = 0

        async def one(sess: aiohttp.ClientSession, path: str, due: float) -> None:
            nonlocal fallbacks, errors
            t = time.perf_counter()
            late.append(t - due)
            try:
                async with sess.get(base + path) as resp:
                    body = await resp.read()
                    code = resp.status
            except Exception:  # noqa: BLE001 - counted
                errors += 1
                return
            lat.append((time.perf_counter() - t) * 1000.0)
            status[str(code)] = status.get(str(code), 0) + 1
            if code >= 500:
                errors += 1
            elif code == 200 and b'"fallback":"popular"' in body:
                fallbacks += 1

        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as sess:
            for p in paths[:20]:  # open connections; not counted
                async with sess.get(base + p) as resp:
                    await resp.read()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            t0 = time.perf_counter()
            tasks = []
            for i, p in enumerate(paths):
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(sess, p, due)))
            await asyncio.gather(*tasks)
            span = time.perf_counter() - t0
        return {"latencies_ms": lat, "late_ms_max": round(max(late) * 1000.0, 2) if late
                else None, "status": status, "fallbacks": fallbacks, "errors": errors,
                "span_s": span}

    out.put(asyncio.run(go()))


def request_paths(users: list[str], platforms: list[str], n: int, unknown: float,
                  seed: int) -> list[str]:
    rnd = random.Random(seed)
    paths = []
    for _ in range(n):
        if rnd.random() < unknown or not users:
            u = f"unknown-{rnd.getrandbits(128):032x}"
        else:
            u = rnd.choice(users)
        q = f"?platform={rnd.choice(platforms)}"
        if rnd.random() < 0.2:
            q += "&explain=1"
        paths.append(f"/recs/{u}{q}")
    return paths


# ------------------------------------------------------------------ the run


def pct(xs: list[float] | np.ndarray, q: float) -> float | None:
    a = np.asarray(xs, dtype=np.float64)
    return round(float(np.percentile(a, q)), 2) if a.size else None


def run(a: argparse.Namespace) -> dict[str, Any]:
    from streamed import scrape, start_loop
    from throughput import cpu_ticks

    from consumers.cache import RecsCache
    from producers.replay import Replayer, Source
    from producers.simulate import SimConfig, simulate
    from streams.platforms import load_platforms
    from streams.settings import Settings
    from streams.topics import Topics
    from xrec.dev import Collector
    from xrec.stack import (
        Service,
        _popen,
        free_port,
    )

    class TimedCollector(Collector):
        """Also keeps (produced_at, latency) per recommendation, to split by window."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.stamps: list[tuple[float, float]] = []

        def _take(self, topic: str, value: bytes) -> None:
            super()._take(topic, value)
            if topic in recs_topics:
                obj = json.loads(value)
                with self.lock:
                    self.stamps.append((obj["produced_at"],
                                        (obj["published_at"] - obj["produced_at"]) * 1000.0))

    wd = Path(tempfile.mkdtemp(prefix="xrec-recs-api-"))
    settings = Settings()
    topics, platforms = Topics(settings), load_platforms(settings.platforms_path)
    recs_topics = {topics.recs(p) for p in platforms}
    span = a.warmup + 3 * a.window
    man = simulate(SimConfig(events=int(a.rate * span), seed=a.seed), wd / "sim")
    started: list[Any] = []
    try:
        log("starting the stack and the workers, loading the catalogs ...")
        tansu, redis, workers, port, env = start_loop(wd, settings, topics, man, started)
        serving = workers[0]
        api_port = port
        if a.serve == "standalone":
            api_port = free_port()
            proc_api, log_api, fh_api = _popen("api", [
                sys.executable, "-m", "streams.agents.api", "--port", str(api_port)], wd,
                {**os.environ, **env})
            started.append(Service("api", proc_api, "", log_api, fh_api))
            _wait_http(f"http://127.0.0.1:{api_port}/healthz", 30)
        cache = RecsCache(redis.url, settings.redis_prefix)
        rep = Replayer(tansu.url)
        sim = wd / "sim"
        col = TimedCollector(tansu.url, sorted(recs_topics), topics.deadletter,
                             from_beginning=True)
        col.start()

        log(f"streaming {man['events']:,} events at {a.rate:.0f}/s: {a.warmup:.0f} s warm-up, "
            f"then quiet / {a.req_rate:.0f} requests/s / quiet, {a.window:.0f} s each ...")
        sources = [Source(sim / f, topics.events(p), platforms[p])
                   for p, f in man["files"]["events"].items()]
        replayer = threading.Thread(target=rep.replay, kwargs={
            "sources": sources, "rate": a.rate, "progress": False}, daemon=True)
        t0 = time.time()
        replayer.start()
        bounds = [t0 + a.warmup + i * a.window for i in range(4)]
        names = ("quiet_before", "load", "quiet_after")
        marks: list[tuple[float, int, int]] = []  # (wall time, events_applied, cpu ticks)
        proc = None
        q: Any = None
        for i, b in enumerate(bounds):
            time.sleep(max(0.0, b - time.time()))
            marks.append((time.time(), cache.stats().get("events_applied", 0),
                          cpu_ticks(serving.pid)))
            if i == 0:  # after the warm-up: users to ask for; fires from bounds[1]
                users = sorted(cache.r.srandmember(f"{settings.redis_prefix}users", 2000))
                paths = request_paths(users, list(platforms), int(a.req_rate * a.window),
                                      a.unknown, a.seed)
                ctx = mp.get_context("spawn")
                q = ctx.Queue()
                proc = ctx.Process(target=_loadgen, args=(
                    f"http://127.0.0.1:{api_port}", paths, a.req_rate, bounds[1], q),
                    daemon=True)
                proc.start()
                log(f"    load process started ({len(users):,} known users sampled)")
        res = q.get(timeout=a.window + 60) if q is not None else {}
        if proc is not None:
            proc.join(10)
        replayer.join(timeout=a.window + 60)
        rep.close()
        time.sleep(2.0)  # the last windows' recommendations reach the collector
        col.stop()
        col.join(5)
        m = scrape(port)
    finally:
        for svc in reversed(started):
            svc.stop()

    hz = os.sysconf("SC_CLK_TCK")
    windows: dict[str, dict[str, Any]] = {}
    with col.lock:
        stamps = list(col.stamps)
    for i, name in enumerate(names):
        (w0, n0, c0), (w1, n1, c1) = marks[i], marks[i + 1]
        lat = [x for p, x in stamps if w0 <= p < w1]
        windows[name] = {"events_applied_per_s": round((n1 - n0) / (w1 - w0), 1),
                         "event_to_rec_ms_p50": pct(lat, 50),
                         "event_to_rec_ms_p99": pct(lat, 99), "recommendations": len(lat),
                         "recommend_worker_cpu_percent": round(100.0 * (c1 - c0) / hz
                                                               / (w1 - w0), 1)}
    lat_ms = res.get("latencies_ms", [])
    quiet = [x for p, x in stamps if marks[0][0] <= p < marks[1][0]
             or marks[2][0] <= p < marks[3][0]]
    cnt = sum(v for k, v in m.items() if k.startswith("xrec_api_request_ms_count"))
    tot = sum(v for k, v in m.items() if k.startswith("xrec_api_request_ms_sum"))
    applied = windows["load"]["events_applied_per_s"]
    p99 = pct(lat_ms, 99)
    return {"serve": a.serve, "requests": len(lat_ms) + res.get("errors", 0),
            "rate_per_s": a.req_rate,
            "achieved_rate_per_s": round(len(lat_ms) / res["span_s"], 1)
            if res.get("span_s") else None,
            "latency_ms_p50": pct(lat_ms, 50), "latency_ms_p99": p99,
            "latency_ms_max": round(max(lat_ms), 2) if lat_ms else None,
            "errors": res.get("errors"), "status": res.get("status"),
            "fallbacks": res.get("fallbacks"), "client_late_ms_max": res.get("late_ms_max"),
            "events_offered_per_s": a.rate, "events_applied_per_s": applied,
            "event_to_rec_ms_p50_quiet": pct(quiet, 50),
            "event_to_rec_ms_p99_quiet": pct(quiet, 99),
            "event_to_rec_ms_p50_load": windows["load"]["event_to_rec_ms_p50"],
            "event_to_rec_ms_p99_load": windows["load"]["event_to_rec_ms_p99"],
            "server_ms_mean": round(tot / cnt, 3) if cnt else None,
            "windows": windows,
            "target_met": bool(p99 is not None and p99 <= TARGET_P99_MS
                               and applied >= TARGET_SHARE * a.rate),
            "cpus": os.cpu_count()}


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer in {timeout:.0f} s") from None
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="events/s streamed")
    ap.add_argument("--req-rate", type=float, default=200.0, help="GET /recs requests/s")
    ap.add_argument("--window", type=float, default=30.0, help="seconds per window")
    ap.add_argument("--warmup", type=float, default=15.0,
                    help="seconds streamed before the first window")
    ap.add_argument("--unknown", type=float, default=0.1,
                    help="share of requests for unknown users (404)")
    ap.add_argument("--serve", choices=("worker", "standalone"), default="worker",
                    help="who answers: the recommend worker's web port, or the page alone "
                         "in its own process (python -m streams.agents.api)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = run(a)
    log("windows " + json.dumps(out["windows"]))
    print(f"[{a.serve}] GET /recs at {a.req_rate:.0f}/s while streaming {a.rate:.0f} events/s: "
          f"p50 {out['latency_ms_p50']} ms p99 {out['latency_ms_p99']} ms max "
          f"{out['latency_ms_max']} ms, {out['errors']} errors, {out['status']}; applied "
          f"{out['events_applied_per_s']}/s; event→rec p99 quiet "
          f"{out['event_to_rec_ms_p99_quiet']} ms, under load "
          f"{out['event_to_rec_ms_p99_load']} ms")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
