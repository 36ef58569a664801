"""The train agent: training examples in micro-batches → optimizer steps → head versions.

``xrec.train.examples`` → :class:`streams.heads.TrainerService` (an executor thread; cuda
when present) → weights to Redis (one MULTI: version, blob, meta) → ``HeadVersion`` on
``xrec.models.heads``; recommenders poll the version key and swap the new heads in.

Cost: a batch starts at most every ``XREC_TRAIN_INTERVAL_S``; a batch bigger than
``XREC_TRAIN_LEARN_MAX`` (the trainer is behind) is learnt from a random sample of that
size (``xrec_train_skipped_total`` counts the rest); ``XREC_TRAIN_CPU_SHARE`` < 1 rests
after each batch in proportion to its work, bounding the share of a core training takes.

Run it in its own worker process (``xrec worker --agents train`` with its own
``XREC_APP_ID``; what ``xrec dev`` and docker-compose do): training is CPU-bound Python
and torch, and in the recommenders' process it competes with serving for the GIL. One
trainer per deployment: versions are a single sequence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from models.drift import Reactions
from streams.agents.batching import consume_batches
from streams.agents.context import Context
from streams.heads import TrainerService
from streams.platforms import DriftSpec
from streams.records import DriftReaction, DriftSignal, TrainingExample

__all__ = ["install"]

log = logging.getLogger("xrec.worker")


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
        if len(events) > s.train_learn_max:  # behind: learn from a sample, keep up
            ctx.metrics.train_skipped.inc(len(events) - s.train_learn_max)
            events = rng.sample(events, s.train_learn_max)  # (parse only what is learnt)
        recs = []
        for ev in events:
            try:
                recs.append(TrainingExample.model_validate_json(ev.value))
            except ValidationError as exc:
                log.warning("bad training example skipped: %s", str(exc)[:200])
        if not recs:
            return
        await react_to_drift()
        steps = await loop.run_in_executor(pool, trainer.learn, recs)
        if reactions is not None and reactions.tick(len(recs)):
            log.info("drift reaction: learning rate back to %g", reactions.base_lr)
        if not steps:
            return
        blob = await loop.run_in_executor(pool, trainer.blob)
        newest = max(r.produced_at for r in recs)
        meta = {"batch_arrived_at": arrived, "newest_produced_at": newest}
        version = await state._retry("head publish", lambda: trainer.reg.publish(blob, meta))
        rec = trainer.record(version, len(recs), arrived, newest, len(blob))
        m = ctx.metrics
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

    @app.agent(topic, name="xrec.train")
    async def train(stream: Any) -> None:
        if trainer.model is None:
            await state._retry("trainer start", trainer.start)
        await consume_batches(stream, s.train_batch_max, s.train_interval_s, batch)
