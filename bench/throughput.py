"""Throughput and latency of the full xrec loop vs a bare Faust pass-through agent.

On a fresh embedded stack (Tansu + Redis), in one run:

(a) bare: N events pre-loaded on an input topic; a bare Faust agent copies each to an
    output topic. Rate = N / (last output - first output), from record timestamps.
(b) xrec: the same N events (the simulator's, three platforms) pre-loaded on the platform
    topics; the xrec worker normalizes, updates state, scores and publishes. Rate =
    N / (time from first to last applied event), polled in Redis from the workers' start.
(c) latency: with the xrec worker warm, M fresh events replayed at a fixed offered rate;
    event produce time → recommendation publish time, p50 / p99.

``--json``: the last stdout line is one JSON object with the keys bare_events_per_s,
xrec_events_per_s, ratio, latency_ms_p50, latency_ms_p99 (plus details, among them
cpu_us_per_event: CPU microseconds per applied event of each process during (b)).

``--explain-ab N``: after (b), N more pairs of (b) runs, explanations off
(``XREC_EXPLAIN_TOP=0``) then on (the default), alternating on fresh stacks; adds
``explain`` to the JSON: each run's rate and the cost, 1 - on/off, per pair and overall.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from consumers.cache import RecsCache  # noqa: E402
from producers.files import read_records  # noqa: E402
from producers.replay import REPLAY_LINGER_MS, Replayer, Source  # noqa: E402
from producers.simulate import SimConfig, simulate  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import Topics  # noqa: E402
from xrec.dev import Collector, start_workers  # noqa: E402
from xrec.stack import (  # noqa: E402
    _popen,
    create_topics,
    embedded_partitions,
    start_redis,
    start_tansu,
    wait_worker_ready,
)

LINGER_MS = REPLAY_LINGER_MS  # --linger-ms sets it (default: XREC_PRODUCER_LINGER_MS)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_ticks(pid: int) -> int:
    """User + system CPU of a process in clock ticks (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            x = f.read().rsplit(")", 1)[1].split()
        return int(x[11]) + int(x[12])
    except OSError:
        return 0


def bare_rate(bootstrap: str, files: list[Path], n: int, wd: Path) -> float:
    from kafka import KafkaConsumer, TopicPartition

    # as many partitions as xrec's high-volume topics get on this broker: the same broker cost
    create_topics(bootstrap, ["bench.in", "bench.out"], embedded_partitions(Settings()))
    rep = Replayer(bootstrap, linger_ms=LINGER_MS)
    sent = 0
    for f in files:
        for raw in read_records(f):
            if sent >= n:
                break
            rep.producer.send("bench.in", value=raw)
            sent += 1
    rep.close()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "BARE_IN": "bench.in",
           "BARE_OUT": "bench.out", "PYTHONUNBUFFERED": "1"}
    proc, _, fh = _popen("bare", [sys.executable, str(ROOT / "bench" / "bare_app.py"),
                                  "worker"], wd, env)
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      fetch_max_wait_ms=50)
    tps = [TopicPartition("bench.out", p) for p in range(4)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    stamps: list[int] = []
    deadline = time.monotonic() + 300
    try:
        while len(stamps) < sent and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=200).values():
                stamps += [r.timestamp for r in recs]
    finally:
        c.close()
        proc.terminate()
        proc.wait(30)
        fh.close()
    if len(stamps) < sent:
        raise SystemExit(f"bare agent produced {len(stamps)}/{sent} records")
    return sent / ((max(stamps) - min(stamps)) / 1000.0)


class Stack:
    """A fresh Tansu + Redis per phase: Tansu slows down as record batches accumulate
    (DESIGN.md), so phases must not inherit each other's topics."""

    def __init__(self, wd: Path) -> None:
        self.wd = wd
        self.started: list = []
        self.tansu = self._keep(start_tansu(wd))
        self.redis = self._keep(start_redis(wd))
        self.settings = Settings()
        self.topics = Topics(self.settings)
        self.platforms = load_platforms()
        plan = self.topics.plan(self.platforms, embedded_partitions(self.settings))
        create_topics(self.tansu.url, plan, plan)

    def _keep(self, svc):  # type: ignore[no-untyped-def]
        self.started.append(svc)
        return svc

    def worker(self, wait: bool = True, **extra: str):  # type: ignore[no-untyped-def]
        """The workers `xrec dev` runs (recommend; normalize + catalog; train); returns the
        recommend one (``wait``: once the others are ready). ``extra``: environment."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.tansu.url, "REDIS_URL": self.redis.url,
               "XREC_ENV": "dev", "XREC_LOG_LEVEL": "INFO", **extra}
        workers = start_workers(self.wd, env, self.settings)
        for w in workers:
            self._keep(w)
        for w in workers[1:] if wait else ():
            wait_worker_ready(self.redis.url, self.settings.redis_prefix, w)
        return workers[0]

    def sources(self, sim: Path, man: dict) -> list[Source]:
        return [Source(sim / f, self.topics.events(p), self.platforms[p])
                for p, f in man["files"]["events"].items()]

    def stop(self) -> None:
        for svc in reversed(self.started):
            svc.stop()


def loop_rate(wd: Path, man: dict, **env: str) -> tuple[float, dict[str, float]]:
    """Phase (b) on a fresh stack: events/s of the whole loop over the pre-loaded backlog
    and CPU µs per applied event by process."""
    st = Stack(wd)
    try:
        rep = Replayer(st.tansu.url, linger_ms=LINGER_MS)
        rep.replay(st.sources(wd.parent / "sim", man), progress=False)
        rep.close()
        st.worker(wait=False, **env)  # measured from its first applied event: poll from now
        cache = RecsCache(st.redis.url)
        procs = {svc.name: svc.pid for svc in st.started}
        first = last = None
        c0: dict[str, int] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            n = cache.stats().get("events_applied", 0)
            now = time.monotonic()
            if n > 0 and first is None:
                first = (now, n)
                c0 = {k: cpu_ticks(v) for k, v in procs.items()}
            if n >= man["valid_events"]:
                last = (now, n)
                break
            time.sleep(0.05)
        if first is None or last is None:
            raise SystemExit("the xrec worker did not apply every event in time")
        if last[1] - first[1] < man["valid_events"] // 2:
            raise SystemExit(f"only {last[1] - first[1]} of {man['valid_events']} events "
                             "were applied while observed: use more --events")
        xrec = (last[1] - first[1]) / max(last[0] - first[0], 1e-9)
        hz = os.sysconf("SC_CLK_TCK")
        cpu_us = {k: round(1e6 * (cpu_ticks(v) - c0[k]) / hz / max(1, last[1] - first[1]), 1)
                  for k, v in procs.items()}
    finally:
        st.stop()
    return xrec, cpu_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.
                                 RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10000, help="events for the rate runs")
    ap.add_argument("--latency-events", type=int, default=6000,
                    help="events for the latency phase (30 s at 200/s)")
    ap.add_argument("--rate", type=float, default=200.0, help="offered rate for latency")
    ap.add_argument("--linger-ms", type=int, default=None,
                    help="producer linger for every producer here (bare agent, xrec worker, "
                         "replay); default: xrec's XREC_PRODUCER_LINGER_MS")
    ap.add_argument("--explain-ab", type=int, default=0, metavar="N",
                    help="N more pairs of (b): explanations off, then on (their cost)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.linger_ms is None:
        a.linger_ms = Settings().producer_linger_ms
    os.environ["XREC_PRODUCER_LINGER_MS"] = str(a.linger_ms)  # inherited by the workers
    global LINGER_MS
    LINGER_MS = a.linger_ms

    wd = Path(tempfile.mkdtemp(prefix="xrec-bench-"))
    man = simulate(SimConfig(events=a.events, seed=1), wd / "sim")
    files = [wd / "sim" / f for f in man["files"]["events"].values()]

    log(f"(a) bare pass-through over {a.events:,} events ...")
    st = Stack(wd / "a")
    try:
        bare = bare_rate(st.tansu.url, files, a.events, wd / "a")
    finally:
        st.stop()
    log(f"    bare: {bare:,.0f} events/s")

    log(f"(b) xrec loop over {a.events:,} events ...")
    xrec, cpu_us = loop_rate(wd / "b", man)
    log(f"    xrec: {xrec:,.0f} events/s; CPU µs per applied event by process: {cpu_us} "
        f"(total {sum(cpu_us.values()):,.0f})")
    explain = None
    if a.explain_ab:
        pairs = []
        top = Settings.model_fields["explain_top"].default  # "on" = the default, whatever
        for n in range(a.explain_ab):                        # the shell's environment says
            off, c_off = loop_rate(wd / f"b-off{n}", man, XREC_EXPLAIN_TOP="0")
            on, c_on = loop_rate(wd / f"b-on{n}", man, XREC_EXPLAIN_TOP=str(top))
            log(f"    explanations off {off:,.0f} / on {on:,.0f} events/s "
                f"(recommend worker CPU µs/event {c_off.get('worker')} / {c_on.get('worker')})")
            pairs.append({"off_events_per_s": round(off, 1), "on_events_per_s": round(on, 1),
                          "cost": round(1 - on / off, 3),
                          "worker_cpu_us": [c_off.get("worker"), c_on.get("worker")]})
        off_sum = sum(p["off_events_per_s"] for p in pairs)
        on_sum = sum(p["on_events_per_s"] for p in pairs)
        explain = {"pairs": pairs, "cost": round(1 - on_sum / off_sum, 3), "top": top}

    log(f"(c) latency at {a.rate:.0f} events/s over {a.latency_events:,} events ...")
    man2 = simulate(SimConfig(events=a.latency_events, seed=2), wd / "sim2")
    st = Stack(wd / "c")
    try:
        w = st.worker()
        wait_worker_ready(st.redis.url, st.settings.redis_prefix, w)
        col = Collector(st.tansu.url, [st.topics.recs(p) for p in st.platforms],
                        st.topics.deadletter, from_beginning=True)
        col.start()
        rep = Replayer(st.tansu.url, linger_ms=LINGER_MS)
        rep.replay(st.sources(wd / "sim2", man2), rate=a.rate, progress=False)
        rep.close()
        cache = RecsCache(st.redis.url)
        deadline = time.monotonic() + 120
        while (cache.stats().get("events_applied", 0) < man2["valid_events"]
               and time.monotonic() < deadline):
            time.sleep(0.1)
        time.sleep(1.0)
        col.stop()
        with col.lock:
            lat = np.array(col.latencies_ms)
    finally:
        st.stop()
    p50, p99 = (float(x) for x in np.percentile(lat, [50, 99]))
    log(f"    latency p50 {p50:.1f} ms, p99 {p99:.1f} ms over {lat.size:,} "
        "recommendation records")
    out = {"bare_events_per_s": round(bare, 1), "xrec_events_per_s": round(xrec, 1),
           "ratio": round(xrec / bare, 3), "latency_ms_p50": round(p50, 1),
           "latency_ms_p99": round(p99, 1), "offered_rate": a.rate, "events": a.events,
           "latency_events": a.latency_events, "linger_ms": a.linger_ms,
           "cpus": os.cpu_count(), "cpu_us_per_event": cpu_us}
    if explain is not None:
        out["explain"] = explain
    print(f"bare {bare:,.0f} ev/s | xrec {xrec:,.0f} ev/s | ratio {out['ratio']:.2f} | "
          f"p50 {p50:.1f} ms p99 {p99:.1f} ms at {a.rate:.0f} ev/s | linger {a.linger_ms} ms")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
