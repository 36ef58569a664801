"""Scale out: two real worker processes in one consumer group share the partitions; one is
SIGKILLed mid-stream and another joins. The survivors take the dead one's partitions over,
the newcomer gets some, and the final state equals that of an uninterrupted in-process run
(bench/chaos.py's comparison: nothing lost, nothing applied twice)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import redis as redis_sync
from kafka import KafkaConsumer, TopicPartition

from bench.chaos import compare, dump_users, popularity, popularity_equal, reference_run
from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.platforms import load_platforms
from streams.state import FP_WIDTH, event_fp
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings, settings_env
from tests.test_pipeline import wait_for
from xrec.stack import start_worker, wait_worker_ready

pytestmark = pytest.mark.integration


def _fps(d: dict) -> set[tuple[str, str]]:
    return {(k, v[i:i + FP_WIDTH]) for k, v in d.items() if k.endswith(":ef") and v
            for i in range(0, len(v), FP_WIDTH)}


def _where_lost(bootstrap: str, unified: str, a: dict, b: dict) -> list[dict]:
    """For each event the reference applied and the workers did not: where it was on the
    unified topic (partition, offset, copies) and where it came from."""
    lost = _fps(b) - _fps(a)
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    out: list[dict] = []
    try:
        tps = [TopicPartition(unified, q) for q in sorted(c.partitions_for_topic(unified) or ())]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        # until idle, not until the end offsets: Tansu 0.6 reports the last record batch's
        # base offset as the end (README, Rebalances)
        idle = time.monotonic()
        while time.monotonic() - idle < 2.0:
            got = c.poll(timeout_ms=500)
            if got:
                idle = time.monotonic()
            for recs in got.values():
                for rec in recs:
                    i = json.loads(rec.value)
                    key = (f"u:{i['user']}:{i['platform']}:ef", event_fp(i["event_id"]))
                    if key in lost:
                        out.append({"unified": [rec.partition, rec.offset],
                                    "src": [i["src_topic"], i["src_partition"], i["src_offset"]],
                                    "user": i["user"][:12], "event_id": i["event_id"]})
    finally:
        c.close()
    return out


def _split(path: Path, share: float) -> tuple[Path, Path]:
    """A JSON-lines file cut into its first ``share`` of records and the rest."""
    lines = path.read_bytes().splitlines(keepends=True)
    k = int(len(lines) * share)
    head, rest = path.with_suffix(".head.jsonl"), path.with_suffix(".rest.jsonl")
    head.write_bytes(b"".join(lines[:k]))
    rest.write_bytes(b"".join(lines[k:]))
    return head, rest


@pytest.mark.xfail(strict=False, reason=(
    "issue 13, open: a kill and a join lost 1 and then 2 of 4,000 events (2026-12-06, early "
    "hours; and 1 of 18,000 in a bench/chaos.py --workers 3 run on 2026-12-05); not "
    "reproduced in ~55 runs the same morning after the replay's deliveries, the workers' "
    "deliveries and "
    "Faust's acks were made checked (a failure now names the lost events' unified offsets, "
    "any consumer skips and any replay error). Reports XPASS when nothing is lost"))
def test_two_workers_share_partitions_survive_a_kill_and_a_join(stack, ns, tmp_path):
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=4000, users=120, malformed=0.02, seed=31), d)
    s = make_settings(stack, ns, platforms_path="", model_enabled=False, partitions=2,
                      eid_keep=10_000_000)
    t, platforms = Topics(s), load_platforms("")
    create_all_topics(s)
    env = settings_env(s)
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    started = []

    def start(name: str):  # noqa: ANN202
        w = start_worker(tmp_path, env, name=name)
        started.append(w)
        return w

    def parts() -> dict[int, int]:
        """pid → partitions it announced (every topic the group consumes)."""
        return {int(pid): json.loads(v).get("partitions", 0)
                for pid, v in r.hgetall(f"{ns}:workers").items()}

    def applied() -> int:
        return int(r.hget(f"{ns}:stats", "events_applied") or 0)

    valid = man["valid_events"]
    try:
        w1, w2 = start("worker-1"), start("worker-2")
        for w in (w1, w2):
            wait_worker_ready(stack.redis_url, s.redis_prefix, w, timeout=90)
        wait_for(lambda: parts().get(w1.pid, 0) > 0 and parts().get(w2.pid, 0) > 0,
                 timeout=30, what="both workers own partitions")
        total = parts()[w1.pid] + parts()[w2.pid]

        # the first 60% of each platform's records now, the rest once the newcomer has
        # joined: the join is mid-stream however long the kill and the join take
        parts_of = {p: _split(d / f, 0.6) for p, f in man["files"]["events"].items()}
        rep = Replayer(stack.bootstrap)
        failed: list[BaseException] = []

        def replay_head() -> None:
            try:
                rep.replay([Source(h, t.events(p), platforms[p])
                            for p, (h, _) in parts_of.items()], rate=150, progress=False)
            except BaseException as exc:  # noqa: BLE001 - e.g. DeliveryError: fail the test
                failed.append(exc)

        th = threading.Thread(target=replay_head, daemon=True)
        th.start()
        wait_for(lambda: applied() >= 0.15 * valid, timeout=60, what="some events applied")
        w1.proc.send_signal(signal.SIGKILL)
        w1.proc.wait(10)
        killed_at = applied()
        # the survivor takes every partition over once the dead member's session expires
        wait_for(lambda: parts().get(w2.pid) == total, timeout=40,
                 what="the survivor owning every partition")
        wait_for(lambda: applied() > killed_at + 50, timeout=30,
                 what="the survivor applying events")
        w3 = start("worker-3")
        wait_worker_ready(stack.redis_url, s.redis_prefix, w3, timeout=90)
        wait_for(lambda: parts().get(w3.pid, 0) > 0 and
                 parts().get(w2.pid, 0) + parts().get(w3.pid, 0) == total,
                 timeout=30, what="the newcomer owning some partitions")
        joined_at = applied()
        th.join(120)
        assert not failed, f"the replay failed: {failed[0]!r}"
        assert joined_at < valid, "the join was not mid-stream"
        rep.replay([Source(r, t.events(p), platforms[p]) for p, (_, r) in parts_of.items()],
                   rate=150, progress=False)
        rep.close()
        wait_for(lambda: applied() >= valid, timeout=90, what="every event applied")
        time.sleep(2)  # anything redelivered has arrived by now
        assert w2.alive() and w3.alive()
    finally:
        for w in started:
            w.stop()

    # the uninterrupted run over the same records, compared as bench/chaos.py does
    ref = f"{ns}ref:"
    ref_s = make_settings(stack, ns, platforms_path="", model_enabled=False,
                          redis_prefix=ref, eid_keep=10_000_000)
    asyncio.run(reference_run(ref_s, [(p, d / f) for p, f in man["files"]["events"].items()],
                              0))
    a, b = dump_users(r, f"{ns}:"), dump_users(r, ref)
    cmp = compare(a, b)
    st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
    double = max(0, st["events_applied"] - cmp["applied_ids"]) + cmp["over"]
    if cmp["lost"]:
        cmp["where"] = _where_lost(stack.bootstrap, t.unified, a, b)
        cmp["logs"] = [str(w.log_path) for w in started]
        cmp["skips"] = [line for w in started for line in
                        w.log_path.read_text(errors="replace").splitlines()
                        if "consumer skipped" in line or "was skipped by the consumer" in line]
    assert cmp["lost"] == 0 and cmp["extra"] == 0 and double == 0, cmp
    assert a["users"] and cmp["diff_keys"] == []
    assert popularity_equal(popularity(r, f"{ns}:", list(platforms)),
                            popularity(r, ref, list(platforms)))
    assert st["events_applied"] == valid
    assert st["deadlettered"] == sum(man["deadletter_expected"].values())
    r.close()
