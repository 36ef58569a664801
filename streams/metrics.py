"""Prometheus metrics of a worker, in the text exposition format (no client library needed).

Served on the worker's web port (``XREC_WEB_PORT``) at ``/metrics``, with ``/healthz``
beside it. Units are in the names; latency histograms have millisecond buckets.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

__all__ = ["Registry", "Counter", "Gauge", "Histogram", "MS_BUCKETS"]

MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


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

    def __init__(self, name: str, help_: str, buckets: Iterable[float] = MS_BUCKETS) -> None:
        super().__init__(name, help_)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        with self._lock:
            self.count += 1
            self.sum += v
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self.counts[i] += 1

    def render(self) -> list[str]:
        out = self.header()
        for b, c in zip(self.buckets, self.counts, strict=True):
            out.append(f'{self.name}_bucket{{le="{_num(b)}"}} {c}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {_num(round(self.sum, 3))}")
        out.append(f"{self.name}_count {self.count}")
        return out


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
