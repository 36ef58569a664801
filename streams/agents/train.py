"""The train agent: training examples in micro-batches → optimizer steps → head versions.

``xrec.train.examples`` → :class:`streams.heads.TrainerService` (an executor thread; cuda
when present) → weights to Redis (one MULTI: version, blob, meta) → ``HeadVersion`` on
``xrec.models.heads``; recommenders poll the version key and swap the new heads in.

Cost: a batch starts at most every ``XREC_TRAIN_INTERVAL_S``; a batch bigger than
``XREC_TRAIN_LEARN_MAX`` (the trainer is behind) is learnt from a random sample of that
size (``xrec_train_skipped_total`` counts the rest); ``XREC_TRAIN_CPU_SHARE`` < 1 rests
after each batch in proportion to its work, bounding the share of a core training takes.

Differential privacy (``XREC_DP_EPSILON``, off by default): the trainer takes DP-SGD
steps (:mod:`models.dp`) and ``xrec_dp_epsilon_spent{platform}`` reports the ε its most-used
training example of each platform has spent (at most the target).

Run it in its own worker process (``xrec worker --agents train`` with its own
``XREC_APP_ID``; what ``xrec dev`` and docker-compose do): training is CPU-bound Python
and torch, and in the recommenders' process it competes with serving for the GIL. One
trainer per deployment: versions are a single sequence.

A second trainer started by mistake (two train workers in different groups, or several
all-agent workers in one group) cannot fork that sequence. Only the holder of the head
lease publishes: ``heads:lease`` in Redis, set to this agent's token with ``SET NX PX``
(``XREC_TRAIN_LEASE_S``, 10 s) and renewed every third of that while the agent lives
(:class:`HeadLease`). Every publish is fenced: one Lua script checks that the lease still
holds this token and only then writes the version (:meth:`HeadRegistry.publish`), so a
trainer that lost its lease while paused (GC, a stopped VM, a slow Redis) has its version
refused (``LeaseLost``), not interleaved. An agent without the lease is a **standby**: it
consumes its partitions of ``xrec.train.examples`` and learns nothing from them (a
standby would fork the weights), logs ``train agent standby`` with the holder's token,
sets ``xrec_train_standby`` to 1 and counts the examples in
``xrec_train_standby_examples_total``; it tries the lease at every renewal tick and takes
over when the holder's lease lapses (a killed holder: within ``XREC_TRAIN_LEASE_S`` plus a
tick; a stopped one releases it on a graceful shutdown, at once). Taking over, it loads
the latest published version and continues that sequence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from models.dp import from_settings as dp_from_settings
from models.drift import Reactions
from streams.agents.batching import consume_batches
from streams.agents.context import Context
from streams.heads import HeadRegistry, LeaseLost, TrainerService
from streams.metrics import Counter, Gauge
from streams.platforms import DriftSpec
from streams.records import DriftReaction, DriftSignal, TrainingExample

__all__ = ["install", "HeadLease"]

log = logging.getLogger("xrec.worker")


class HeadLease:
    """This train agent's view of the single-writer lease on head versions.

    ``held`` is what the last :meth:`tick` learnt; it is advisory (the fenced publish is
    what guarantees one writer). A tick that cannot reach Redis keeps ``held`` until the
    lease's time to live has passed since the last successful renewal, then drops it:
    the key has expired by then whatever Redis says later."""

    def __init__(self, reg: HeadRegistry, ttl_s: float, token: str | None = None) -> None:
        self.reg, self.ttl_s = reg, ttl_s
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.holder: str | None = None
        #: set when the lease was taken (not renewed): the model must continue from the
        #: latest published version before this agent publishes
        self.taken = False
        self._ok_at = 0.0

    async def tick(self) -> bool:
        """Take or renew the lease; returns ``held``."""
        now = time.monotonic()
        try:
            got = await self.reg.lease(self.token, self.ttl_s)
        except Exception as exc:  # noqa: BLE001 - Redis away: judged by the time to live
            if self.held and now - self._ok_at > self.ttl_s:
                self.lose(f"could not renew it for {now - self._ok_at:.0f}s ({exc})")
            return self.held
        if got:
            self._ok_at = now
            if not self.held:
                log.info("train agent holds the head lease (token %s): it publishes the "
                         "head versions", self.token)
            self.taken = self.taken or got == 2
            self.held, self.holder = True, self.token
        else:
            if self.held:
                self.lose("another trainer holds it")
            with_holder = await self._holder()
            if with_holder != self.holder:
                log.warning("train agent standby: the head lease is held by trainer %s; this "
                            "one publishes nothing and takes over when that lease lapses "
                            "(XREC_TRAIN_LEASE_S=%g)", with_holder, self.ttl_s)
            self.holder = with_holder
        return self.held

    async def _holder(self) -> str | None:
        try:
            return await self.reg.lease_holder()
        except Exception:  # noqa: BLE001
            return self.holder

    def lose(self, why: str) -> None:
        if self.held:
            log.warning("train agent lost the head lease (%s): standby", why)
        self.held = False


def install(ctx: Context) -> None:
    s, app, wd, state = ctx.settings, ctx.app, ctx.watchdog, ctx.state
    trainer = TrainerService(s, ctx.vectors, list(ctx.platforms))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrec-train")
    topic = app.topic(ctx.topics.train_examples, key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")
    ctx.agent_of_topic[ctx.topics.train_examples] = "train"
    wd.register("train")
    reactions: Reactions | None = None
    rng = random.Random(s.model_seed)
    lease = HeadLease(trainer.reg, s.train_lease_s)
    m = ctx.metrics
    standby_gauge = Gauge("xrec_train_standby", "1 while this train agent is a standby: "
                          "another trainer holds the head lease (heads:lease), so this one "
                          "learns and publishes nothing")
    standby_examples = Counter("xrec_train_standby_examples_total", "training examples a "
                               "standby train agent consumed without learning from them")
    m.registry.add(standby_gauge)
    m.registry.add(standby_examples)
    dp = dp_from_settings(s)
    dp_spent = Gauge("xrec_dp_epsilon_spent", "differential privacy: ε spent by the most-used "
                     "training example of the platform (accountant; at most XREC_DP_EPSILON)",
                     ["platform"])
    m.registry.add(dp_spent)
    published = [0]  # the version this agent last published

    async def lease_tick() -> bool:
        held = await lease.tick()
        standby_gauge.set(0 if held else 1)
        return held

    async def ready_to_publish() -> bool:
        """Holding the lease, with a model that continues the latest published version."""
        nonlocal reactions
        if not lease.held:
            return False
        fresh = trainer.model is None
        if lease.taken:  # taken, not renewed: another trainer may have published since
            lease.taken = False
            fresh = fresh or await state._retry("head version",
                                                trainer.reg.version) != published[0]
        if fresh:
            await state._retry("trainer start", trainer.start)
            reactions = None
            if dp is not None and trainer.trainer is not None:
                trainer.trainer.cfg.dp = dp.calibrate(trainer.trainer.cfg.steps)
                log.info("differential privacy on: ε=%g per example at δ=%g, clip %g, noise "
                         "multiplier %.3f", dp.epsilon, dp.delta, dp.clip, dp.sigma)
        return True

    async def react_to_drift() -> None:
        """Apply the reactions the recommenders asked for (platform config decides)."""
        nonlocal reactions
        if reactions is None and trainer.trainer is not None:
            reactions = Reactions(trainer.trainer, {
                p.name: p.drift.reaction_config(s.drift_reactions)
                for p in ctx.platforms.values()},
                default=DriftSpec().reaction_config(s.drift_reactions))
        if reactions is None:
            return
        key = state.k("drift", "reactions")
        while True:
            raw = await state._retry("drift reactions", lambda: ctx.redis.lpop(key))
            if raw is None:
                return
            try:
                sig = DriftSignal.model_validate_json(raw)
            except ValidationError:
                continue
            done = reactions.react(sig.platform, sig.signal)
            if done is None:
                continue
            log.warning("drift reaction on %s (%s): %s", sig.platform, sig.signal,
                        ", ".join(done["actions"]) or "nothing")
            rec = DriftReaction(platform=sig.platform, signal=sig.signal,
                                actions=done["actions"], time=time.time())
            await ctx.publish(ctx.topics.drift, sig.platform.encode(),
                              rec.model_dump_json().encode())

    async def learn_batch(events: Any) -> None:
        loop = asyncio.get_running_loop()
        arrived = time.time()
        if not await ready_to_publish():
            standby_examples.inc(len(events))
            return
        if len(events) > s.train_learn_max:  # behind: learn from a sample, keep up
            ctx.metrics.train_skipped.inc(len(events) - s.train_learn_max)
            events = rng.sample(events, s.train_learn_max)  # (parse only what is learnt)
        recs = []
        for ev in events:
            try:
                recs.append(TrainingExample.model_validate_json(ev.value))
            except ValidationError as exc:
                log.warning("bad training example skipped: %s", str(exc)[:200])
        # examples of users erased after producing them (xrec forget) are dropped here
        erased = await state.erased_at({r.user for r in recs})
        if erased:
            recs = [r for r in recs if r.produced_at > erased.get(r.user, -1.0)]
        if not recs:
            return
        await react_to_drift()
        steps = await loop.run_in_executor(pool, trainer.learn, recs)
        if reactions is not None and reactions.tick(len(recs)):
            log.info("drift reaction: learning rate back to %g", reactions.base_lr)
        if trainer.trainer is not None:
            for p, eps in trainer.trainer.dp_epsilon_spent().items():
                dp_spent.set(eps, p)
        if not steps:
            return
        blob = await loop.run_in_executor(pool, trainer.blob)
        newest = max(r.produced_at for r in recs)
        meta = {"batch_arrived_at": arrived, "newest_produced_at": newest}
        try:
            version = await state._retry("head publish", lambda: trainer.reg.publish(
                blob, meta, token=lease.token))
        except LeaseLost:  # fenced: nothing was written; continue from the holder's versions
            lease.lose("a publish was refused: the lease is no longer this trainer's")
            standby_gauge.set(1)
            trainer.model = None
            return
        published[0] = version
        rec = trainer.record(version, len(recs), arrived, newest, len(blob))
        m.head_published.set(version)
        m.head_event_to_publish_s.observe(time.time() - newest)
        if rec.loss is not None:
            m.train_loss.set(rec.loss)
        await ctx.publish(ctx.topics.heads, None, rec.model_dump_json().encode())

    async def batch(events: list[Any]) -> None:
        wd.begin("train")
        t0 = time.perf_counter()
        await learn_batch(events)
        busy = time.perf_counter() - t0
        ctx.metrics.train_batch_ms.observe(busy * 1000)
        wd.done("train")
        if s.train_cpu_share < 1.0:  # a CPU budget: rest in proportion to the work
            await asyncio.sleep(busy * (1.0 / s.train_cpu_share - 1.0))

    @app.timer(max(0.2, s.train_lease_s / 3))
    async def renew_lease() -> None:
        try:
            await lease_tick()
        except Exception:  # a report must never take the worker down
            log.exception("head lease tick failed")

    erasures_seen = [time.time()]  # erasures before the agent started: nothing buffered

    @app.timer(1.0)
    async def forget_erased() -> None:
        """Users erased since the last look (``xrec forget``): their examples leave the
        replay buffer, so nothing of them is trained on again (in-flight ones are dropped
        as they arrive, in ``learn_batch``)."""
        try:
            # a few seconds back: erasure times come from the CLI's clock (repeats are harmless)
            new = await state.erasures_since(erasures_seen[0] - 5.0)
            if not new or trainer.trainer is None:
                return
            n = await asyncio.get_running_loop().run_in_executor(
                pool, trainer.trainer.forget_users, set(new))
            erasures_seen[0] = max(erasures_seen[0], *new.values())
            if n:
                log.info("erasure: dropped %d buffered training examples of %d user(s)", n,
                         len(new))
        except Exception:  # a report must never take the worker down
            log.exception("erasure check failed")

    @app.on_before_shutdown.connect
    async def _release_lease(sender: Any, **_kw: Any) -> None:
        """Graceful stop: hand the lease over at once (a standby takes it at its tick)."""
        if lease.held:
            try:
                await trainer.reg.release_lease(lease.token)
                log.info("train agent released the head lease")
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the head lease: %s", exc)

    @app.agent(topic, name="xrec.train")
    async def train(stream: Any) -> None:
        await lease_tick()
        await ready_to_publish()
        await consume_batches(stream, s.train_batch_max, s.train_interval_s, batch)
