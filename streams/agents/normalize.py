"""The normalize agent: platform events → validated, pseudonymized ``Interaction`` records.

``xrec.events.<platform>`` and ``xrec.events.ingest`` → :class:`streams.normalize.Normalizer`
→ ``xrec.events.unified`` (key = user key); bad input → ``xrec.deadletter`` with a reason.
Raw user ids end here: nothing downstream of this agent sees one.
"""

from __future__ import annotations

import logging
from typing import Any

from streams.agents.batching import consume_batches
from streams.agents.context import Context
from streams.normalize import Normalizer
from streams.records import Interaction

__all__ = ["install"]

log = logging.getLogger("xrec.worker")


def install(ctx: Context) -> None:
    s, topics, wd, m_in = ctx.settings, ctx.topics, ctx.watchdog, ctx.metrics.events_in
    normalizer = Normalizer(s, ctx.platforms)
    by_topic: dict[str, str | None] = {topics.events(p): p for p in ctx.platforms}
    by_topic[topics.ingest] = None
    source = ctx.app.topic(*by_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                           value_serializer="raw")
    ctx.agent_of_topic.update(dict.fromkeys(by_topic, "normalize"))
    wd.register("normalize")

    async def batch(events: list[Any]) -> None:
        wd.begin("normalize")
        unified: list[tuple[bytes | None, bytes]] = []
        for event in events:
            m = event.message
            m_in.inc(1, m.topic)
            out = normalizer.normalize(
                event.value, topic=m.topic, partition=m.partition, offset=m.offset,
                timestamp_ms=(m.timestamp * 1000.0) if m.timestamp else None,
                platform=by_topic.get(m.topic))
            if isinstance(out, Interaction):
                unified.append((out.user.encode(), out.model_dump_json().encode()))
            else:
                log.info("dead-lettered %s:%s@%s: %s", m.topic, m.partition, m.offset, out.code)
                await ctx.publish_many(topics.unified, unified)  # what came before, first
                unified = []
                await ctx.dead(out)
        await ctx.publish_many(topics.unified, unified)
        wd.done("normalize")

    @ctx.app.agent(source, name="xrec.normalize")
    async def normalize(stream: Any) -> None:
        # adaptive batches: one event at once when caught up, everything waiting when behind
        await consume_batches(stream, s.batch_max, 0.0, batch)
