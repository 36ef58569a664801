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

Faust's own acks are refused (:func:`guard_acks`). During a rebalance Faust's stream
*skips* a record it was already handed (flow stopped, or fetched in the previous consumer
generation). Its pure-Python iterator (used where faust's C extension is not built) then
acks the record although no agent processed it; once the records before it are acked too,
the next commit moves the group's offset past it and the record is lost. Every agent here
acks through :func:`consume_batches`; an ack from anywhere else only stops Faust waiting
for the record, which is read again from the committed offset (tests/test_agents.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from faust.types.tuples import ack_lock

__all__ = ["adaptive_batches", "consume_batches", "guard_acks", "OffsetTrail"]

log = logging.getLogger("xrec.worker")


def guard_acks(consumer: Any) -> None:
    """Make ``consumer`` (Faust's transport consumer) count only the acks that
    :func:`consume_batches` gives: those of records an agent processed. Any other ack (a
    record Faust skipped in a rebalance: module docstring) marks the record done without
    letting its offset be committed. Idempotent."""
    if getattr(consumer, "_xrec_acking", None) is not None:
        return
    original = consumer.ack
    consumer._xrec_acking = False  # set by _ack around Faust's own Stream.ack
    consumer._xrec_refused = 0

    def ack(message: Any) -> bool:
        if consumer._xrec_acking:
            return bool(original(message))
        with ack_lock:
            if message.acked:
                return False
            message.acked = True
            consumer._unacked_messages.discard(message)
        consumer._xrec_refused += 1
        log.info("rebalance: %s[%s]@%s was skipped by the consumer, not processed; its offset "
                 "is not committed (it is read again)", message.topic, message.partition,
                 message.offset)
        return False

    consumer.ack = ack


class OffsetTrail:
    """Checks that an agent takes each partition's records without a hole: within one
    assignment, each record follows the one before it, and the first record after a
    rebalance is the one at the group's committed offset. A hole means the consumer skipped
    records (their offsets may then be committed past them): it is logged as an error and
    counted (``skipped`` records; ``xrec_consumer_skipped_records_total``). Records read again
    (offsets at or below one already taken) are expected after a rebalance or a crash; the
    state watermarks skip them."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.next: dict[Any, int] = {}  # tp → the offset expected next
        self.skipped = 0
        self.on_skip: Callable[[int], None] | None = None

    def reset(self) -> None:
        """A rebalance: the next record of each partition is compared with its committed
        offset (known once Faust has seeked to it, before records flow again)."""
        self.next.clear()

    def see(self, message: Any) -> None:
        tp, offset = message.tp, message.offset
        want = self.next.get(tp)
        if want is None:
            want = self.consumer._committed_offset.get(tp)
        if want is not None and offset > want:
            n = offset - want
            self.skipped += n
            log.error("consumer skipped %d record(s) of %s[%s]: offsets %d..%d (took %d next)",
                      n, tp.topic, tp.partition, want, offset - 1, offset)
            if self.on_skip is not None:
                self.on_skip(n)
        self.next[tp] = offset + 1


def offset_trail(app: Any) -> OffsetTrail:
    """The worker's trail (one per consumer), reset at each rebalance."""
    consumer = app.consumer
    trail = getattr(consumer, "_xrec_trail", None)
    if trail is None:
        trail = consumer._xrec_trail = OffsetTrail(consumer)
        trail.on_skip = getattr(app, "xrec_on_skip", None)  # the worker's counter

        @app.on_partitions_revoked.connect
        async def _revoked(sender: Any, revoked: Any, **_kw: Any) -> None:
            trail.reset()

    return trail


async def _ack_all(stream: Any, events: list[Any]) -> None:
    """Ack processed events: ``Stream.ack`` each, let through the guard (Stream.ack does
    not await, so nothing else runs on the loop while the flag is up)."""
    consumer = stream.app.consumer
    consumer._xrec_acking = True
    try:
        for event in events:
            await stream.ack(event)
    finally:
        consumer._xrec_acking = False


async def adaptive_batches(stream: Any, max_: int, interval: float = 0.0
                           ) -> AsyncIterator[list[Any]]:
    """Yield lists of Faust events from ``stream`` (see the module docstring)."""
    buffer: list[Any] = []
    ready = asyncio.Event()  # the buffer holds something
    full = asyncio.Event()  # the buffer holds max_
    room = asyncio.Event()  # the buffer is below max_
    room.set()
    see = offset_trail(stream.app).see

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
        see(event.message)
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
    guard_acks(stream.app.consumer)
    guard_commits = getattr(stream.app, "xrec_guard_commits", None)
    if guard_commits is not None:  # the worker's (streams.agents.context.Context)
        guard_commits(stream.app.consumer)
    async for batch in adaptive_batches(stream, max_, interval):
        task = asyncio.ensure_future(handle(batch))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task  # a graceful stop: finish this batch (XREC_SHUTDOWN_TIMEOUT_S)
            if task.done() and not task.cancelled() and task.exception() is None:
                await _ack_all(stream, batch)
            raise
        await _ack_all(stream, batch)
