"""Prometheus metrics of a worker, exposed through ``prometheus_client``.

Served on the worker's web port (``XREC_WEB_PORT``) at ``/metrics``, with ``/healthz``
beside it. Units are in the names; latency histograms have millisecond buckets.

Why not ``prometheus_client``'s own ``Counter`` / ``Histogram`` objects: the recommend
agent updates ~20 series per micro-batch, and a labelled one costs there ~3x what the
plain accumulation below costs (``.labels(...)`` is a dict lookup under a lock, then a
second lock per update; a histogram of 20 values is 20 calls). So the hot path keeps
this small ``inc`` / ``set`` / ``observe`` / ``observe_many`` API, and each metric is a
``prometheus_client`` collector that turns its running figures into a metric family at
scrape time; the exposition (text 0.0.4 or OpenMetrics, by the scraper's ``Accept``
header), escaping and name checks are the library's.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

__all__ = ["Registry", "Counter", "Gauge", "Histogram", "StageClock", "MS_BUCKETS",
           "SIZE_BUCKETS", "SECONDS_BUCKETS"]

MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: counts (events per micro-batch)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
#: slower things, in seconds (a head version reaching the recommender)
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def _bound(b: float) -> str:
    """A bucket's ``le`` as the exposition always wrote it: ``20``, ``0.1`` (not the
    library's ``20.0``; scrapers and tests match on it; Prometheus 3 reads both as 20)."""
    return str(int(b)) if float(b).is_integer() else repr(float(b))


class _Metric(Collector):
    """One metric family: updated on the hot path, collected at scrape time."""

    def __init__(self, name: str, help_: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labels)
        self._lock = threading.Lock()

    def family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        """The family without samples: lets the registry refuse a duplicate name."""
        return [self.family()]


def _label_values(lv: tuple[str, ...]) -> list[str]:
    return [str(v) for v in lv]


class _Values(_Metric):
    """One number per label values; an unlabelled one shows 0 before its first update."""

    def __init__(self, name: str, help_: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def collect(self) -> Iterator[Metric]:
        fam = self.family()
        with self._lock:
            items = list(self.values.items())
        for lv, v in sorted(items):
            fam.add_metric(_label_values(lv), v)
        if not items and not self.labelnames:
            fam.add_metric([], 0.0)
        yield fam


class Counter(_Values):
    """A monotonic counter. The name ends in ``_total``: the exposition puts it there
    anyway (family ``xrec_x``, sample ``xrec_x_total``), so it is written out."""

    def __init__(self, name: str, help_: str, labels: Iterable[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r}: the name must end in _total")
        super().__init__(name, help_, labels)

    def inc(self, n: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + n

    def family(self) -> Metric:
        return CounterMetricFamily(self.name, self.help, labels=self.labelnames)


class Gauge(_Values):
    def set(self, v: float, *labels: str) -> None:
        with self._lock:
            self.values[labels] = v

    def family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.help, labels=self.labelnames)


class Histogram(_Metric):
    """Cumulative buckets at scrape time; an observation only bumps its own slot."""

    def __init__(self, name: str, help_: str, buckets: Iterable[float] = MS_BUCKETS,
                 labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_, labels)
        self.buckets = tuple(sorted(buckets))
        self._le = [_bound(b) for b in self.buckets] + ["+Inf"]
        #: label values → [one count per bucket, one for above the last bound (and NaN),
        #: sum]: not cumulative (one increment per observation)
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not self.labelnames:
            self.series[()] = [0] * (len(self.buckets) + 2)

    def observe(self, v: float, *labels: str) -> None:
        i = bisect_left(self.buckets, v) if v == v else len(self.buckets)  # NaN: no bucket
        with self._lock:
            row = self.series.get(labels)
            if row is None:
                row = self.series[labels] = [0] * (len(self.buckets) + 2)
            row[i] += 1
            row[-1] += v

    def observe_many(self, vs: Sequence[float], *labels: str) -> None:
        """:meth:`observe` for each of ``vs`` (one lock)."""
        if not vs:
            return
        b, n = self.buckets, len(self.buckets)
        counts = [0] * (n + 1)
        for v in vs:
            counts[bisect_left(b, v) if v == v else n] += 1
        with self._lock:
            row = self.series.get(labels)
            if row is None:
                row = self.series[labels] = [0] * (n + 2)
            for i, c in enumerate(counts):
                if c:
                    row[i] += c
            row[-1] += sum(vs)

    def family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.help, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = self.family()
        with self._lock:
            series = [(k, list(v)) for k, v in self.series.items()]
        for lv, row in sorted(series):
            run, cum = 0, []
            for le, c in zip(self._le, row, strict=False):
                run += c
                cum.append((le, run))
            fam.add_metric(_label_values(lv), cum, row[-1])
        yield fam


class StageClock:
    """Splits one unit of work into stages: ``lap(stage)`` charges the time since the
    previous lap (or the start) to ``stage``; a stage may be charged several times."""

    def __init__(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - self.t) * 1000.0
        self.t = now

    @property
    def total_ms(self) -> float:
        return (self.t - self.t0) * 1000.0


class Registry(CollectorRegistry):
    """A worker's ``prometheus_client`` registry: its own metrics (:meth:`add`) and, with
    ``process=True``, the library's process (CPU seconds, resident memory, open files),
    platform (``python_info``) and garbage-collector collectors."""

    def __init__(self, process: bool = True) -> None:
        super().__init__()
        self.metrics: list[_Metric] = []
        if process:
            ProcessCollector(registry=self)
            PlatformCollector(registry=self)
            GCCollector(registry=self)

    def add(self, m: _Metric) -> _Metric:
        self.register(m)  # a duplicate name raises ValueError
        self.metrics.append(m)
        return m

    def render(self) -> str:
        """The text exposition format (0.0.4)."""
        return generate_latest(self).decode()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type for a scrape with this ``Accept`` header (OpenMetrics
        when the scraper asks for it)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self), content_type
