"""The catalog agent: catalog records → item metadata in Redis → text vectors.

``xrec.catalog.<platform>`` → item text (the platform's template) → the text encoder
(ONNX Runtime, in a thread, changed items only) → vectors in Redis (per encoder id).
Every worker with vectors reloads each platform's in-memory matrix when it changes
(:func:`install_index_refresh`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from streams.agents.batching import consume_batches
from streams.agents.context import Context
from streams.catalog import parse_catalog_record
from streams.records import CatalogItem, DeadLetter
from streams.vectors import usable_text

__all__ = ["install", "install_index_refresh"]

log = logging.getLogger("xrec.worker")


def install(ctx: Context) -> None:
    s, app, wd, state, redis = ctx.settings, ctx.app, ctx.watchdog, ctx.state, ctx.redis
    vectors, encoder = ctx.vectors, ctx.encoder
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrec-encode")
    by_topic = {ctx.topics.catalog(p): p for p in ctx.platforms}
    source = app.topic(*by_topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    ctx.agent_of_topic.update(dict.fromkeys(by_topic, "catalog"))
    wd.register("catalog")

    async def store(items: list[CatalogItem]) -> None:
        """Store metadata; encode only items whose text changed or has no vector yet."""
        keys = [state.k("item", it.platform, it.item) for it in items]
        rd = redis.pipeline(transaction=False)
        for key in keys:
            rd.hget(key, "text")
        old = await rd.execute()
        todo: dict[str, list[CatalogItem]] = {}
        notext = 0
        prev_text = {(it.platform, it.item): o for it, o in zip(items, old, strict=True)}
        for it in items:
            if not usable_text(it.text):
                notext += 1
                continue
            todo.setdefault(it.platform, []).append(it)
        encoded = 0
        if vectors is not None and encoder is not None:
            loop = asyncio.get_running_loop()
            for p, lst in todo.items():
                missing = await vectors.missing(p, [it.item for it in lst])
                need = [it for it, miss in zip(lst, missing, strict=True)
                        if miss or prev_text.get((p, it.item)) != it.text]
                if not need:
                    continue
                vecs = await loop.run_in_executor(pool, encoder.encode, [it.text for it in need])
                await vectors.put(p, [it.item for it in need], vecs)
                encoded += len(need)
        pipe = redis.pipeline(transaction=False)
        for it, key in zip(items, keys, strict=True):
            pipe.hset(key, mapping={"text": it.text, "fields": _json(it.fields),
                                    "notext": 0 if usable_text(it.text) else 1})
            pipe.sadd(state.k("items", it.platform), it.item)
        pipe.hincrby(state.k("stats"), "catalog_items", len(items))
        pipe.hincrby(state.k("stats"), "catalog_encoded", encoded)
        pipe.hincrby(state.k("stats"), "catalog_notext", notext)
        await pipe.execute()

    async def batch(events: list[Any]) -> None:
        wd.begin("catalog")
        latest: dict[tuple[str, str], CatalogItem] = {}
        for ev in events:
            m = ev.message
            p = ctx.platforms[by_topic[m.topic]]
            out = parse_catalog_record(ev.value, p, s, topic=m.topic,
                                       partition=m.partition, offset=m.offset)
            if isinstance(out, DeadLetter):
                await ctx.dead(out)
            else:
                latest[(out.platform, out.item)] = out
        if latest:
            items = list(latest.values())
            await state._retry("catalog", lambda items=items: store(items))
        wd.done("catalog")

    @app.agent(source, name="xrec.catalog")
    async def catalog(stream: Any) -> None:
        # acked after storing, like every agent (streams/agents/batching.py); batches of at
        # most 256 records, started at most every 0.2 s while busy
        await consume_batches(stream, 256, 0.2, batch)


def install_index_refresh(ctx: Context) -> None:
    """Every worker keeps each platform's vectors in memory, reloading on change."""
    vectors = ctx.vectors
    plist = list(ctx.platforms)

    @ctx.app.timer(2.0)
    async def refresh_index() -> None:
        try:
            n = await vectors.refresh(plist)
        except Exception as exc:  # noqa: BLE001 - retried at the next tick
            log.warning("item index refresh failed: %s", exc)
            return
        if n:
            log.info("item index: %s", ", ".join(
                f"{p} {len(vectors.index.get(p) or [])}" for p in plist))


def _json(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)
