"""A real worker process end to end on a Redis Cluster (``REDIS_URL=redis+cluster://…``):
every valid event applied once, every hostile one dead-lettered and counted, recommendations
published, and an erasure (``xrec forget``) that leaves no key of the user on any node."""

from __future__ import annotations

import json
import time

import pytest
from redis.cluster import ClusterNode, RedisCluster

from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.keys import Keys
from streams.platforms import load_platforms
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings, settings_env
from tests.kafka_util import read_all
from tests.test_pipeline import wait_for
from xrec.forget import forget_user
from xrec.stack import start_worker

pytestmark = pytest.mark.integration


def test_a_worker_on_a_redis_cluster_applies_everything_once(stack, ns, redis_cluster,
                                                              tmp_path):
    nodes = [("127.0.0.1", p) for p in redis_cluster.ports]
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in nodes)
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=1500, users=50, malformed=0.03, seed=17), d)
    s = make_settings(stack, ns, platforms_path="", model_enabled=False, redis_url=url)
    t, reg = Topics(s), load_platforms("")
    create_all_topics(s)
    rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                      decode_responses=True)
    keys = Keys(s.redis_prefix, s.redis_shards)

    def stats() -> dict[str, int]:
        out: dict[str, int] = {}
        for k in keys.stats_keys():
            for f, v in rc.hgetall(k).items():
                out[f] = out.get(f, 0) + int(v)
        return out

    w = start_worker(tmp_path, settings_env(s))
    try:
        wait_for(lambda: any(json.loads(v).get("ready")
                             for v in rc.hvals(f"{s.redis_prefix}workers")),
                 timeout=90, what="the worker ready")
        rep = Replayer(stack.bootstrap)
        rep.replay([Source(d / f, t.events(p), reg[p])
                    for p, f in man["files"]["events"].items()], rate=1500, progress=False)
        rep.close()
        valid = man["valid_events"]
        wait_for(lambda: stats().get("events_applied", 0) >= valid, timeout=90,
                 what="every valid event applied")
        time.sleep(1.5)
        st = stats()
        assert st["events_applied"] == valid
        assert st["deadlettered"] == sum(man["deadletter_expected"].values())
        users = set().union(*(rc.smembers(keys.users(sh)) for sh in keys.all_shards()))
        assert len(users) >= 40
        shards = {keys.shard(u) for u in users}
        assert len(shards) > 8  # the users really are spread over the tag-shards
        recs = [k for p in reg for k, v in read_all(stack.bootstrap, t.recs(p)) if v]
        assert len(set(recs)) >= 40

        victim = sorted(users)[0]
        out = forget_user(s, reg, victim)
        assert out["keys_deleted"] >= 2 and out["keys_left"] == 0
        named = [k for node in rc.get_primaries()
                 for k in rc.scan_iter(f"{s.redis_prefix}*", count=1000, target_nodes=node)
                 if victim in k]
        assert named == [], named
        assert w.alive()
    finally:
        w.stop()
        rc.close()
