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
cpu_us_per_event: CPU microseconds per applied event of each process during (b)). The bare
agent runs with xrec's fast record delivery (``XREC_FAST_DRAIN``, streams/fastdrain.py) as
the workers do; ``bare_stock_events_per_s`` / ``ratio_vs_stock``: the same agent with
Faust's delivery as shipped, measured in the same run. ``bare_after_events_per_s``: the
bare agent of (a) timed again right after (b), to show how far the peer moved meanwhile
(the ratio stays against (a)).

``--explain-ab N``: after (b), N more pairs of (b) runs, explanations off
(``XREC_EXPLAIN_TOP=0``) then on (the default), alternating on fresh stacks; adds
``explain`` to the JSON: each run's rate and the cost, 1 - on/off, per pair and overall.

``--tls``: (b) and (c) also with TLS and authentication everywhere, on the stack ``xrec dev
--tls`` runs (xrec/dev.py start_secure_stack: Tansu behind the Python TLS + SASL/PLAIN
front, Redis 7 with TLS and an ACL user; every client SASL_SSL / rediss://). (b) alternates
plaintext / TLS on fresh stacks, ``--tls-pairs`` pairs (the first plaintext run is the usual
(b)); (c) runs plaintext, then TLS. Adds ``tls`` to the JSON: xrec_events_per_s (mean of the
TLS runs), plaintext_events_per_s (mean of the plaintext runs of the pairs), vs_plaintext
(their ratio), ratio (TLS xrec / bare, as the top-level ratio), latency_ms_p50 / p99,
cpu_us_per_event of each process (the front's own: ``tlsfront``), front_cpu_s (the front's
CPU seconds per (b) run) and the pairs. The bare agent (a) stays plaintext.
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
from streams import security  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import Topics  # noqa: E402
from xrec.dev import Collector, start_secure_stack, start_workers  # noqa: E402
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


def bare_rate(bootstrap: str, files: list[Path], n: int, wd: Path, stock: bool = False
              ) -> float:
    """``stock``: without xrec's fast record delivery (XREC_FAST_DRAIN=0), as Faust ships."""
    from kafka import KafkaConsumer, TopicPartition

    # as many partitions as xrec's high-volume topics get on this broker: the same broker cost
    create_topics(bootstrap, ["bench.in", "bench.out"], embedded_partitions(Settings()))
    rep = Replayer(bootstrap, linger_ms=LINGER_MS)
    sent = 0
    for f in files:
        for raw in read_records(f):
            if sent >= n:
                break
            rep.send("bench.in", raw)
            sent += 1
    rep.close()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "BARE_IN": "bench.in",
           "BARE_OUT": "bench.out", "PYTHONUNBUFFERED": "1"}
    if stock:
        env["XREC_FAST_DRAIN"] = "0"
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
    (DESIGN.md), so phases must not inherit each other's topics. ``tls``: the stack of
    ``xrec dev --tls`` (the broker behind the TLS + SASL front, Redis with TLS and an ACL
    user); ``bootstrap`` / ``redis_url`` / ``kafka_kw`` / ``client_env`` are what clients
    use either way."""

    def __init__(self, wd: Path, tls: bool = False) -> None:
        self.wd = wd
        self.started: list = []
        self.settings = Settings()
        self.kafka_kw: dict = {}
        self.client_env: dict[str, str] = {}
        if tls:
            sec = start_secure_stack(wd)
            self.started += sec.services
            self.tansu, self.redis = sec.services[0], sec.services[2]
            sec_settings = sec.settings(self.settings)
            self.bootstrap, self.redis_url = sec.bootstrap, sec_settings.redis_url or ""
            self.kafka_kw = security.kafka_kwargs(sec_settings)
            self.client_env = sec.env
        else:
            self.tansu = self._keep(start_tansu(wd))
            self.redis = self._keep(start_redis(wd))
            self.bootstrap, self.redis_url = self.tansu.url, self.redis.url
        self.topics = Topics(self.settings)
        self.platforms = load_platforms()
        plan = self.topics.plan(self.platforms, embedded_partitions(self.settings))
        create_topics(self.bootstrap, plan, plan, security=self.kafka_kw)

    def _keep(self, svc):  # type: ignore[no-untyped-def]
        self.started.append(svc)
        return svc

    def worker(self, wait: bool = True, **extra: str):  # type: ignore[no-untyped-def]
        """The workers `xrec dev` runs (recommend; normalize + catalog; train); returns the
        recommend one (``wait``: once the others are ready). ``extra``: environment."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "REDIS_URL": self.redis_url,
               "XREC_ENV": "dev", "XREC_LOG_LEVEL": "INFO", **self.client_env, **extra}
        workers = start_workers(self.wd, env, self.settings)
        for w in workers:
            self._keep(w)
        for w in workers[1:] if wait else ():
            wait_worker_ready(self.redis_url, self.settings.redis_prefix, w)
        return workers[0]

    def sources(self, sim: Path, man: dict) -> list[Source]:
        return [Source(sim / f, self.topics.events(p), self.platforms[p])
                for p, f in man["files"]["events"].items()]

    def stop(self) -> None:
        for svc in reversed(self.started):
            svc.stop()


def loop_rate(wd: Path, man: dict, tls: bool = False, cpu_s: dict | None = None, **env: str
              ) -> tuple[float, dict[str, float]]:
    """Phase (b) on a fresh stack: events/s of the whole loop over the pre-loaded backlog
    and CPU µs per applied event by process (``cpu_s``, when given, gets each process's CPU
    seconds over the same window)."""
    st = Stack(wd, tls=tls)
    try:
        rep = Replayer(st.bootstrap, linger_ms=LINGER_MS, security=st.kafka_kw)
        rep.replay(st.sources(wd.parent / "sim", man), progress=False)
        rep.close()
        st.worker(wait=False, **env)  # measured from its first applied event: poll from now
        cache = RecsCache(st.redis_url)
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
        if cpu_s is not None:
            cpu_s.update({k: round((cpu_ticks(v) - c0[k]) / hz, 2) for k, v in procs.items()})
    finally:
        st.stop()
    return xrec, cpu_us


def latency(wd: Path, sim: Path, man: dict, rate: float, tls: bool = False
            ) -> tuple[float, float]:
    """Phase (c) on a fresh stack: event produce time → recommendation publish time."""
    st = Stack(wd, tls=tls)
    try:
        w = st.worker()
        wait_worker_ready(st.redis_url, st.settings.redis_prefix, w)
        col = Collector(st.bootstrap, [st.topics.recs(p) for p in st.platforms],
                        st.topics.deadletter, from_beginning=True, security=st.kafka_kw)
        col.start()
        rep = Replayer(st.bootstrap, linger_ms=LINGER_MS, security=st.kafka_kw)
        rep.replay(st.sources(sim, man), rate=rate, progress=False)
        rep.close()
        cache = RecsCache(st.redis_url)
        deadline = time.monotonic() + 120
        while (cache.stats().get("events_applied", 0) < man["valid_events"]
               and time.monotonic() < deadline):
            time.sleep(0.1)
        time.sleep(1.0)
        col.stop()
        with col.lock:
            lat = np.array(col.latencies_ms)
    finally:
        st.stop()
    p50, p99 = (float(x) for x in np.percentile(lat, [50, 99]))
    log(f"    latency{' (TLS)' if tls else ''} p50 {p50:.1f} ms, p99 {p99:.1f} ms over "
        f"{lat.size:,} recommendation records")
    return p50, p99


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
    ap.add_argument("--tls", action="store_true",
                    help="(b) and (c) with TLS + authentication too (xrec dev --tls's stack)")
    ap.add_argument("--tls-pairs", type=int, default=2, metavar="N",
                    help="with --tls: N pairs of (b), plaintext then TLS, alternating")
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
    st = Stack(wd / "a-stock")
    try:
        bare_stock = bare_rate(st.tansu.url, files, a.events, wd / "a-stock", stock=True)
    finally:
        st.stop()
    log(f"    bare, stock Faust delivery (XREC_FAST_DRAIN=0): {bare_stock:,.0f} events/s")

    log(f"(b) xrec loop over {a.events:,} events ...")
    xrec, cpu_us = loop_rate(wd / "b", man)
    log(f"    xrec: {xrec:,.0f} events/s; CPU µs per applied event by process: {cpu_us} "
        f"(total {sum(cpu_us.values()):,.0f})")
    # the peer again, right after: on this box it moves by up to a third within minutes, so
    # a reader sees how much of the ratio is the peer (the ratio stays against (a))
    log("(a) bare pass-through again, after (b) ...")
    st = Stack(wd / "a-after")
    try:
        bare_after = bare_rate(st.tansu.url, files, a.events, wd / "a-after")
    finally:
        st.stop()
    log(f"    bare after: {bare_after:,.0f} events/s (ratio against it "
        f"{xrec / bare_after:.2f})")
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
    tls_pairs: list[dict] = []
    if a.tls:
        for n in range(max(1, a.tls_pairs)):
            if n == 0:
                plain, c_plain = xrec, cpu_us  # the usual (b) is the first pair's plaintext
            else:
                log(f"(b) xrec loop, plaintext (pair {n + 1}) ...")
                plain, c_plain = loop_rate(wd / f"b-plain{n}", man)
            log(f"(b) xrec loop with TLS + SASL (pair {n + 1}) ...")
            secs: dict[str, float] = {}
            tls, c_tls = loop_rate(wd / f"b-tls{n}", man, tls=True, cpu_s=secs)
            front_s = secs.get("tlsfront", 0.0)
            log(f"    plaintext {plain:,.0f} / TLS {tls:,.0f} events/s ({tls / plain:.2f}); "
                f"CPU µs/event TLS {c_tls} (total {sum(c_tls.values()):,.0f} vs "
                f"{sum(c_plain.values()):,.0f}); the front {front_s:.1f} CPU s")
            tls_pairs.append({"plaintext_events_per_s": round(plain, 1),
                              "tls_events_per_s": round(tls, 1),
                              "vs_plaintext": round(tls / plain, 3),
                              "cpu_us_per_event_plaintext": c_plain,
                              "cpu_us_per_event_tls": c_tls, "front_cpu_s": round(front_s, 2)})

    log(f"(c) latency at {a.rate:.0f} events/s over {a.latency_events:,} events ...")
    man2 = simulate(SimConfig(events=a.latency_events, seed=2), wd / "sim2")
    p50, p99 = latency(wd / "c", wd / "sim2", man2, a.rate)
    if a.tls:
        log(f"(c) with TLS at {a.rate:.0f} events/s ...")
        tls_p50, tls_p99 = latency(wd / "c-tls", wd / "sim2", man2, a.rate, tls=True)
    out = {"bare_events_per_s": round(bare, 1), "xrec_events_per_s": round(xrec, 1),
           "ratio": round(xrec / bare, 3), "latency_ms_p50": round(p50, 1),
           "latency_ms_p99": round(p99, 1), "offered_rate": a.rate, "events": a.events,
           "latency_events": a.latency_events, "linger_ms": a.linger_ms,
           "cpus": os.cpu_count(), "cpu_us_per_event": cpu_us,
           # the bare agent above runs xrec's fast record delivery too (the ratio compares
           # like with like); this one is Faust as shipped
           "bare_stock_events_per_s": round(bare_stock, 1),
           "ratio_vs_stock": round(xrec / bare_stock, 3),
           # the same bare agent as (a), timed again right after (b)
           "bare_after_events_per_s": round(bare_after, 1)}
    if explain is not None:
        out["explain"] = explain
    print(f"bare {bare:,.0f} ev/s | xrec {xrec:,.0f} ev/s | ratio {out['ratio']:.2f} | "
          f"p50 {p50:.1f} ms p99 {p99:.1f} ms at {a.rate:.0f} ev/s | linger {a.linger_ms} ms")
    if a.tls:
        plain_m = float(np.mean([p["plaintext_events_per_s"] for p in tls_pairs]))
        tls_m = float(np.mean([p["tls_events_per_s"] for p in tls_pairs]))
        cpu_tls = {k: round(float(np.mean([p["cpu_us_per_event_tls"].get(k, 0.0)
                                           for p in tls_pairs])), 1)
                   for k in tls_pairs[0]["cpu_us_per_event_tls"]}
        cpu_plain = {k: round(float(np.mean([p["cpu_us_per_event_plaintext"].get(k, 0.0)
                                             for p in tls_pairs])), 1)
                     for k in tls_pairs[0]["cpu_us_per_event_plaintext"]}
        out["tls"] = {"xrec_events_per_s": round(tls_m, 1),
                      "plaintext_events_per_s": round(plain_m, 1),
                      "vs_plaintext": round(tls_m / plain_m, 3),
                      "ratio": round(tls_m / bare, 3),
                      "latency_ms_p50": round(tls_p50, 1), "latency_ms_p99": round(tls_p99, 1),
                      "cpu_us_per_event": cpu_tls,
                      "front_cpu_us_per_event": cpu_tls.get("tlsfront", 0.0),
                      "front_cpu_s": [p["front_cpu_s"] for p in tls_pairs],
                      "pairs": tls_pairs}
        w = 12
        print(f"{'':<22}{'plaintext':>{w}}{'TLS+SASL':>{w}}")
        print(f"{'xrec events/s':<22}{plain_m:>{w},.0f}{tls_m:>{w},.0f}   "
              f"(TLS/plaintext {tls_m / plain_m:.2f}, mean of {len(tls_pairs)} alternating "
              "pairs)")
        print(f"{'ratio to bare':<22}{plain_m / bare:>{w}.2f}{tls_m / bare:>{w}.2f}")
        print(f"{'latency p50 ms':<22}{p50:>{w}.1f}{tls_p50:>{w}.1f}")
        print(f"{'latency p99 ms':<22}{p99:>{w}.1f}{tls_p99:>{w}.1f}")
        for k in cpu_tls:
            print(f"{'CPU µs/event ' + k:<22}{cpu_plain.get(k, 0.0):>{w}.1f}"
                  f"{cpu_tls[k]:>{w}.1f}")
        print(f"{'CPU µs/event total':<22}{sum(cpu_plain.values()):>{w}.1f}"
              f"{sum(cpu_tls.values()):>{w}.1f}")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
