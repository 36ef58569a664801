"""Adaptive micro-batches over a Faust stream.

Faust's ``take_events(max, within)`` stops buffering while the agent processes a batch
and then waits ``within`` again for the next one, so an agent that has fallen behind keeps
taking small batches: each pays the fixed cost of a batch (Redis round trips, a model
pass) for a few events, and it never catches up (seen: batches of 2-20 events at 23-59 ms
each while thousands waited). Here the stream keeps buffering while a batch is processed,
and the next batch is everything that arrived meanwhile, up to ``max_``:

* caught up (quiet for ``interval``): a lone event is served at once;
* busy: a batch starts at most every ``interval`` seconds, unless ``max_`` events wait,
  so the per-batch fixed cost is paid at most ``1 / interval`` times a second however the
  events trickle in (one event per fetch response would otherwise mean one batch per
  event, and on a saturated event loop the fixed costs starve the agents upstream);
* behind: each batch takes all that waits (up to ``max_``), so the fixed cost is paid once
  for many events, batches grow with the backlog and the agent catches up by itself.

Acks (:func:`consume_batches`): an event is acked only after the batch holding it was
processed without an error, so Faust never commits an offset past an event that was not
applied (a crash redelivers it and the state watermarks skip what was applied); a
graceful stop finishes the batch in progress first. At most ``max_`` events wait in the
buffer besides the batch being processed; beyond that the stream waits (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

__all__ = ["adaptive_batches", "consume_batches"]


async def adaptive_batches(stream: Any, max_: int, interval: float = 0.0
                           ) -> AsyncIterator[list[Any]]:
    """Yield lists of Faust events from ``stream`` (see the module docstring)."""
    buffer: list[Any] = []
    ready = asyncio.Event()  # the buffer holds something
    full = asyncio.Event()  # the buffer holds max_
    room = asyncio.Event()  # the buffer is below max_
    room.set()

    async def add(value: Any) -> Any:
        # runs in the stream's background drain, once per event, in offset order
        while len(buffer) >= max_:
            room.clear()
            await stream.wait(room)
            if stream.should_stop:
                return value
        event = stream.current_event
        if event is None:  # pragma: no cover - Faust sets it before processors run
            raise RuntimeError("adaptive_batches found no current event")
        buffer.append(event)
        ready.set()
        if len(buffer) >= max_:
            full.set()
        return value

    enable_acks = stream.enable_acks
    stream.enable_acks = False  # acked below, only after the batch was processed
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # what take_events does, too
    try:
        async for batch in _batches(stream, buffer, ready, full, room, max_, interval):
            yield batch  # the caller acks (consume_batches): after processing, not before
    finally:
        stream.enable_acks = enable_acks
        stream._processors.remove(add)


async def _batches(stream: Any, buffer: list[Any], ready: asyncio.Event, full: asyncio.Event,
                   room: asyncio.Event, max_: int, interval: float
                   ) -> AsyncIterator[list[Any]]:
    loop = asyncio.get_running_loop()
    last_start = -1e9
    # the background drain ends when the agent is stopped (Faust throws StopAsyncIteration
    # into the stream's channel); what is still buffered then stays un-acked: redelivered
    while not stream.should_stop and stream._passive:
        if not buffer:
            # (only when empty: mode's wait creates three tasks per call, and behind, the
            # buffer is never empty here; py-spy: 11% of a backlogged normalizer)
            ready.clear()
            await stream.wait_for_stopped(ready, timeout=1.0)
            if not buffer:
                continue
        wait = last_start + interval - loop.time()
        if wait > 0 and len(buffer) < max_:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(full.wait(), wait)
        last_start = loop.time()
        batch = buffer[:max_]
        del buffer[:max_]
        if not buffer:
            ready.clear()
        if len(buffer) < max_:
            full.clear()
            room.set()
        yield batch


async def consume_batches(stream: Any, max_: int, interval: float,
                          handle: Callable[[list[Any]], Awaitable[Any]]) -> None:
    """Run ``handle`` on each adaptive batch, then ack the batch's events.

    A stop (Faust cancels the agent's task at once) lets the batch in progress finish and
    be acked first, so a graceful shutdown commits everything it applied and redelivers
    nothing (Faust's ``take_events`` acks a cancelled batch whether or not it was done).
    A batch whose handler raised is not acked: it is redelivered, and the state
    watermarks skip what it had applied."""
    async for batch in adaptive_batches(stream, max_, interval):
        task = asyncio.ensure_future(handle(batch))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task  # a graceful stop: finish this batch (XREC_SHUTDOWN_TIMEOUT_S)
            if task.done() and not task.cancelled() and task.exception() is None:
                for event in batch:
                    await stream.ack(event)
            raise
        for event in batch:
            await stream.ack(event)
