"""Faust's consumer hands each fetched record to the streams through ``wait_first``.

``Consumer._drain_messages`` delivers every record with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: the delivery
races the flow being suspended (a rebalance), so a delivery blocked on a full stream
buffer or on flow control cannot hold a rebalance up. mode's ``wait_first`` makes four
tasks per call (the two awaitables, plus waits on the service's stopped and crashed
events) and an ``asyncio.wait``: tens of µs per record (measured in
tests/test_fastdrain.py), in every agent of every worker, three Kafka hops per event.

Almost every delivery completes without ever suspending (the flow is active, the stream
buffer has room, the producer buffer is below its mark). :func:`fast_wait_first` first
runs the delivery directly; only if it suspends is the rest of it handed to the original
``wait_first``, racing the suspend flag exactly as before. Results and exceptions are the
same in both paths (the drain loop ignores the result; an exception propagates).
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

from mode.services import WaitResults

__all__ = ["patch_consumer_wait_first", "fast_wait_first"]


class _Rest:
    """The remainder of a coroutine that already ran up to its first suspension (it
    yielded ``pending`` to the event loop): awaiting this resumes it where it stopped."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self.coro, self.pending = coro, pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                value = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - forwarded (e.g. cancellation)
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as stop:
                    return stop.value


def fast_wait_first(original: Any) -> Any:
    """A ``wait_first`` for Faust's consumer: for the drain loop's call shape (two
    coroutines, no timeout) the first is run directly while it does not suspend."""

    async def wait_first(self: Any, *coros: Any, timeout: Any = None) -> Any:
        if (timeout is not None or len(coros) != 2
                or not isinstance(coros[0], types.CoroutineType)):
            return await original(self, *coros, timeout=timeout)
        first, other = coros
        try:
            pending = first.send(None)
        except StopIteration as stop:  # delivered without suspending: nothing to race
            _close(other)
            return _results(first, stop.value)
        except BaseException:
            _close(other)
            raise
        # it suspended (a full buffer, flow control): race the rest as Faust does
        return await original(self, _Rest(first, pending), other, timeout=None)

    return wait_first


def _close(aw: Any) -> None:
    if isinstance(aw, types.CoroutineType):
        aw.close()  # never started


def _results(winner: Awaitable[Any], value: Any) -> Any:
    return WaitResults([winner], [value], False)


def patch_consumer_wait_first() -> None:
    """Install :func:`fast_wait_first` on Faust's consumer class (idempotent)."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_xrec_fast_wait_first", False):
        return
    Consumer.wait_first = fast_wait_first(Consumer.wait_first)  # type: ignore[method-assign]
    Consumer._xrec_fast_wait_first = True  # type: ignore[attr-defined]
