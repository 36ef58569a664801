"""The stall watchdog's rules on a fake clock."""

from __future__ import annotations

import logging
import time

from streams.watchdog import LoopWatch, Watchdog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_busy_too_long_is_a_stall_and_clears_on_progress(caplog):
    c = Clock()
    wd = Watchdog(30, clock=c)
    wd.register("recommend")
    wd.begin("recommend")
    c.t += 29
    assert wd.check({}) == {}
    c.t += 2
    out = wd.check({"recommend": 120})
    assert "inside one unit of work for 31s" in out["recommend"]
    assert "120 records" in out["recommend"]
    c.t += 10
    assert wd.check({}) and wd.agents["recommend"].stalls == 1  # one episode, counted once
    wd.done("recommend")
    assert wd.check({"recommend": 5}) == {}
    assert "making progress again" in caplog.text


def test_idle_with_records_waiting_is_a_stall_idle_without_is_not():
    c = Clock()
    wd = Watchdog(30, clock=c)
    wd.register("normalize")
    c.t += 100
    assert wd.check({"normalize": 0}) == {}  # nothing to do: idle is fine
    assert wd.check({"normalize": None}) == {}  # lag unknown: no claim
    out = wd.check({"normalize": 7})
    assert out["normalize"].startswith("no progress for 100s with 7 records waiting")
    wd.begin("normalize")
    wd.done("normalize")
    c.t += 29
    assert wd.check({"normalize": 7}) == {}


def test_loop_watch_logs_a_blocked_loop_with_its_stack(caplog):
    caplog.set_level(logging.WARNING, "xrec.watchdog")
    lw = LoopWatch(0.3, period_s=0.05)
    lw.start()
    try:
        time.sleep(0.8)  # this thread is "the loop": it does not beat
        assert lw.blocked_episodes == 1
        assert "has not turned" in caplog.text and "test_loop_watch" in caplog.text
        lw.beat()
        time.sleep(0.2)
        assert "turns again" in caplog.text
    finally:
        lw.stop()
