"""The recommend agent's micro-batch in-process: what each stage costs, by batch size.

No broker: the simulator's events are normalized in-process and fed to the recommend
agent's body (:class:`streams.agents.recommend.Recommender`) in micro-batches of a fixed
size; Redis is a real embedded one, the encoder and the model are the real ones (the
model trained online on the first part of the stream, as in the worker), and what the
agent would publish goes to a counting sink in place of the Kafka producer. This measures
the CPU cost of the code between Faust and the producer, stage by stage, so a regression
shows where it is; ``bench/streamed.py`` measures the whole loop on a real broker.

``--json``: the last stdout line is ``{"batch_sizes": [...], "per_event_ms": {size: ms},
"stages_ms": {size: {stage: ms per batch}}, "redis_script_us_per_call": µs}`` (the last:
Redis's own time per apply-script call, over the whole run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.heads import HeadsModel, save_model  # noqa: E402
from producers.simulate import SimConfig, simulate  # noqa: E402
from streams.agents.context import RECOMMEND_STAGES, Context, WorkerMetrics  # noqa: E402
from streams.agents.recommend import Recommender  # noqa: E402
from streams.heads import HeadRegistry, ModelServer, TrainerService, model_config  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.records import TrainingExample  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.state import RedisState, redis_from_url  # noqa: E402
from streams.topics import Topics  # noqa: E402
from streams.vectors import VectorStore  # noqa: E402
from streams.watchdog import Watchdog  # noqa: E402
from xrec.evaluate import _catalog_texts, _encode, _normalized  # noqa: E402
from xrec.stack import start_redis  # noqa: E402


class _Done:
    """A delivery future that has already succeeded."""

    def add_done_callback(self, fn) -> None:  # noqa: ANN001
        pass


_DONE = _Done()


class Sink:
    """Stands where the Kafka producer is: counts what the agent would send."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.examples: list[bytes] = []
        self.train_topic = ""

    async def send(self, topic, key, value, partition, timestamp, headers):  # noqa: ANN001
        self.sent[topic] = self.sent.get(topic, 0) + 1
        if topic == self.train_topic:
            self.examples.append(value)
        return _DONE  # what the client returns: a delivery future (here: delivered)


class _App:
    def __init__(self) -> None:
        self.producer = Sink()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    wd = Path(tempfile.mkdtemp(prefix="xrec-hotpath-"))
    rs = start_redis(wd)
    try:
        s = Settings(env="dev", kafka_bootstrap_servers="unused:9092", redis_url=rs.url,
                     redis_prefix="hp:", cross_refresh_s=args.cross_refresh_s,
                     hybrid_weight=args.hybrid_weight, cooc_read=args.cooc_read)
        platforms = load_platforms(s.platforms_path)
        topics = Topics(s)
        man = simulate(SimConfig(events=args.events, seed=args.seed), wd / "sim")
        dead: dict[str, int] = {}
        events = _normalized(s, platforms, [(p, wd / "sim" / f) for p, f in
                                            man["files"]["events"].items()], dead)
        texts = _catalog_texts(s, platforms, [(p, wd / "sim" / f) for p, f in
                                              man["files"]["catalog"].items()], dead)
        vecs = _encode(s, texts, log)
        from models.encoder import load_encoder

        enc = load_encoder(s.encoder_config())
        vectors = VectorStore(rs.url, s.redis_prefix, enc.id, enc.dim)
        for p, (ids, mat) in vecs.items():
            await vectors.put(p, ids, mat)
        await vectors.refresh(list(platforms))
        redis = redis_from_url(rs.url)
        app = _App()
        app.producer.train_topic = topics.train_examples
        ctx = Context(app=app, settings=s, platforms=platforms, topics=topics, redis=redis,
                      state=RedisState(redis, s, topics.unified, epoch="hp"),
                      metrics=WorkerMetrics(), watchdog=Watchdog(30), wanted={"recommend"},
                      worker="bench", vectors=vectors)
        reg = HeadRegistry(rs.url, s.redis_prefix)
        model = HeadsModel(model_config(s, enc.dim), list(platforms))
        await reg.publish(save_model(model, compact=True), {})
        ctx.server = ModelServer(s, vectors, "bench")
        await ctx.server.poll()
        trainer = TrainerService(s, vectors, list(platforms))
        await trainer.start()
        from streams.agents.drift import DriftWatch

        core = Recommender(ctx, DriftWatch(ctx))
        msgs = [(topics.unified, hash(ev.user) % 4, n, ev.model_dump_json().encode())
                for n, ev in enumerate(events)]
        warm = int(len(msgs) * args.warmup)
        log(f"{len(msgs):,} events; warm-up (with online training) on the first {warm:,}")
        for i in range(0, warm, 64):
            await core.handle(msgs[i:i + 64])
            ex = [TrainingExample.model_validate_json(v) for v in app.producer.examples]
            app.producer.examples.clear()
            if ex and trainer.learn(ex):
                await trainer.reg.publish(trainer.blob(), {})
                await ctx.server.poll()
        rest = msgs[warm:]
        await redis.config_resetstat()  # Redis's own figures: the measured part only
        out: dict = {"batch_sizes": args.sizes, "per_event_ms": {}, "stages_ms": {}}
        at = 0
        for size in args.sizes:
            n = min(args.per_size, len(rest) - at)
            chunk = rest[at:at + n]
            at += n
            totals: dict[str, float] = {}
            t0 = time.perf_counter()
            batches = 0
            for i in range(0, len(chunk), size):
                rep = await core.handle(chunk[i:i + size])
                batches += 1
                for k, v in rep["ms"].items():
                    totals[k] = totals.get(k, 0.0) + v
            await ctx.state.cache_flush()  # the background cache writes count in the wall
            wall = (time.perf_counter() - t0) * 1000
            out["per_event_ms"][str(size)] = round(wall / max(1, len(chunk)), 4)
            out["stages_ms"][str(size)] = {k: round(totals.get(k, 0.0) / batches, 3)
                                           for k in RECOMMEND_STAGES}
            log(f"batch {size:>4}: {wall / len(chunk):.3f} ms/event, "
                f"{wall / batches:.2f} ms/batch | " + " ".join(
                    f"{k} {totals.get(k, 0.0) / batches:.2f}" for k in RECOMMEND_STAGES))
        cs = await redis.info("commandstats")
        ev = cs.get("cmdstat_evalsha") or {}
        out["redis_script_us_per_call"] = ev.get("usec_per_call")
        log(f"redis scripts: {ev}")
        top = sorted(((k[8:], v) for k, v in cs.items() if k.startswith("cmdstat_")),
                     key=lambda kv: -kv[1].get("usec", 0))[:12]
        log("redis commands by time (scripts include what they call): " + ", ".join(
            f"{k} {v['calls']}×{v['usec_per_call']:.1f}µs" for k, v in top))
        return out
    finally:
        rs.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=30000)
    ap.add_argument("--warmup", type=float, default=0.3, help="share of events to warm up on")
    ap.add_argument("--sizes", type=lambda x: [int(v) for v in x.split(",")],
                    default=[1, 4, 16, 64, 256])
    ap.add_argument("--per-size", type=int, default=3000, help="events measured per size")
    ap.add_argument("--cross-refresh-s", type=float, default=10.0)
    ap.add_argument("--hybrid-weight", type=float, default=Settings.model_fields[
        "hybrid_weight"].default, help="XREC_HYBRID_WEIGHT (0: the model alone)")
    ap.add_argument("--cooc-read", type=int, default=Settings.model_fields["cooc_read"].default,
                    help="XREC_COOC_READ: co-occurrence neighbours read per recent item")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
