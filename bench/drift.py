"""Drift benchmark: detection delay, misses, false alarms, and recovery with reactions on/off.

Each scenario is a synthetic stream (``xrec simulate --drift KIND@T``, T = the middle)
replayed in-process through the same core as the worker (normalizer, encoder, model,
trainer, prequential ranking, :mod:`models.drift` monitor and reactions). Drift-free
streams of the same simulator give the false alarms. Side by side on the same recorded
signals (per platform: prequential hit@10 and label streams): an always-fire detector and
each river detector at its defaults (ADWIN, PageHinkley, KSWIN).

Recovery: the events after the change until xrec's NDCG@10 (mean over the last 500 ranked
positives, all after the change) is back within 90% of its level over the 3,000 events
before the change; once with reactions on, once off, same stream and seed.

Last stdout line (``--json``): {"max_delay_events", "misses", "false_alarms_per_100k",
"recovery_events_on", "recovery_events_off"} for the xrec monitor (recovery: mean over the
scenarios; a stream that never recovers counts its remaining length).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from models.drift import DriftConfig, DriftMonitor, ReactionConfig, Reactions  # noqa: E402
from models.prequential import EvalConfig, Prequential  # noqa: E402
from streams.platforms import load_platforms  # noqa: E402
from streams.settings import Settings  # noqa: E402
from xrec.evaluate import run_eval  # noqa: E402

SCENARIOS = ("interest", "catalog", "labels")


class Recorder:
    """Observes the prequential stream: feeds the monitor, reacts, records signals."""

    def __init__(self, monitor: DriftMonitor, react: bool,
                 rcfg: ReactionConfig | None = None) -> None:
        self.monitor, self.react = monitor, react
        self.rcfg = rcfg or ReactionConfig()
        self.now = 0.0
        self.pq: Prequential | None = None
        self.reactions: Reactions | None = None
        self.idx = 0
        self.ndcg: list[tuple[int, float]] = []  # (event index, ndcg@10 of a ranked positive)
        self.streams: dict[tuple[str, str], list[tuple[int, float]]] = {}
        self.pending = 0

    def observe(self, batch, qs, ranks) -> None:  # type: ignore[no-untyped-def]
        assert self.pq is not None
        if self.reactions is None:
            model = self.pq.online

            def horizon(platform: str, seconds: float) -> None:
                old = model.horizon  # type: ignore[attr-defined]
                start = old[0] if old is not None and old[1] > self.now else self.now
                model.horizon = (start, self.now + seconds)  # type: ignore[attr-defined]

            self.reactions = Reactions(model.trainer, default=self.rcfg,  # type: ignore[attr-defined]
                                       horizon=horizon)
        self.reactions.tick(self.pending)
        self.pending = sum(1 for q in qs if q.label)
        t = self.pq.table
        for ev, q, rank in zip(batch, qs, ranks["xrec"], strict=True):
            self.now = ev.time
            hit = None if rank is None else int(rank < 10)
            vec = t.text[q.gid] if t.has_text[q.gid] else None
            for s in self.monitor.observe(ev.platform, ev.item, int(ev.label), vec, hit):
                if self.react:
                    self.reactions.react(s.platform, s.signal)
            if rank is not None:
                self.ndcg.append((self.idx, 1.0 / math.log2(rank + 2) if rank < 10 else 0.0))
                self.streams.setdefault((ev.platform, "hit"), []).append((self.idx, hit))
            self.streams.setdefault((ev.platform, "labels"), []).append((self.idx,
                                                                         float(ev.label)))
            self.idx += 1


def run(kind: str, events: int, seed: int, react: bool, dcfg: DriftConfig,
        rcfg: ReactionConfig | None = None) -> dict[str, Any]:
    at = events // 2
    rec = Recorder(DriftMonitor(dcfg), react, rcfg)

    def setup(pq: Prequential) -> None:
        rec.pq = pq
        pq.observers.append(rec.observe)

    cfg = EvalConfig(methods=("xrec",))
    cfg.train.seed = cfg.model.seed = seed
    s = Settings(pseudonym_secret=SecretStr("bench-" + "x" * 26))
    run_eval(s, load_platforms(""), dataset="synthetic", sim_events=events, seed=seed, cfg=cfg,
             sim_drift=[f"{kind}@{at}"] if kind != "none" else [], setup=setup,
             say=lambda m: None)
    return {"kind": kind, "at": at if kind != "none" else None, "events": rec.idx,
            "signals": rec.monitor.signals, "ndcg": rec.ndcg, "streams": rec.streams}


def recovery(ndcg: list[tuple[int, float]], at: int, end: int, win: int = 500) -> int:
    pre = [v for i, v in ndcg if at - 3000 <= i < at]
    post = [(i, v) for i, v in ndcg if i >= at]
    level = 0.9 * float(np.mean(pre))
    vals = np.array([v for _, v in post])
    if len(vals) < win:
        return end - at
    roll = np.convolve(vals, np.ones(win) / win, mode="valid")
    ok = np.nonzero(roll >= level)[0]
    return int(post[ok[0] + win - 1][0] - at) if len(ok) else end - at


def river_fires(streams: dict, which: str) -> list[int]:  # type: ignore[type-arg]
    from river import drift

    make = {"ADWIN": drift.ADWIN, "PageHinkley": drift.PageHinkley, "KSWIN": drift.KSWIN}[which]
    out = []
    for lst in streams.values():
        d = make()
        for i, x in lst:
            d.update(x)
            if d.drift_detected:
                out.append(i)
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=30000, help="events per stream")
    ap.add_argument("--free-streams", type=int, default=4,
                    help="drift-free streams (different seeds) for false alarms")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    dcfg = DriftConfig()
    t0 = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    runs_on = {}
    for k in SCENARIOS:
        runs_on[k] = run(k, a.events, a.seed, True, dcfg)
        log(f"{k}: reactions on done ({time.perf_counter() - t0:.0f} s)")
    runs_off = {}
    for k in SCENARIOS:
        runs_off[k] = run(k, a.events, a.seed, False, dcfg)
        log(f"{k}: reactions off done ({time.perf_counter() - t0:.0f} s)")
    free = []
    for j in range(a.free_streams):
        free.append(run("none", a.events, a.seed + 100 + j, False, dcfg))
        log(f"drift-free stream {j + 1} done ({time.perf_counter() - t0:.0f} s)")
    free_events = sum(r["events"] for r in free)

    rows = []
    detectors = ["xrec monitor", "always fire", "river ADWIN", "river PageHinkley",
                 "river KSWIN"]

    def fires(det: str, r: dict) -> list[int]:  # type: ignore[type-arg]
        if det == "xrec monitor":
            return sorted(s.stream_index - 1 for s in r["signals"])
        if det == "always fire":
            return list(range(r["events"]))
        return river_fires(r["streams"], det.split()[1])

    summary: dict[str, Any] = {}
    for det in detectors:
        delays = {}
        for k, r in runs_off.items():  # detection on the reactions-off runs: no feedback
            f = [i for i in fires(det, r) if i >= r["at"]]
            delays[k] = (f[0] - r["at"]) if f else None
        fa = sum(len(fires(det, r)) for r in free) * 100_000 / free_events
        misses = sum(1 for v in delays.values() if v is None or v > 2000)
        found = [v for v in delays.values() if v is not None]
        summary[det] = {"delays": delays, "misses": misses, "fa": fa,
                        "max_delay": max(found) if found else None}
        rows.append(f"  {det:<18}" + "".join(f"{'-' if delays[k] is None else delays[k]:>10}"
                                           for k in SCENARIOS)
                    + f"{misses:>8}{fa:>14.1f}")
    print(f"detection delay (events after the change; {a.events:,}-event streams, change at "
          f"{a.events // 2:,}), misses (undetected or > 2,000), false alarms on "
          f"{free_events:,} drift-free events:")
    print(f"  {'detector':<18}" + "".join(f"{k:>10}" for k in SCENARIOS)
          + f"{'misses':>8}{'FA/100k':>14}")
    print("\n".join(rows))
    rec_on = {k: recovery(r["ndcg"], r["at"], r["events"]) for k, r in runs_on.items()}
    rec_off = {k: recovery(r["ndcg"], r["at"], r["events"]) for k, r in runs_off.items()}
    print("events to recover NDCG@10 ≥ 90% of its pre-drift level:")
    for k in SCENARIOS:
        print(f"  {k:<10} reactions on {rec_on[k]:>7,}   off {rec_off[k]:>7,}")
    for k, r in runs_on.items():
        sig = ", ".join(f"{s.platform}/{s.signal}@{s.stream_index - 1}" for s in r["signals"])
        print(f"  {k} (reactions on) signals: {sig or 'none'}")
    print(f"{time.perf_counter() - t0:.0f} s")
    x = summary["xrec monitor"]
    out = {"max_delay_events": x["max_delay"], "misses": x["misses"],
           "false_alarms_per_100k": round(x["fa"], 2),
           "recovery_events_on": round(float(np.mean(list(rec_on.values()))), 1),
           "recovery_events_off": round(float(np.mean(list(rec_off.values()))), 1)}
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
