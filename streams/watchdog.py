"""Stall detection: an agent that stops making progress while its input waits.

Silent consumer stalls are what users of Python stream processors report most: the worker
is alive, the group is stable, and nothing moves. Each agent tells the :class:`Watchdog`
when it starts a unit of work (an event or a micro-batch) and when it finishes one; the
worker checks every few seconds, with the agent's consumer lag (records between what the
broker has and what the group has committed). An agent is **stalled** when

* it has been inside one unit of work for ``stall_after_s`` (a call that never returns: a
  hung connection, a deadlock, Redis unreachable and retried), or
* it has finished nothing for ``stall_after_s`` while records wait for it (the consumer
  stopped fetching or delivering).

A stall is logged, shown on ``/healthz`` (503, with the reason) and in ``/metrics``
(``xrec_agent_stalled``, ``xrec_stalls_total``); it clears as soon as the agent completes
work again. :class:`LoopWatch` covers the case the timers cannot see: the event loop itself
blocked (a CPU-bound call on the loop), logged from a thread with the loop thread's stack.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Watchdog", "LoopWatch"]

log = logging.getLogger("xrec.watchdog")


@dataclass
class _Agent:
    last_progress: float
    busy_since: float | None = None
    stalled: str | None = None
    stalled_since: float | None = None
    stalls: int = 0


class Watchdog:
    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.stall_after_s = stall_after_s
        self.clock = clock
        self.agents: dict[str, _Agent] = {}

    def _get(self, agent: str) -> _Agent:
        a = self.agents.get(agent)
        if a is None:
            a = self.agents[agent] = _Agent(last_progress=self.clock())
        return a

    def register(self, agent: str) -> None:
        self._get(agent)

    def begin(self, agent: str) -> None:
        """A unit of work starts (cheap: one clock read)."""
        self._get(agent).busy_since = self.clock()

    def done(self, agent: str) -> None:
        a = self._get(agent)
        a.busy_since = None
        a.last_progress = self.clock()

    def idle_s(self, agent: str) -> float:
        return self.clock() - self._get(agent).last_progress

    def check(self, lag: Mapping[str, int | None]) -> dict[str, str]:
        """Update and return the stalled agents with their reasons; logs transitions.
        ``lag``: records waiting per agent (None: unknown, treated as none waiting)."""
        now = self.clock()
        out: dict[str, str] = {}
        for name, a in self.agents.items():
            reason = None
            waiting = lag.get(name) or 0
            if a.busy_since is not None and now - a.busy_since >= self.stall_after_s:
                reason = (f"inside one unit of work for {now - a.busy_since:.0f}s"
                          + (f"; {waiting} records waiting" if waiting else ""))
            elif waiting > 0 and now - a.last_progress >= self.stall_after_s:
                reason = (f"no progress for {now - a.last_progress:.0f}s with {waiting} "
                          "records waiting")
            if reason is not None:
                if a.stalled is None:
                    a.stalls += 1
                    a.stalled_since = now
                    log.error("agent %s stalled: %s", name, reason)
                a.stalled = reason
                out[name] = reason
            elif a.stalled is not None:
                log.warning("agent %s making progress again after %.0fs stalled", name,
                            now - (a.stalled_since or now))
                a.stalled = a.stalled_since = None
        return out


class LoopWatch:
    """A daemon thread that notices the event loop not turning for ``after_s`` seconds and
    logs it once per episode with the loop thread's current stack."""

    def __init__(self, after_s: float, period_s: float = 1.0) -> None:
        self.after_s = after_s
        self.period_s = period_s
        self.tick = time.monotonic()
        self.blocked_episodes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread = threading.get_ident()

    def beat(self) -> None:
        """Called from the loop (a timer)."""
        self.tick = time.monotonic()

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._run, name="xrec-loopwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        reported = False
        while not self._stop.wait(self.period_s):
            age = time.monotonic() - self.tick
            if age >= self.after_s and not reported:
                reported = True
                self.blocked_episodes += 1
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
                log.error("the event loop has not turned for %.0fs (a blocking call on it?); "
                          "its stack:\n%s", age, stack)
            elif age < self.after_s and reported:
                reported = False
                log.warning("the event loop turns again")
