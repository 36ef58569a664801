"""The drift monitor of a recommend worker: applied events and prequential hits in,
signals out (``xrec.metrics.drift``), reactions requested from the train agent."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from models.drift import DriftMonitor
from streams.agents.context import Context
from streams.platforms import DriftSpec
from streams.records import DriftReaction, DriftSignal, DriftWindow, Interaction

__all__ = ["DriftWatch"]

log = logging.getLogger("xrec.worker")


class DriftWatch:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.monitor = DriftMonitor(ctx.settings.drift_config())

    async def watch(self, applied: Sequence[tuple[Interaction, Any]],
                    ranks: Sequence[float | None]) -> None:
        """Feed the monitor; publish signals; ask the train agent to react."""
        ctx, s = self.ctx, self.ctx.settings
        vectors, server = ctx.vectors, ctx.server
        for (ev, _), rank in zip(applied, ranks, strict=True):
            # only positives feed the centroid: no vector lookup (a copy) for the rest
            idx = vectors.index.get(ev.platform) if vectors is not None and ev.label else None
            vec = idx.vector(ev.item) if idx is not None else None
            hit = None if rank is None else int(rank < 10)
            for sig in self.monitor.observe(ev.platform, ev.item, ev.label, vec, hit,
                                            now=time.time()):
                rec = DriftSignal(platform=sig.platform, signal=sig.signal,
                                  detector=sig.detector, value=round(sig.value, 6),
                                  reference=round(sig.reference, 6), window=sig.window,
                                  events=sig.event_index, worker=ctx.worker, time=sig.time)
                log.warning("drift on %s: %s (%s) %.4f vs %.4f", sig.platform, sig.signal,
                            sig.detector, sig.value, sig.reference)
                await ctx.publish(ctx.topics.drift, sig.platform.encode(),
                                  rec.model_dump_json().encode())
                await ctx.state._count(f"drift:{sig.signal}")
                ctx.metrics.drift_signals.inc(1, sig.platform, sig.signal)
                spec = ctx.platforms[sig.platform].drift if sig.platform in ctx.platforms \
                    else DriftSpec()
                rc = spec.reaction_config(s.drift_reactions)
                if server is not None and rc.enabled and sig.signal in rc.signals and \
                        sig.signal in rc.horizon_signals and rc.history_horizon_s > 0:
                    server.set_horizon(ev.event_time, rc.history_horizon_s)
                    hx = DriftReaction(platform=sig.platform, signal=sig.signal, actions=[
                        f"histories from now on only, for {rc.history_horizon_s:g} s"],
                        time=time.time())
                    await ctx.publish(ctx.topics.drift, sig.platform.encode(),
                                      hx.model_dump_json().encode())
                if s.drift_reactions:
                    await ctx.state._retry("drift reaction", lambda rec=rec: ctx.redis.rpush(
                        ctx.state.k("drift", "reactions"), rec.model_dump_json()))

    async def report(self) -> None:
        """Each platform's current signal values (``kind = window``)."""
        now = time.time()
        for p, vals in self.monitor.values().items():
            for sig, v in vals.items():
                self.ctx.metrics.drift_value.set(v, p, sig)
            pm = self.monitor.platforms.get(p, self.monitor.overall)
            w = DriftWindow(platform=p, values=vals, events=pm.n, worker=self.ctx.worker,
                            time=now)
            await self.ctx.publish(self.ctx.topics.drift, p.encode(),
                                   w.model_dump_json().encode())
