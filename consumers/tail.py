"""Follow a result topic: ``xrec tail PLATFORM`` prints recommendations as they are published."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from streams.errors import StackError
from streams.records import DeadLetter, Recommendations

__all__ = ["follow", "format_recs", "format_deadletter", "format_drift", "format_quality"]


def follow(bootstrap: str, topic: str, from_beginning: bool = False,
           idle_timeout_s: float | None = None, should_stop: Callable[[], bool] | None = None,
           security: dict[str, Any] | None = None) -> Iterator[bytes]:
    """Yield record values of every partition of ``topic`` (no consumer group: no join wait).
    ``security``: TLS / SASL keyword arguments (:func:`streams.security.kafka_kwargs`)."""
    from kafka import KafkaConsumer, TopicPartition

    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                 group_id=None, client_id="xrec-tail", fetch_max_wait_ms=50,
                                 **(security or {}))
    except Exception as exc:  # noqa: BLE001
        raise StackError(f"cannot connect to the broker at {bootstrap}: {exc}") from None
    try:
        parts = None
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.2)
        if not parts:
            raise StackError(f"topic {topic} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        last = time.monotonic()
        while should_stop is None or not should_stop():
            batch = consumer.poll(timeout_ms=200)
            got = False
            for records in batch.values():
                for rec in records:
                    got = True
                    yield rec.value
            if got:
                last = time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                return
    finally:
        consumer.close()


def _hhmmss(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def format_recs(rec: Recommendations, titles: Callable[[str, str], str | None] | None = None,
                n: int = 5) -> str:
    def name(item: str) -> str:
        t = titles(rec.platform, item) if titles else None
        return f"{item} “{t[:40]}”" if t else item

    items = ", ".join(f"{name(r.item)} {r.score:.2f}" for r in rec.items[:n])
    lat = (rec.published_at - rec.produced_at) * 1000
    return (f"{_hhmmss(rec.published_at)} {rec.platform:<6} user {rec.user[:12]}… "
            f"[{rec.scorer}, {rec.events} ev, {lat:.0f} ms] → {items or '(nothing to recommend)'}")


def format_deadletter(d: DeadLetter) -> str:
    return (f"{_hhmmss(d.at)} {d.code:<18} {d.src_topic}[{d.src_partition}]@{d.src_offset} "
            f"{d.message[:100]} | {d.excerpt[:60]!r}")


def format_drift(raw: bytes) -> str:
    """Drift records for people: signals stand out, windows are one line per platform."""
    d = json.loads(raw)
    kind = d.get("kind")
    t = _hhmmss(float(d.get("time", 0)))
    if kind == "signal":
        return (f"{t} DRIFT    {d['platform']:<8} {d['signal']:<10} {d['detector']}: "
                f"{d['value']:.4f} (before/alarm level {d['reference']:.4f}, window "
                f"{d['window']}, after {d['events']:,} events)")
    if kind == "reaction":
        return (f"{t} reacted  {d['platform']:<8} {d['signal']:<10} "
                f"{', '.join(d['actions']) or 'no action configured'}")
    if kind == "window":
        vals = "  ".join(f"{k} {v:.4f}" for k, v in sorted(d["values"].items()))
        return f"{t} window   {d['platform']:<8} {d['events']:>8,} events  {vals}"
    return raw.decode(errors="replace")


def format_quality(raw: bytes) -> str:
    d = json.loads(raw)

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    return (f"{_hhmmss(d['at'])} quality  {d['platform']:<8} {d['cohort']:<9} {d['scorer']} "
            f"n={d['n']:<5} recall@10 {f(d['recall_at_10'])}  ndcg@10 {f(d['ndcg_at_10'])}  "
            f"mrr {f(d['mrr'])}")


def parse(topic_kind: str, raw: bytes) -> Recommendations | DeadLetter | dict:  # type: ignore[type-arg]
    if topic_kind == "deadletter":
        return DeadLetter.model_validate_json(raw)
    if topic_kind == "recs":
        return Recommendations.model_validate_json(raw)
    return json.loads(raw)
