"""One writer of head versions: the train agent's lease (``heads:lease``) and the fenced
publish (``HeadRegistry.publish(token=...)``), against the session's real Redis."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from streams.agents.train import HeadLease
from streams.heads import HeadRegistry, LeaseLost


def _reg(stack, ns: str) -> HeadRegistry:
    return HeadRegistry(stack.redis_url, f"{ns}:", timeout_s=5)


def test_the_lease_admits_one_publisher_and_fences_a_paused_one(stack, ns):
    async def go() -> None:
        a, b = _reg(stack, ns), _reg(stack, ns)
        try:
            assert await a.lease("A", 0.6) == 2  # taken
            assert await b.lease("B", 0.6) == 0  # held by A: B is a standby
            assert await a.lease("A", 0.6) == 1  # renewed
            assert await a.lease_holder() == "A"
            with pytest.raises(LeaseLost):
                await b.publish(b"b-weights", {"by": "B"}, token="B")
            assert await a.version() == 0  # the refused publish wrote nothing
            assert await a.publish(b"a1", {"by": "A"}, token="A") == 1
            # A "pauses" (GC, a stopped VM) past its lease; B takes over and publishes
            await asyncio.sleep(0.8)
            assert await b.lease("B", 0.6) == 2
            assert await b.publish(b"b2", {"by": "B"}, token="B") == 2
            # A wakes up believing it still holds the lease: its publish is refused whole
            with pytest.raises(LeaseLost):
                await a.publish(b"a-stale", {"by": "A"}, token="A")
            v, blob, meta = await a.latest()
            assert (v, blob, meta) == (2, b"b2", {"by": "B"})
            # releasing is for the holder only; then the lease is free at once
            assert not await a.release_lease("A")
            assert await b.release_lease("B")
            assert await a.lease_holder() is None
            assert await a.lease("A", 5) == 2
            # unfenced publishes (tests, benchmarks) still work
            assert await a.publish(b"x", {}) == 3
        finally:
            await a.r.aclose()
            await b.r.aclose()

    asyncio.run(go())


def test_two_trainers_with_pauses_never_interleave_their_versions(stack, ns):
    """Two simulated trainers loop: renew or take the lease, and when they hold it,
    "train" (a pause, sometimes longer than the lease's time to live: a GC pause) and
    publish fenced by their token. A trainer that takes the lease continues from the
    latest version (as the train agent reloads it). Every accepted version must then be
    exactly its writer's previous version + 1: no version of the other trainer slipped
    in between, whatever the timing."""
    ttl = 0.3
    accepted: list[tuple[int, str]] = []
    refused = {"A": 0, "B": 0}

    async def trainer(name: str, seed: int) -> None:
        reg = _reg(stack, ns)
        rng = random.Random(seed)
        base: int | None = None  # the version this trainer's model continues
        try:
            for _ in range(60):
                got = await reg.lease(name, ttl)
                if got == 0:
                    base = None
                    await asyncio.sleep(ttl / 3)
                    continue
                if got == 2 or base is None:
                    base = await reg.version()  # reload the latest published version
                await asyncio.sleep(rng.choice([0.0, 0.01, 0.05, ttl * 1.5]))  # train / pause
                try:
                    v = await reg.publish(f"{name}{base + 1}".encode(), {"by": name,
                                                                        "base": base},
                                          token=name)
                except LeaseLost:
                    refused[name] += 1
                    base = None
                    continue
                assert v == base + 1, f"{name} published v{v} on top of v{base}"
                accepted.append((v, name))
                base = v
        finally:
            await reg.r.aclose()

    async def go() -> None:
        await asyncio.gather(trainer("A", 1), trainer("B", 2))

    asyncio.run(go())
    versions = [v for v, _ in accepted]
    assert versions == list(range(1, len(versions) + 1))  # one gapless sequence
    assert {n for _, n in accepted} == {"A", "B"}  # both wrote at some point (takeovers)
    assert refused["A"] + refused["B"] > 0  # and the fence refused paused ones


def test_the_train_agents_lease_reports_a_standby_and_takes_over(stack, ns, caplog):
    """The train agent's :class:`HeadLease`: a second agent is a standby (log line), and
    takes over when the holder stops renewing; a holder that lost it says so."""
    async def go() -> None:
        ra, rb = _reg(stack, ns), _reg(stack, ns)
        a, b = HeadLease(ra, 1.0, token="trainer-a"), HeadLease(rb, 1.0, token="trainer-b")
        try:
            assert await a.tick() and a.taken
            assert not await b.tick() and b.holder == "trainer-a"
            assert await a.tick()  # renewed
            await asyncio.sleep(1.3)  # a dies: no renewals
            assert await b.tick() and b.taken
            assert not await a.tick() and a.holder == "trainer-b"
        finally:
            await ra.r.aclose()
            await rb.r.aclose()

    with caplog.at_level(logging.INFO, logger="xrec.worker"):
        asyncio.run(go())
    text = caplog.text
    assert "train agent standby: the head lease is held by trainer trainer-a" in text
    assert "train agent holds the head lease (token trainer-b)" in text
    assert "train agent lost the head lease" in text
