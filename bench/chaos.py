"""Chaos: crashes, outages and hostile input on the embedded stack, checked against an
uninterrupted run.

On a fresh embedded stack (Tansu + a durable Redis: append-only file, fsync always):

1. ``xrec simulate`` writes ``--events`` events (three platforms) with ``--hostile`` of
   them followed by a hostile record: 18 kinds of malformed events (each with the
   dead-letter reason it must get) and re-sent events (same event id, must apply once).
2. A worker (all agents, learned model on unless ``--no-model``) consumes them while they
   are replayed at ``--rate``. At random points of its progress (seeded) the benchmark
   kills the worker with SIGKILL ``--kills`` times (and starts a new one), kills Redis
   with SIGKILL and restarts it ``--down-s`` later on the same port and files, and pauses
   the broker (SIGSTOP) for ``--down-s``.
3. When everything has drained, the same valid events go through an uninterrupted
   in-process run (normalize → the same state script) under another Redis prefix, and
   the two final user states are compared.

Several workers (``--workers N``, default 1): N workers with every agent in one consumer
group share the partitions (the high-volume topics get the smallest multiple of N that
is at least 4: 4, 4, 6 for N = 1, 2, 3; Faust's sticky assignor gives a worker at most
ceil(partitions / N), so 4 partitions over 3 workers can leave one with none). A kill
then SIGKILLs one of them chosen at random (seeded); the
survivors take its partitions over when its session expires (the first rebalance); once
every partition is served again a new worker is started and joins (the second rebalance:
partitions move to it). With one worker, a kill starts the new worker at once, as before.
The train agent runs in every worker; only the holder of the head lease publishes
(``streams/agents/train.py``), so the head-version checks hold with N trainers too.

Figures (``--json``: the last stdout line is one JSON object with these keys, then the
rebalance figures below):

* ``events``: records replayed (valid + hostile); ``kills``: worker SIGKILLs done;
* ``lost``: events the uninterrupted run applied that the chaos run did not;
* ``double_applied``: applications beyond one per event (the applied counter minus the
  distinct applied event ids, plus per-user event counts above the reference);
* ``state_equal``: every user's state is identical (users, applied event-id fingerprints
  per platform in arrival order, recent positives, seen items, counters, the cross-platform
  history)
  and per-platform popularity agrees (up to float summation order);
* ``deadlettered_expected`` (from the simulator's ground truth) and ``deadlettered``:
  distinct source records on the dead-letter topic (a crash can publish one twice:
  at-least-once; its source coordinates identify it);
* ``worker_crashes_on_bad_input``: worker exits we did not cause plus agent crashes in
  the worker logs (any cause counts).

The stream has no ingest-topic events: they carry no key, so one person's events there
have no defined order and an uninterrupted run could not be the same run. A comparison
control (one event lost and one applied twice, planted in a copy of the reference) shows
the comparison sees both.

Rebalance figures (new keys after those above; ``workers``: N):

* ``kill_to_served_s``, one per kill: from the kill (the SIGKILLed process reaped) until
  every partition with records still to serve was served again. Served: for a partition
  of ``xrec.events.unified`` (the recommend agent), its applied-offset watermark in Redis
  advanced (polled every 0.1 s, compared with a sample taken 0.2 s after the kill, when
  any script the dead worker sent has run); for a partition of ``xrec.events.<platform>``
  (the normalize agent), an interaction from it was published on the unified topic with
  a record timestamp after the kill (only a live worker can produce one). A partition with
  nothing left to serve after the kill does not count. Partitions the survivors already
  owned are served again within one sample (~0.1–0.3 s), so the figure is the moved
  partitions' outage: the dead member's session timeout, the rebalance and the first
  micro-batch of the new owner. (Lag from ``ListOffsets`` is not used: Tansu's is wrong
  when a record batch holds several records, DESIGN.md.)
* ``rebalances``: per kill and per join (``kind``), ``at_s`` (seconds since the replay
  began), ``served_s`` (kills: as above; joins: the longest time any partition went
  unserved between the new worker's start and 5 s after it was ready, the pause the join's
  rebalance cost; ``gap_before_s``: the same figure over the 10 s before, for scale),
  ``partitions`` (partitions counted), ``latency_ms_max``: the worst event →
  recommendation latency (``published_at − produced_at`` of the records on
  ``xrec.recs.*``, read from outside) over the events produced from 5 s before the kill
  (joins: from the new worker's start) until 5 s after the partitions were served again
  (joins: 5 s after it was ready), and ``latency_ms_p99_before``: p99 over the events
  produced in the 30 s before that window. While the worker is behind (the default rate
  is above what it sustains) latency is dominated by the backlog.
* ``rebalance_latency_ms_max``: the worst of the windows' ``latency_ms_max``.

Not compared: co-occurrence neighbour lists (trimmed per micro-batch, so they depend on
how events were batched), the recommendation cache (TTL), offset watermarks (differ by
design), global counters (they count redeliveries).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis as redis_sync  # noqa: E402

from producers.files import read_records  # noqa: E402
from producers.replay import Replayer, Source  # noqa: E402
from producers.simulate import SimConfig, simulate  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.state import FP_WIDTH  # noqa: E402
from streams.topics import Topics  # noqa: E402
from xrec.stack import (  # noqa: E402
    Service,
    create_topics,
    sigterm_as_interrupt,
    start_redis,
    start_tansu,
    start_worker,
    wait_worker_ready,
)

KEYS = ("events", "kills", "lost", "double_applied", "state_equal", "deadlettered_expected",
        "deadlettered", "worker_crashes_on_bad_input")
#: added with --workers: the rebalance figures
REBALANCE_KEYS = ("workers", "kill_to_served_s", "rebalances", "rebalance_latency_ms_max")
PREFIX, REF = "chaos:", "ref:"
#: with several workers: seconds between the partitions served again after a kill and the
#: new worker's start (so each rebalance's window, and the 30 s before it, are its own)
JOIN_AFTER_S = 10.0
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[chaos {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Stats:
    """Reads the worker's Redis counters; tolerates Redis being down."""

    def __init__(self, url: str) -> None:
        self.r = redis_sync.Redis.from_url(url, decode_responses=True, socket_timeout=2,
                                           socket_connect_timeout=2)

    def get(self) -> dict[str, int] | None:
        try:
            return {k: int(v) for k, v in self.r.hgetall(f"{PREFIX}stats").items()}
        except (redis_sync.ConnectionError, redis_sync.TimeoutError, OSError):
            return None


def read_topic(bootstrap: str, topic: str) -> list[tuple[int, int, bytes]]:
    """Every record of a topic as (partition, offset, value)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      fetch_max_wait_ms=100)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
        if not tps:
            return []
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list[tuple[int, int, bytes]] = []
        idle = time.monotonic()
        while time.monotonic() - idle < 3.0:
            got = c.poll(timeout_ms=300)
            for recs in got.values():
                out += [(r.partition, r.offset, r.value) for r in recs]
                idle = time.monotonic()
        return out
    finally:
        c.close()


def dump_users(r: redis_sync.Redis, prefix: str) -> dict[str, Any]:
    """Every per-user key (u:*) and the users set, with values, keyed without the prefix."""
    out: dict[str, Any] = {}
    keys = list(r.scan_iter(f"{prefix}u:*", count=5000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    types = pipe.execute()
    pipe = r.pipeline(transaction=False)
    for k, t in zip(keys, types, strict=True):
        if t == "list":
            pipe.lrange(k, 0, -1)
        elif t == "zset":
            pipe.zrange(k, 0, -1, withscores=True)
        elif t == "hash":
            pipe.hgetall(k)
        else:
            pipe.get(k)
    for k, v in zip(keys, pipe.execute(), strict=True):
        out[k[len(prefix):]] = v
    out["users"] = sorted(r.smembers(f"{prefix}users"))
    return out


def popularity(r: redis_sync.Redis, prefix: str, platforms: list[str]) -> dict[str, dict]:
    """Per platform item → score / max score: the decay anchor (first event seen) differs
    between runs, a common factor that this removes."""
    out = {}
    for p in platforms:
        z = dict(r.zrange(f"{prefix}pop:{p}", 0, -1, withscores=True))
        top = max(z.values(), default=1.0) or 1.0
        out[p] = {k: v / top for k, v in z.items()}
    return out


def popularity_equal(pa: dict[str, dict], pb: dict[str, dict]) -> bool:
    """Same items per platform, same normalised scores up to float summation order."""
    return pa.keys() == pb.keys() and all(set(pa[p]) == set(pb[p]) and all(
        math.isclose(pa[p][i], pb[p][i], rel_tol=1e-6, abs_tol=1e-9) for i in pa[p])
        for p in pa)


async def reference_run(settings: Settings, sources: list[tuple[str, Path]], history: int
                        ) -> None:
    """The uninterrupted run: each platform's log normalized and applied in order, in
    micro-batches, by the same script the worker uses."""
    from streams.normalize import Normalizer
    from streams.records import Interaction
    from streams.state import RedisState, redis_from_url

    platforms = load_platforms(settings.platforms_path)
    norm = Normalizer(settings, platforms)
    state = RedisState(redis_from_url(settings.redis_url or ""), settings, "reference")
    for p, path in sources:
        batch: list[tuple[int, Interaction]] = []
        for off, raw in enumerate(read_records(path)):
            out = norm.normalize(raw, topic=f"events.{p}", partition=0, offset=off,
                                 timestamp_ms=None, platform=p)
            if isinstance(out, Interaction):
                batch.append((0, out))
            if len(batch) >= 500:
                await state.apply(batch, history=history)
                batch = []
        if batch:
            await state.apply(batch, history=history)
    await state.r.aclose()


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Run ``a`` against reference ``b``: events lost (ids only in b), extra (only in a),
    per-user event counts above b, and every key whose value differs."""
    def eids(d: dict[str, Any]) -> set[tuple[str, str]]:
        # (user:platform key, fingerprint): the fingerprints of the applied event ids
        w = FP_WIDTH
        return {(k, v[i:i + w]) for k, v in d.items() if k.endswith(":ef") and v
                for i in range(0, len(v), w)}

    ea, eb = eids(a), eids(b)
    over = 0
    for k, v in b.items():
        if k.endswith(":stats"):
            got = a.get(k) or {}
            over += sum(max(0, int(got.get(f, 0)) - int(n)) for f, n in v.items()
                        if f.endswith(":events"))
    return {"lost": len(eb - ea), "extra": len(ea - eb), "over": over, "applied_ids": len(ea),
            "diff_keys": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))}


class Watch:
    """Observes the run from outside for the rebalance figures (module docstring): a
    thread samples the applied-offset watermarks of every unified partition in Redis every
    0.1 s; another reads the unified topic (per source partition: when an interaction from
    it was published) and the recommendation topics (produced_at, published_at)."""

    def __init__(self, bootstrap: str, redis_url: str, unified: str, recs: list[str]) -> None:
        self.bootstrap, self.redis_url, self.unified, self.recs_topics = (
            bootstrap, redis_url, unified, recs)
        self.lock = threading.Lock()
        self.samples: list[tuple[float, dict[int, int]]] = []  # (time, {q: Σ watermarks})
        self.src: dict[tuple[str, int], list[float]] = {}  # source partition → publish times
        self.recs: list[tuple[float, float]] = []  # (produced_at, published_at)
        self._stop = threading.Event()
        self.last_read = time.monotonic()  # when the topic reader last got records
        self.threads = [threading.Thread(target=self._poll_redis, daemon=True),
                        threading.Thread(target=self._read_topics, daemon=True)]

    def start(self) -> None:
        for th in self.threads:
            th.start()

    def settle(self, quiet_s: float = 3.0, timeout: float = 120.0) -> None:
        """Wait until the topic reader has read everything (nothing new for ``quiet_s``):
        on a busy box it can trail the workers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.monotonic() - self.last_read < quiet_s \
                and self.threads[1].is_alive():
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        for th in self.threads:
            th.join(10)

    def _poll_redis(self) -> None:
        r = redis_sync.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=1,
                                      socket_connect_timeout=1)
        keys: dict[str, int] = {}  # watermark key → unified partition
        scanned = 0.0
        while not self._stop.is_set():
            t = time.time()
            try:
                if t - scanned > 5.0:  # the keys appear with the first applies (any layout)
                    keys = {k: int(k.rsplit(":", 1)[1]) for k in
                            r.scan_iter(f"{PREFIX}*wm:*:{self.unified}:*", count=5000)
                            if "dlwm" not in k}
                    scanned = t
                pipe = r.pipeline(transaction=False)
                for k in keys:
                    pipe.hvals(k)
                tot: dict[int, int] = {}
                for (_, q), vals in zip(keys.items(), pipe.execute(), strict=True):
                    tot[q] = tot.get(q, 0) + sum(int(v) for v in vals)
                with self.lock:
                    self.samples.append((time.time(), tot))
            except (redis_sync.RedisError, OSError, ValueError):
                pass  # Redis down (a fault): no sample
            self._stop.wait(0.1)
        r.close()

    def _read_topics(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                          enable_auto_commit=False, fetch_max_wait_ms=200)
        try:
            tps = [TopicPartition(tp, p) for tp in [self.unified, *self.recs_topics]
                   for p in sorted(c.partitions_for_topic(tp) or [])]
            c.assign(tps)
            c.seek_to_beginning(*tps)
            while not self._stop.is_set():
                got = c.poll(timeout_ms=200)
                if got:
                    self.last_read = time.monotonic()
                for tp, recs in got.items():
                    rows = [json.loads(x.value) for x in recs]
                    with self.lock:
                        if tp.topic == self.unified:
                            for x, v in zip(recs, rows, strict=True):
                                self.src.setdefault((v["src_topic"], v["src_partition"]),
                                                    []).append(x.timestamp / 1000.0)
                        else:
                            self.recs += [(v["produced_at"], v["published_at"]) for v in rows]
        except Exception as exc:  # noqa: BLE001 - figures missing, the run goes on
            log(f"watch: topic reader stopped: {exc!r}")
        finally:
            c.close()

    # ---------------------------------------------------------------- figures

    def _service(self) -> dict[str, list[float]]:
        """Partition → the times it was seen served (unified: watermark advanced between
        samples, at the later sample; source: interactions published)."""
        out: dict[str, list[float]] = {}
        with self.lock:
            samples = list(self.samples)
            out.update({f"{t}:{p}": sorted(v) for (t, p), v in self.src.items()})
        prev: dict[int, int] = {}
        for t, tot in samples:
            for q, v in tot.items():
                if q in prev and v > prev[q]:
                    out.setdefault(f"{self.unified}:{q}", []).append(t)
                prev[q] = max(v, prev.get(q, 0))
        return out

    def served_after(self, t_kill: float) -> tuple[float | None, int]:
        """Seconds from ``t_kill`` until every partition with anything left to serve
        was served again (None: none was), and how many partitions counted."""
        first: list[float] = []
        with self.lock:
            base = next((t for t, _ in self.samples if t >= t_kill + 0.2), None)
        for name, times in self._service().items():
            after = t_kill if not name.startswith(f"{self.unified}:") else (base or math.inf)
            nxt = next((x for x in times if x > after), None)
            if nxt is not None:
                first.append(nxt)
        return (round(max(first) - t_kill, 2) if first else None), len(first)

    def all_served(self, t_kill: float) -> bool:
        """Every partition served in the 5 s before the kill was served after it (for
        the unified ones: after the sample 0.2 s after it)."""
        with self.lock:
            base = next((t for t, _ in self.samples if t >= t_kill + 0.2), None)
        if base is None:
            return False
        for name, times in self._service().items():
            after = base if name.startswith(f"{self.unified}:") else t_kill
            if any(t_kill - 5 <= x <= t_kill for x in times) and \
                    not any(x > after for x in times):
                return False
        return True

    def longest_gap(self, t0: float, t1: float) -> tuple[float | None, int]:
        """The longest time any partition served in [t0, t1] went unserved inside it."""
        gaps, n = [], 0
        for times in self._service().values():
            was = any(x < t0 for x in times)  # served before: a gap at t0 is an outage
            goes_on = any(x > t1 for x in times)  # served after: so is one at t1
            seq = [t0] * was + [x for x in times if t0 <= x <= t1] + [t1] * goes_on
            if len(seq) < 2:
                continue
            n += 1
            gaps.append(max(b - a for a, b in zip(seq, seq[1:], strict=False)))
        return (round(max(gaps), 2) if gaps else None), n

    def latency(self, t0: float, t1: float) -> tuple[float | None, float | None]:
        """Worst event → recommendation latency (ms) of the events produced in [t0, t1],
        and the p99 of those produced in the 30 s before t0."""
        with self.lock:
            recs = list(self.recs)
        win = [b - a for a, b in recs if t0 <= a <= t1]
        before = sorted(b - a for a, b in recs if t0 - 30 <= a < t0)
        p99 = before[min(len(before) - 1, int(len(before) * 0.99))] if before else None
        return (round(max(win) * 1000, 1) if win else None,
                round(p99 * 1000, 1) if p99 is not None else None)


def worker_env(bootstrap: str, redis_url: str, model: bool, epoch: str) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "REDIS_URL": redis_url, "XREC_ENV": "dev",
            "XREC_REDIS_PREFIX": PREFIX, "XREC_APP_ID": "xrec-chaos",
            "XREC_EID_KEEP": "10000000",  # a complete ledger of applied event ids
            "XREC_MODEL_ENABLED": "true" if model else "false", "XREC_STATE_EPOCH": epoch,
            "XREC_LOG_LEVEL": "INFO"}


def plan_faults(rng: random.Random, kills: int) -> list[tuple[float, str]]:
    """Fault points as fractions of the valid events applied, at least 0.06 apart."""
    names = ["kill"] * kills + ["redis", "broker"]
    rng.shuffle(names)
    while True:
        at = sorted(rng.uniform(0.08, 0.85) for _ in names)
        if all(b - a >= 0.06 for a, b in zip(at, at[1:], strict=False)):
            return list(zip(at, names, strict=True))


def main() -> None:
    with sigterm_as_interrupt():  # Ctrl-C / SIGTERM: the finally below stops what we started
        try:
            run()
        except KeyboardInterrupt:
            log("interrupted; stopped what was started")
            raise SystemExit(130) from None


def run() -> None:  # noqa: C901, PLR0912, PLR0915 - one linear script
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000, help="valid events (default 50,000)")
    ap.add_argument("--hostile", type=float, default=0.02,
                    help="share of events followed by a hostile record (default 0.02)")
    ap.add_argument("--kills", type=int, default=3, help="worker SIGKILLs (default 3)")
    ap.add_argument("--down-s", type=float, default=6.0,
                    help="seconds Redis stays down and the broker stays paused (default 6)")
    ap.add_argument("--rate", type=float, default=800.0,
                    help="replay rate, records/s (default 800)")
    ap.add_argument("--seed", type=int, default=1, help="stream and fault schedule seed")
    ap.add_argument("--workers", type=int, default=1,
                    help="workers in the one consumer group (default 1); a kill takes one "
                         "down and, once its partitions are served again, starts another")
    ap.add_argument("--no-model", action="store_true", help="popularity ⊕ co-occurrence only")
    ap.add_argument("--workdir", type=Path, help="keep logs and files here")
    ap.add_argument("--drain-timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true", help="last stdout line: the JSON figures")
    a = ap.parse_args()
    if a.kills < 0 or not 0 <= a.hostile < 1 or a.down_s < 5 or not 1 <= a.workers <= 16:
        ap.error("--kills ≥ 0, 0 ≤ --hostile < 1, --down-s ≥ 5, 1 ≤ --workers ≤ 16")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = not a.no_model
    rng = random.Random(a.seed)
    wd = a.workdir or Path(tempfile.mkdtemp(prefix="xrec-chaos-"))
    wd.mkdir(parents=True, exist_ok=True)
    log(f"working folder {wd}")
    man = simulate(SimConfig(events=a.events, malformed=a.hostile, seed=a.seed), wd / "sim")
    expected_dl = sum(man["deadletter_expected"].values())
    log(f"simulated {man['events']:,} records: {man['valid_events']:,} valid events, "
        f"{man['malformed']:,} malformed, {man['duplicates']:,} re-sent")

    services: list[Service] = []
    workers: list[Service] = []
    timeline: list[dict[str, Any]] = []
    crashes_unexpected = 0
    watch: Watch | None = None
    try:
        tansu = start_tansu(wd)
        services.append(tansu)
        redis_dir = wd / "redis"
        rsvc = start_redis(redis_dir, durable=True)
        redis_port = int(rsvc.url.rsplit(":", 1)[1].split("/")[0])
        url = rsvc.url
        s = Settings(env="dev", kafka_bootstrap_servers=tansu.url, redis_url=url,
                     redis_prefix=PREFIX, eid_keep=10_000_000, model_enabled=model)
        topics = Topics(s)
        platforms = load_platforms("")
        # a multiple of the workers, at least 4: Faust's sticky assignor gives each worker
        # at most ceil(partitions / workers), so 4 over 3 workers can be 2 / 2 / 0 (seen:
        # a joining worker left with an empty assignment); 6 over 3 is 2 / 2 / 2
        parts = a.workers * math.ceil(max(s.partitions, a.workers) / a.workers)
        plan = topics.plan(platforms, parts)
        create_topics(tansu.url, plan, plan)
        env = worker_env(tansu.url, url, model, uuid.uuid4().hex[:12])
        if parts != s.partitions:
            env["XREC_PARTITIONS"] = str(parts)
        stats = Stats(url)
        live: list[Service] = []  # the group's workers now

        def new_worker(wait: bool = True) -> Service:
            w = start_worker(wd, env, name=f"worker-{len(workers)}")
            workers.append(w)
            live.append(w)
            if wait:
                wait_worker_ready(url, PREFIX, w, timeout=180)
            return w

        for _ in range(a.workers):
            new_worker(wait=False)
        for w in live:
            wait_worker_ready(url, PREFIX, w, timeout=240)
        w = live[0]
        log(f"worker pid(s) {', '.join(str(x.pid) for x in live)} ready")
        watch = Watch(tansu.url, url, topics.unified, [topics.recs(p) for p in platforms])
        watch.start()
        victims = random.Random(a.seed + 1)  # (rng's draws stay those of one worker)
        rebalances: list[dict[str, Any]] = []

        def replace_crashed() -> int:
            n = 0
            for x in list(live):
                if not x.alive():
                    n += 1
                    log(f"worker {x.pid} exited by itself (code {x.proc.returncode}); "
                        "restarting")
                    live.remove(x)
                    new_worker()
            return n
        sim = wd / "sim"
        rep = Replayer(tansu.url)
        rep.replay([Source(sim / f, topics.catalog(p), None)
                    for p, f in man["files"]["catalog"].items()], progress=False)
        n_items = sum(man["items"].values())
        deadline = time.monotonic() + 300
        while (stats.get() or {}).get("catalog_items", 0) < n_items:
            if time.monotonic() > deadline:
                raise SystemExit(f"catalog not stored in time:\n{w.log_tail()}")
            time.sleep(0.3)
        log(f"catalog stored ({n_items:,} items)")

        ev_sources = [(p, sim / f) for p, f in man["files"]["events"].items()]
        replay_err: list[BaseException] = []

        def replay() -> None:
            try:
                rep.replay([Source(f, topics.events(p), platforms[p]) for p, f in ev_sources],
                           rate=a.rate, progress=False)
            except BaseException as exc:  # noqa: BLE001 - reported below
                replay_err.append(exc)

        faults = plan_faults(rng, a.kills)
        log("fault plan: " + ", ".join(f"{n} at {f:.0%}" for f, n in faults))
        t_replay = time.monotonic()
        t_replay_wall = time.time()
        th = threading.Thread(target=replay, daemon=True)
        th.start()
        valid = man["valid_events"]
        kills = 0
        for frac, name in faults:
            while True:
                st = stats.get() or {}
                if st.get("events_applied", 0) >= frac * valid:
                    break
                crashes_unexpected += replace_crashed()
                time.sleep(0.1)
            at = st.get("events_applied", 0)
            t = time.monotonic()
            if name == "kill":
                w = live[0] if len(live) == 1 else victims.choice(live)
                os.kill(w.pid, signal.SIGKILL)
                w.proc.wait(10)
                t_kill = time.time()
                w.stop()
                live.remove(w)
                kills += 1
                rebalances.append({"kind": "kill", "t0": t_kill, "at_applied": at})
                if not live:  # one worker: its successor starts at once, as before
                    w = new_worker()
                    log(f"SIGKILL {kills} at {at:,} applied; new worker {w.pid} ready after "
                        f"{time.monotonic() - t:.1f}s")
                else:  # the survivors take over; then a new worker joins
                    until = time.monotonic() + 60
                    while time.monotonic() < until and not watch.all_served(t_kill):
                        time.sleep(0.2)
                    time.sleep(JOIN_AFTER_S)  # the join's rebalance apart from the death's
                    log(f"SIGKILL {kills} (pid {w.pid}) at {at:,} applied; partitions "
                        f"served again after {watch.served_after(t_kill)[0]}s "
                        f"(survivors: {', '.join(str(x.pid) for x in live)})")
                    t_join = time.time()
                    w = new_worker()
                    rebalances.append({"kind": "join", "t0": t_join, "ready": time.time()})
                    log(f"new worker {w.pid} ready after {time.time() - t_join:.1f}s")

            elif name == "redis":
                rsvc.proc.send_signal(signal.SIGKILL)
                rsvc.proc.wait(10)
                rsvc.stop()
                time.sleep(a.down_s)
                rsvc = start_redis(redis_dir, port=redis_port, durable=True)
                log(f"Redis killed at {at:,} applied, restarted after "
                    f"{time.monotonic() - t:.1f}s down")
            else:
                os.kill(tansu.pid, signal.SIGSTOP)
                try:
                    time.sleep(a.down_s)
                finally:
                    os.kill(tansu.pid, signal.SIGCONT)
                log(f"broker paused at {at:,} applied for {time.monotonic() - t:.1f}s")
            timeline.append({"fault": name, "at_applied": at,
                             "down_s": round(time.monotonic() - t, 1)})
        recs_at_last_fault = (stats.get() or {}).get("recommendations", 0)
        th.join()
        rep.close()
        if replay_err:
            raise SystemExit(f"replay failed: {replay_err[0]!r}")
        log(f"replay done in {time.monotonic() - t_replay:.0f}s; draining")

        deadline = time.monotonic() + a.drain_timeout
        last: dict[str, int] | None = None
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            crashes_unexpected += replace_crashed()
            st = stats.get() or {}
            if st != last:
                last, quiet_since = st, time.monotonic()
            applied_all = st.get("events_applied", 0) >= valid
            done = applied_all and st.get("deadlettered", 0) >= expected_dl
            quiet = time.monotonic() - quiet_since
            if (done and quiet > 3.0) or (applied_all and quiet > 30.0):
                break
            time.sleep(0.3)
        else:
            log("drain timeout: reporting what arrived")
        drain_s = time.monotonic() - t_replay
        watch.settle()  # the reader has every recommendation
        watch.stop()
        for rb in rebalances:  # the rebalance figures (module docstring)
            if rb["kind"] == "kill":
                served, n = watch.served_after(rb["t0"])
                w0, w1 = rb["t0"] - 5, rb["t0"] + (served or 0) + 5
                rb.update(served_s=served, partitions=n)
            else:
                w0, w1 = rb["t0"], rb.pop("ready") + 5
                rb["served_s"], rb["partitions"] = watch.longest_gap(w0, w1)
                rb["gap_before_s"] = watch.longest_gap(w0 - 10, w0)[0]
            rb["latency_ms_max"], rb["latency_ms_p99_before"] = watch.latency(w0, w1)
            rb["at_s"] = round(rb.pop("t0") - t_replay_wall, 1)
        st = stats.get() or {}
        r = redis_sync.Redis.from_url(url, decode_responses=True)

        # --- the chaos run's results
        dls = read_topic(tansu.url, topics.deadletter)
        dl_sources = {(d["src_topic"], d["src_partition"], d["src_offset"]): d["code"]
                      for d in (json.loads(v) for _, _, v in dls)}
        by_code = Counter(dl_sources.values())
        heads: dict[str, Any] = {}
        if model:
            from models.heads import load_model

            vs = [json.loads(v)["version"] for _, _, v in
                  sorted(read_topic(tansu.url, topics.heads))]
            rb = redis_sync.Redis.from_url(url)
            blob = rb.get(f"{PREFIX}heads:blob")
            ok = False
            if blob:
                m = load_model(blob)
                ok = all(bool(p.isfinite().all()) for p in m.parameters())
            heads = {"versions": len(vs), "monotonic": all(b > a_ for a_, b in
                                                           zip(vs, vs[1:], strict=False)),
                     "final_version": int(rb.get(f"{PREFIX}heads:version") or 0),
                     "final_loads_and_finite": ok}
        logs = [x.log_path.read_text(errors="replace") if x.log_path else "" for x in workers]
        agent_crashes = sum(t.count("Crashed reason=") for t in logs)
        # Redis errors are counted in Redis too, which fails while it is down: the logs
        redis_retries = sum(t.count("redis unavailable during") for t in logs)
        for x in workers:
            x.stop()

        # --- the uninterrupted run over the same records
        log("uninterrupted in-process run")
        ref_settings = Settings(env="dev", redis_url=url, redis_prefix=REF,
                                eid_keep=10_000_000, model_enabled=model)
        asyncio.run(reference_run(ref_settings, ev_sources, s.hist_len if model else 0))
        ref_st = {k: int(v) for k, v in r.hgetall(f"{REF}stats").items()}
        a_users, b_users = dump_users(r, PREFIX), dump_users(r, REF)

        cmp = compare(a_users, b_users)
        lost, extra, diff_keys = cmp["lost"], cmp["extra"], cmp["diff_keys"]
        double = max(0, st.get("events_applied", 0) - cmp["applied_ids"]) + cmp["over"]
        pop_ok = popularity_equal(popularity(r, PREFIX, list(platforms)),
                                  popularity(r, REF, list(platforms)))
        state_equal = not diff_keys and pop_ok and bool(a_users.get("users"))
        # control: the same comparison on a copy of the reference with one event lost (its
        # id gone) and one applied twice (a counter repeated)
        k_eids = next(k for k, v in b_users.items() if k.endswith(":ef") and v)
        k_stats = k_eids.rsplit(":", 2)[0] + ":stats"
        p_ = k_eids.rsplit(":", 2)[1]
        planted = dict(b_users, **{
            k_eids: b_users[k_eids][FP_WIDTH:],
            k_stats: {**b_users[k_stats], f"{p_}:events": str(
                int(b_users[k_stats][f"{p_}:events"]) + 1)}})
        pc = compare(planted, b_users)
        control = pc["lost"] == 1 and pc["over"] == 1 and len(pc["diff_keys"]) == 2
        crashes = crashes_unexpected + agent_crashes

        print(f"chaos run: {man['events']:,} records ({valid:,} valid events, "
              f"{man['malformed']:,} malformed, {man['duplicates']:,} re-sent) at "
              f"{a.rate:,.0f}/s, seed {a.seed}, model {'on' if model else 'off'}")
        for f in timeline:
            print(f"  {f['fault']:<7} at {f['at_applied']:>7,} applied, "
                  f"{f['down_s']:>5.1f}s")
        print(f"  replay + faults + drain: {drain_s:.0f}s; worker processes: {len(workers)}")
        print(f"applied {st.get('events_applied', 0):,} (reference "
              f"{ref_st.get('events_applied', 0):,}); re-sent skipped "
              f"{st.get('duplicates_event', 0):,} (reference "
              f"{ref_st.get('duplicates_event', 0):,}); redelivered skipped "
              f"{st.get('duplicates_offset', 0):,}")
        print(f"lost {lost}, double applied {double}, applied but not in the reference "
              f"{extra}")
        print(f"user state equal: {not diff_keys} ({len(a_users):,} keys"
              + (f"; {len(diff_keys)} differ, e.g. {diff_keys[:3]}" if diff_keys else "")
              + f"); popularity equal: {pop_ok}")
        print(f"control: a planted double application and loss are seen: {control}")
        print(f"dead letters: {len(dl_sources):,} distinct source records "
              f"({len(dls):,} records on the topic; counter {st.get('deadlettered', 0):,}), "
              f"expected {expected_dl:,}; by reason "
              f"{dict(sorted(by_code.items()))}")
        if by_code != Counter(man["deadletter_expected"]):
            print(f"  expected by reason {dict(sorted(man['deadletter_expected'].items()))}")
        recs_after = st.get("recommendations", 0) - recs_at_last_fault
        print(f"recommendations published after the last fault: {recs_after:,}")
        print(f"worker exits we did not cause: {crashes_unexpected}; agent crashes in logs: "
              f"{agent_crashes}; Redis calls retried (worker logs): {redis_retries:,}")
        if heads:
            print(f"head versions: {heads}")
        details = {"valid_events": valid, "malformed": man["malformed"],
                   "resent": man["duplicates"], "applied": st.get("events_applied", 0),
                   "reference_applied": ref_st.get("events_applied", 0),
                   "deadletter_records": len(dls), "deadletter_by_reason": dict(by_code),
                   "faults": timeline, "seconds": round(drain_s, 1),
                   "popularity_equal": pop_ok, "state_keys": len(a_users),
                   "state_keys_differing": len(diff_keys), "heads": heads,
                   "worker_processes": len(workers), "redis_retries_logged": redis_retries,
                   "deadlettered_counter": st.get("deadlettered", 0),
                   "comparison_control": control, "recs_after_last_fault": recs_after}
        print("details " + json.dumps(details))
        out = {"events": man["events"], "kills": kills, "lost": lost,
               "double_applied": double, "state_equal": state_equal,
               "deadlettered_expected": expected_dl, "deadlettered": len(dl_sources),
               "worker_crashes_on_bad_input": crashes}
        assert tuple(out) == KEYS
        kill_s = [rb["served_s"] for rb in rebalances if rb["kind"] == "kill"]
        worst = [rb["latency_ms_max"] for rb in rebalances if rb["latency_ms_max"] is not None]
        out.update({"workers": a.workers, "kill_to_served_s": kill_s, "rebalances": rebalances,
                    "rebalance_latency_ms_max": max(worst) if worst else None})
        assert tuple(out) == KEYS + REBALANCE_KEYS
        for rb in rebalances:
            print(f"  rebalance ({rb['kind']}) at {rb['at_s']}s: partitions served again / "
                  f"longest unserved {rb['served_s']}s over {rb['partitions']} partitions; "
                  f"worst event → recommendation latency {rb['latency_ms_max']} ms "
                  f"(p99 before: {rb['latency_ms_p99_before']} ms)")
        if a.json:
            print(json.dumps(out), flush=True)
    finally:
        if watch is not None:
            watch.stop()
        for x in workers:
            with contextlib.suppress(Exception):
                x.stop()
        with contextlib.suppress(Exception):
            rsvc.stop()  # type: ignore[possibly-undefined]
        for svc in reversed(services):
            with contextlib.suppress(Exception):
                svc.stop()


if __name__ == "__main__":
    main()
