"""Small kafka-python helpers for tests: produce and read whole topics from outside."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def produce(bootstrap: str, topic: str, values: list[bytes], key: bytes | None = None) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for v in values:
        p.send(topic, value=v, key=key)
    p.flush()
    p.close()


def read_all(bootstrap: str, topic: str, idle_s: float = 1.5, timeout_s: float = 30.0
             ) -> list[tuple[bytes | None, bytes]]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      fetch_max_wait_ms=100)
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        out: list[tuple[bytes | None, bytes]] = []
        last = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = c.poll(timeout_ms=200)
            for recs in got.values():
                out += [(r.key, r.value) for r in recs]
            if got:
                last = time.monotonic()
            done = all(c.position(tp) >= end[tp] for tp in tps)
            if (done and time.monotonic() - last > 0.3) or time.monotonic() - last > idle_s:
                break
        return out
    finally:
        c.close()
