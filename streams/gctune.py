"""Garbage-collector settings for long-running workers.

CPython's cyclic collector scans every tracked object of the oldest generation on a full
collection. A worker's heap is ~300,000 objects after start-up (torch, Faust, pydantic:
functions, types, descriptors that live as long as the process), and a full collection
of it took 100-170 ms on the 2-core box, every 1-2 s under a backlog (measured with a
``gc.callbacks`` probe in the recommend worker, 2026-12-05): ~10% of the worker's time and
a pause that lands in the p99 of event → recommendation latency. None of those objects
ever becomes garbage, so after start-up they are moved to the permanent generation
(:func:`gc.freeze`: never scanned again; objects freed by reference counting are still
freed), and the youngest generation is collected less often (``XREC_GC_GEN0``), since
little of what a micro-batch allocates lives past it.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["freeze_startup"]

log = logging.getLogger("xrec.worker")


def freeze_startup(gen0: int, reason: str) -> int:
    """Collect once, then freeze what survives (everything loaded so far) out of future
    collections; set the youngest generation's threshold. Returns the objects frozen.
    ``gen0`` = 0 leaves the collector as Python sets it."""
    if gen0 <= 0:
        return 0
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(gen0, g1, g2)
    gc.collect()
    before = gc.get_freeze_count()
    gc.freeze()
    n = gc.get_freeze_count() - before
    log.debug("gc: froze %d objects (%s); gen0 threshold %d", n, reason, gen0)
    return n
