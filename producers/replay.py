"""Replay event logs (and catalogs) onto xrec's input topics with kafka-python.

Several files can be replayed as one stream: their records are interleaved by relative
position (record i of a file of n records sits at (i + ½)/n), which keeps the time order
of per-platform files cut from one time-ordered stream. Pacing: ``rate`` events/s, or
``speed`` × the recorded event times, or as fast as the broker takes them.
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.files import count_records, read_records
from streams.errors import StackError
from streams.platforms import Platform, parse_time
from streams.settings import Settings

__all__ = ["Source", "Replayer", "Progress", "DeliveryError"]


@dataclass
class Source:
    path: Path
    topic: str
    platform: Platform | None = None  # used for keys (user field) and --speed (time field)


class Progress:
    """A one-line progress bar on a TTY; silent otherwise."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool | None = None):  # type: ignore[no-untyped-def]
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.n, self._last, self.t0 = 0, 0.0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.n == self.total):
            self._last = now
            rate = self.n / max(now - self.t0, 1e-9)
            frac = self.n / self.total if self.total else 1.0
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.n:,}/{self.total:,} "
                              f"{rate:,.0f}/s ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


#: the workers' producer batching delay (``XREC_PRODUCER_LINGER_MS``'s default): each fetch
#: costs the embedded broker in proportion to the record batches a partition holds, so the
#: replay batches as the workers do (README, Measured: "Why 30 ms")
REPLAY_LINGER_MS: int = Settings.model_fields["producer_linger_ms"].default


class DeliveryError(StackError):
    """Records the broker did not take (after the client's own retries)."""


class Replayer:
    """Sends records with kafka-python; every send's delivery is checked. A record the
    broker did not take is never dropped silently: :meth:`replay` (and :meth:`close`)
    raise :class:`DeliveryError` saying how many and why, after flushing the rest."""

    def __init__(self, bootstrap: str, linger_ms: int = REPLAY_LINGER_MS,
                 security: dict[str, Any] | None = None) -> None:
        """``security``: TLS / SASL keyword arguments (:func:`streams.security.kafka_kwargs`)."""
        from kafka import KafkaProducer

        try:
            self.producer = KafkaProducer(
                bootstrap_servers=bootstrap, linger_ms=linger_ms, batch_size=128 * 1024,
                client_id="xrec-replay", max_request_size=4 * 1024 * 1024,
                request_timeout_ms=30000, **(security or {}))
        except Exception as exc:  # noqa: BLE001
            raise StackError(f"cannot connect to the broker at {bootstrap}: {exc}") from None
        self.sent = 0
        self.failed = 0  # records whose delivery failed, over the Replayer's life
        self._errors: list[str] = []  # the first few reasons
        self._checked = 0  # failures already raised

    def _failed(self, exc: BaseException) -> None:
        self.failed += 1
        if len(self._errors) < 3:
            self._errors.append(repr(exc))

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Send one record; its delivery is checked at the next flush."""
        self.producer.send(topic, value=value, key=key).add_errback(self._failed)

    def flush(self) -> None:
        """Wait for every record sent so far; raise :class:`DeliveryError` if any new
        failure happened."""
        self.producer.flush()
        if self.failed > self._checked:
            n, self._checked = self.failed - self._checked, self.failed
            raise DeliveryError(f"{n} record(s) were not delivered to the broker (first: "
                                f"{'; '.join(self._errors)})")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()

    def replay(self, sources: Sequence[Source], rate: float | None = None,
               speed: float | None = None, progress: bool | None = None,
               on_send: Callable[[int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> int:
        """Send every record of ``sources``; returns the number sent."""
        totals = [count_records(s.path) for s in sources]
        bar = Progress(sum(totals), "replay", enabled=progress)
        t0 = time.monotonic()
        first_event_time: float | None = None
        n = 0
        try:
            for src, raw in _interleave(sources, totals):
                if should_stop is not None and should_stop():
                    break
                if rate:
                    due = t0 + n / rate
                elif speed:
                    et = _event_time(raw, src.platform)
                    if et is not None:
                        first_event_time = first_event_time if first_event_time is not None \
                            else et
                        due = t0 + (et - first_event_time) / speed
                    else:
                        due = 0.0
                else:
                    due = 0.0
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.send(src.topic, raw, _key(raw, src.platform))
                n += 1
                bar.update()
                if on_send is not None:
                    on_send(n)
        finally:
            bar.close()
            self.sent += n
        self.flush()  # raises if a record was not delivered
        return n


def _interleave(sources: Sequence[Source], totals: Sequence[int]) -> Iterator[tuple[Source,
                                                                                     bytes]]:
    iters = [read_records(s.path) for s in sources]
    heap: list[tuple[float, int, int]] = []
    for j, tot in enumerate(totals):
        if tot:
            heap.append((0.5 / tot, j, 0))
    heapq.heapify(heap)
    while heap:
        _, j, i = heapq.heappop(heap)
        raw = next(iters[j], None)
        if raw is None:
            continue
        yield sources[j], raw
        if i + 1 < totals[j]:
            heapq.heappush(heap, ((i + 1.5) / totals[j], j, i + 1))


def _parse(raw: bytes) -> dict | None:  # type: ignore[type-arg]
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _key(raw: bytes, platform: Platform | None) -> bytes | None:
    """Key by the platform's user id, as a platform producer would (per-user order)."""
    if platform is None:
        return None
    obj = _parse(raw)
    if obj is None:
        return None
    v = obj.get(platform.identity.user)
    return str(v).encode()[:256] if isinstance(v, str | int) else None


def _event_time(raw: bytes, platform: Platform | None) -> float | None:
    obj = _parse(raw)
    if obj is None or platform is None:
        return None
    try:
        return parse_time(platform.event.time.eval(obj))
    except Exception:  # noqa: BLE001
        return None
