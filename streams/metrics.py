"""Prometheus metrics of a worker, in the text exposition format (no client library needed).

Served on the worker's web port (``XREC_WEB_PORT``) at ``/metrics``, with ``/healthz``
beside it. Units are in the names; latency histograms have millisecond buckets.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

__all__ = ["Registry", "Counter", "Gauge", "Histogram", "StageClock", "MS_BUCKETS",
           "SIZE_BUCKETS"]

MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: counts (events per micro-batch)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    body = ",".join(f'{n}="{_esc(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + body + "}"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labels: Iterable[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, n: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + n

    def render(self) -> list[str]:
        out = self.header()
        for lv, v in sorted(self.values.items()):
            out.append(f"{self.name}{_labels(self.labelnames, lv)} {_num(v)}")
        if not self.values and not self.labelnames:
            out.append(f"{self.name} 0")
        return out


class Gauge(Counter):
    kind = "gauge"

    def set(self, v: float, *labels: str) -> None:
        with self._lock:
            self.values[labels] = v


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, buckets: Iterable[float] = MS_BUCKETS,
                 labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_, labels)
        self.buckets = tuple(sorted(buckets))
        #: label values → [bucket counts..., count, sum]
        self.series: dict[tuple[str, ...], list[float]] = {}
        if not self.labelnames:
            self.series[()] = [0] * (len(self.buckets) + 2)

    def observe(self, v: float, *labels: str) -> None:
        with self._lock:
            row = self.series.get(labels)
            if row is None:
                row = self.series[labels] = [0] * (len(self.buckets) + 2)
            row[-2] += 1
            row[-1] += v
            for i, b in enumerate(self.buckets):
                if v <= b:
                    row[i] += 1

    def observe_many(self, vs: Sequence[float], *labels: str) -> None:
        """:meth:`observe` for each of ``vs`` (one lock and one pass over the buckets)."""
        if not vs:
            return
        b, n = self.buckets, len(self.buckets)
        counts = [0] * (n + 1)
        for v in vs:
            counts[n if v != v else bisect_left(b, v)] += 1  # NaN: in no bucket
        with self._lock:
            row = self.series.get(labels)
            if row is None:
                row = self.series[labels] = [0] * (n + 2)
            run = 0
            for i in range(n):
                run += counts[i]
                row[i] += run
            row[-2] += len(vs)
            row[-1] += sum(vs)

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            series = sorted((k, list(v)) for k, v in self.series.items())
        for lv, row in series:
            lab = _labels(self.labelnames, lv)
            inner = lab[1:-1] + "," if lab else ""
            for b, c in zip(self.buckets, row, strict=False):
                out.append(f'{self.name}_bucket{{{inner}le="{_num(b)}"}} {int(c)}')
            out.append(f'{self.name}_bucket{{{inner}le="+Inf"}} {int(row[-2])}')
            out.append(f"{self.name}_sum{lab} {_num(round(row[-1], 3))}")
            out.append(f"{self.name}_count{lab} {int(row[-2])}")
        return out


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


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, m: _Metric) -> _Metric:
        self.metrics.append(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"
