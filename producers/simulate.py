"""Synthetic cross-platform behaviour: shared users whose latent interests span platforms.

Each user has a mixture over themes (space, cooking, jazz_noir, …). Items of every
platform belong to a theme and carry real words, so a telescope, a space-opera film and
a synthwave album share a theme. Users act on-theme most of the time: they buy, watch to
the end, listen without skipping; off-theme they browse, abandon and skip.

Output folder (``xrec simulate --out DIR``)::

    <platform>.events.jsonl     native events, in time order (malformed lines injected)
    <platform>.catalog.jsonl    native catalog records
    ingest.events.jsonl         mixed-platform events naming their platform (some unknown)
    manifest.json               counts, injected malformed events per code, ground truth
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from producers.themes import THEMES

__all__ = ["SimConfig", "simulate", "MALFORMED_KINDS", "DUPLICATE_KINDS", "HOSTILE_KINDS",
           "parse_drift", "Drift", "DRIFT_KINDS"]

PLATFORMS = ("shop", "video", "music")
#: malformed kind → the dead-letter code the worker must give it
MALFORMED_KINDS = {
    "truncated_json": "invalid_json",
    "nan": "invalid_json",
    "wrong_type": "schema",
    "missing_field": "schema",
    "bad_enum": "schema",
    "oversized": "too_large",
    "far_future": "time_out_of_range",
    "invalid_utf8": "invalid_utf8",
    "not_object": "not_an_object",
    "deep_nesting": "too_deep",
    "infinity": "invalid_json",
    "ancient": "time_out_of_range",
    "huge_number": "schema",
    "oversized_string": "schema",
    "oversized_array": "schema",
    "field_flood": "schema",
    "wrong_type_user": "schema",
    "empty_object": "schema",
}
#: hostile but valid: the same event sent again (same event id), verbatim or with unknown
#: extra fields. Never dead-lettered; applied once (the per-user event-id set skips it).
DUPLICATE_KINDS = ("duplicate", "duplicate_extra_fields")
HOSTILE_KINDS = (*MALFORMED_KINDS, *DUPLICATE_KINDS)
USER_FIELD = {"shop": "customer_id", "video": "viewer_id", "music": "listener_id"}
ITEM_FIELD = {"shop": "sku", "video": "video_id", "music": "track_id"}
TIME_FIELD = {"shop": "ts", "video": "watched_at", "music": "played_at"}


@dataclass
class SimConfig:
    events: int = 20000
    users: int | None = None  # default: events // 40, at least 50
    items_per_theme: int = 30
    malformed: float = 0.0  # fraction of extra malformed lines
    ingest_events: int = 0  # mixed-platform events on the ingest topic (some unknown platforms)
    seed: int = 7
    span_s: float = 86400.0  # event times spread over the last span_s seconds
    end_time: float | None = None  # default: now
    shared_identity: float = 0.8  # share of users whose events carry the account id
    noise: float = 0.1  # share of off-theme actions
    #: drift scenarios with ground truth, e.g. ["interest@15000", "labels@0.5:video"]
    drift: list[str] = field(default_factory=list)


DRIFT_KINDS = ("interest", "catalog", "labels")


@dataclass
class Drift:
    """One injected change. ``at`` = index of the first changed event (valid events, in
    time order: the same numbering as the replayed stream without malformed lines)."""

    kind: str
    at: int
    platform: str | None = None


def parse_drift(spec: str, events: int) -> Drift:
    """``interest@T``, ``catalog@T``, ``labels@T[:platform]``; T an event index or a fraction."""
    kind, sep, rest = spec.partition("@")
    if kind not in DRIFT_KINDS or not sep:
        raise ValueError(f"drift {spec!r}: expected KIND@T with KIND one of "
                         f"{', '.join(DRIFT_KINDS)} (e.g. interest@15000, labels@0.5:video)")
    at_s, _, plat = rest.partition(":")
    try:
        at_f = float(at_s)
    except ValueError:
        raise ValueError(f"drift {spec!r}: T must be an event index or a fraction") from None
    at = int(at_f * events) if 0 < at_f < 1 else int(at_f)
    if not 0 < at < events:
        raise ValueError(f"drift {spec!r}: T={at} is outside the stream (0, {events})")
    if plat and plat not in PLATFORMS:
        raise ValueError(f"drift {spec!r}: unknown platform {plat!r}")
    if plat and kind != "labels":
        raise ValueError(f"drift {spec!r}: only labels drift takes a platform")
    return Drift(kind, at, plat or ("video" if kind == "labels" else None))

def _catalog(rng: np.random.Generator, n_per_theme: int) -> dict[str, list[dict[str, Any]]]:
    cat: dict[str, list[dict[str, Any]]] = {p: [] for p in PLATFORMS}
    for t_idx, (theme, v) in enumerate(THEMES.items()):
        for j in range(n_per_theme):
            n = t_idx * n_per_theme + j
            adj = v["adjectives"][j % len(v["adjectives"])]
            prod = v["products"][(j // len(v["adjectives"])) % len(v["products"])]
            cat["shop"].append({
                "sku": f"sku-{n:05d}", "title": f"{adj.title()} {prod}",
                "category": str(rng.choice(v["category"])), "brand": str(rng.choice(v["brands"])),
                "price": round(float(rng.lognormal(3.3, 0.8)), 2), "_theme": theme})
            base = v["video"][j % len(v["video"])]
            title = base if j < len(v["video"]) else f"{base} {_roman(j // len(v['video']) + 1)}"
            cat["video"].append({
                "video_id": f"vid-{n:05d}", "title": title,
                "genres": ", ".join(v["genres"]), "synopsis": str(rng.choice(v["synopsis"])),
                "year": int(rng.integers(1950, 2026)),
                "_duration": float(rng.choice([1500, 2700, 5400, 7200])), "_theme": theme})
            track = v["tracks"][j % len(v["tracks"])]
            artist = v["artists"][(j // len(v["tracks"])) % len(v["artists"])]
            cat["music"].append({
                "track_id": f"trk-{n:05d}",
                "track": track if j < len(v["tracks"]) else f"{track} ({_mix(j)})",
                "artist": artist, "album": f"{v['tags'][0].title()} Collection",
                "tags": ", ".join(v["tags"]), "_len_ms": int(rng.integers(120_000, 360_000)),
                "_theme": theme})
    return cat


FAMILY = {
    "shop": ("Aurora {n} smart lantern", "lighting", "Aurora Labs"),
    "video": ("Aurora Chronicles episode {n}", "anthology", "glowing northern lights saga"),
    "music": ("Aurora Drift {n}", "aurora wave", "Northern Choir"),
}


def _family(rng: np.random.Generator, n: int, n_themes: int) -> dict[str, list[dict[str, Any]]]:
    """A new item family (ids after the regular catalog) for the catalog drift."""
    out: dict[str, list[dict[str, Any]]] = {p: [] for p in PLATFORMS}
    for j in range(n):
        k = n_themes * n + j
        out["shop"].append({"sku": f"sku-{k:05d}", "title": FAMILY["shop"][0].format(n=j + 1),
                            "category": FAMILY["shop"][1], "brand": FAMILY["shop"][2],
                            "price": round(float(rng.lognormal(3.3, 0.8)), 2),
                            "_theme": "aurora"})
        out["video"].append({"video_id": f"vid-{k:05d}",
                             "title": FAMILY["video"][0].format(n=j + 1),
                             "genres": FAMILY["video"][1], "synopsis": FAMILY["video"][2],
                             "year": 2026, "_duration": 2700.0, "_theme": "aurora"})
        out["music"].append({"track_id": f"trk-{k:05d}",
                             "track": FAMILY["music"][0].format(n=j + 1),
                             "artist": FAMILY["music"][2], "album": "Aurora",
                             "tags": FAMILY["music"][1],
                             "_len_ms": int(rng.integers(120_000, 360_000)),
                             "_theme": "aurora"})
    return out


def _roman(n: int) -> str:
    return ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X"][n] if n <= 10 \
        else str(n)


def _mix(j: int) -> str:
    return ["Remix", "Live", "Acoustic", "Extended Mix", "Radio Edit", "Demo"][j % 6]


def simulate(cfg: SimConfig, out: Path) -> dict[str, Any]:
    """Write the files into ``out`` and return the manifest."""
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    themes = list(THEMES)
    n_t = len(themes)
    n_users = cfg.users or max(50, cfg.events // 40)
    drifts = [parse_drift(d, cfg.events) for d in cfg.drift]
    catalog = _catalog(rng, cfg.items_per_theme)
    by_theme = {p: {t: [it for it in catalog[p] if it["_theme"] == t] for t in themes}
                for p in PLATFORMS}
    # drift randomness has its own generator: a stream without drift is unchanged
    drng = np.random.default_rng(cfg.seed + 7919)
    family: dict[str, list[dict[str, Any]]] = {}
    if any(d.kind == "catalog" for d in drifts):
        family = _family(drng, cfg.items_per_theme, len(themes))
        for p in PLATFORMS:
            catalog[p] += family[p]
    zipf = np.array([1.0 / (r + 1) ** 1.1 for r in range(cfg.items_per_theme)])
    zipf /= zipf.sum()

    interests = rng.dirichlet(np.full(n_t, 0.25), size=n_users)
    interests_after = drng.dirichlet(np.full(n_t, 0.25), size=n_users)
    at = {d.kind: d for d in drifts}
    activity = rng.lognormal(0, 1.0, size=n_users)
    activity /= activity.sum()
    member = rng.random((n_users, len(PLATFORMS))) < 0.7
    member[~member.any(axis=1), rng.integers(0, len(PLATFORMS))] = True
    shared = rng.random(n_users) < cfg.shared_identity

    end = cfg.end_time or time.time() - 60.0
    start = end - cfg.span_s
    times = np.sort(rng.uniform(start, end, size=cfg.events))
    users = rng.choice(n_users, size=cfg.events, p=activity)

    files = {p: open(out / f"{p}.events.jsonl", "wb") for p in PLATFORMS}  # noqa: SIM115
    counts: Counter[str] = Counter()
    malformed: Counter[str] = Counter()
    deadletter_expected: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    try:
        for n in range(cfg.events):
            u = int(users[n])
            plats = [p for i, p in enumerate(PLATFORMS) if member[u, i]]
            p = plats[int(rng.integers(len(plats)))]
            on_theme = rng.random() >= cfg.noise
            moved = "interest" in at and n >= at["interest"].at
            tastes = interests_after if moved else interests
            theme = themes[int(rng.choice(n_t, p=tastes[u]))] if on_theme \
                else themes[int(rng.integers(n_t))]
            item = by_theme[p][theme][int(rng.choice(cfg.items_per_theme, p=zipf))]
            liked = tastes[u, themes.index(theme)] > 0.15
            if "catalog" in at and n >= at["catalog"].at and drng.random() < 0.6:
                item = family[p][int(drng.choice(cfg.items_per_theme, p=zipf))]
                liked = drng.random() < 0.85  # the new family is what people want now
            if "labels" in at and n >= at["labels"].at and p == at["labels"].platform \
                    and liked and drng.random() < 0.8:
                liked = False  # e.g. a UI change: far fewer completions / purchases
            ev = _event(rng, p, n, u, item, liked, float(times[n]), bool(shared[u]))
            files[p].write(json.dumps(ev, separators=(",", ":")).encode() + b"\n")
            counts[p] += 1
            if cfg.malformed > 0 and rng.random() < cfg.malformed:
                kind = HOSTILE_KINDS[int(rng.integers(len(HOSTILE_KINDS)))]
                if kind in DUPLICATE_KINDS:
                    dup = ev if kind == "duplicate" else {**ev, "client": "retry", "attempt": 2}
                    files[p].write(json.dumps(dup, separators=(",", ":")).encode() + b"\n")
                    duplicates[kind] += 1
                else:
                    files[p].write(_malform(kind, ev, p, rng) + b"\n")
                    malformed[kind] += 1
                    deadletter_expected[MALFORMED_KINDS[kind]] += 1
    finally:
        for f in files.values():
            f.close()

    ingest_unknown = 0
    with open(out / "ingest.events.jsonl", "wb") as f:
        for n in range(cfg.ingest_events):
            u = int(rng.integers(n_users))
            if n % 5 == 4:
                ev = {"platform": "telegraph", "event_id": f"i-{n:07d}",
                      "sender": f"telegraph-user-{u:05d}"}
                ingest_unknown += 1
            else:
                p = PLATFORMS[n % 3]
                theme = themes[int(rng.choice(n_t, p=interests[u]))]
                item = by_theme[p][theme][int(rng.choice(cfg.items_per_theme, p=zipf))]
                ev = {"platform": p, **_event(rng, p, 10_000_000 + n, u, item, True, end,
                                              bool(shared[u]))}
            f.write(json.dumps(ev, separators=(",", ":")).encode() + b"\n")
    if ingest_unknown:
        deadletter_expected["unknown_platform"] += ingest_unknown

    for p in PLATFORMS:
        with open(out / f"{p}.catalog.jsonl", "w", encoding="utf-8") as f:
            for it in catalog[p]:
                f.write(json.dumps({k: v for k, v in it.items() if not k.startswith("_")})
                        + "\n")
    manifest = {
        "seed": cfg.seed,
        "events": cfg.events + sum(malformed.values()) + sum(duplicates.values())
        + cfg.ingest_events,
        "valid_events": cfg.events + cfg.ingest_events - ingest_unknown,
        "events_by_platform": dict(counts),
        "malformed": sum(malformed.values()) + ingest_unknown,
        "malformed_by_kind": dict(malformed),
        # the same event sent again: not dead-lettered, applied once
        "duplicates": sum(duplicates.values()),
        "duplicates_by_kind": dict(duplicates),
        "deadletter_expected": dict(deadletter_expected),
        "users": n_users,
        "items": {p: len(catalog[p]) for p in PLATFORMS},
        "themes": themes,
        "time_range": [start, end],
        "drift": [{"kind": d.kind, "at_event": d.at, "platform": d.platform} for d in drifts],
        "files": {
            "events": {p: f"{p}.events.jsonl" for p in PLATFORMS},
            "catalog": {p: f"{p}.catalog.jsonl" for p in PLATFORMS},
            "ingest": "ingest.events.jsonl",
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _event(rng: np.random.Generator, p: str, n: int, u: int, item: dict[str, Any], liked: bool,
           t: float, shared: bool) -> dict[str, Any]:
    ev: dict[str, Any] = {"event_id": f"{p[0]}-{n:08d}", USER_FIELD[p]: f"{p}-user-{u:05d}"}
    if shared:
        ev["account_id"] = f"acct-{u:05d}"
    ev[ITEM_FIELD[p]] = item[ITEM_FIELD[p]]
    if p == "shop":
        r = rng.random()
        ev["action"] = ("purchase" if r < 0.12 else "cart" if r < 0.35 else "view") if liked \
            else ("cart" if r < 0.05 else "view")
        ev["price"] = item["price"]
        ev["ts"] = round(t, 3)
    elif p == "video":
        d = item["_duration"]
        frac = float(rng.beta(5, 1.5)) if liked else float(rng.beta(1, 6))
        ev["seconds_watched"] = round(d * frac, 1)
        ev["duration"] = d
        if rng.random() < 0.2:
            ev["rating"] = int(rng.integers(4, 6)) if liked else int(rng.integers(1, 4))
        ev["watched_at"] = _iso(t)  # ISO-8601, to exercise time parsing
    else:
        length = item["_len_ms"]
        if liked:
            ev["ms_played"] = int(length * float(rng.uniform(0.6, 1.0)))
            ev["skipped"] = False
            if rng.random() < 0.2:
                ev["liked"] = True
        else:
            ev["ms_played"] = int(rng.integers(2_000, 28_000))
            ev["skipped"] = True
        ev["played_at"] = int(t * 1000)  # epoch milliseconds
    return ev


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _malform(kind: str, ev: dict[str, Any], p: str, rng: np.random.Generator) -> bytes:
    ev = {**ev, "event_id": ev["event_id"] + "-bad"}
    line = json.dumps(ev, separators=(",", ":"))
    if kind == "truncated_json":
        return line[: max(10, len(line) // 2)].encode()
    if kind == "nan":
        key = {"shop": "price", "video": "duration", "music": "ms_played"}[p]
        ev[key] = math.nan
        return json.dumps(ev).encode()  # Python writes the non-JSON literal NaN
    if kind == "wrong_type":
        key = {"shop": "price", "video": "seconds_watched", "music": "skipped"}[p]
        ev[key] = {"oops": [1, 2]}
        return json.dumps(ev).encode()
    if kind == "missing_field":
        del ev[ITEM_FIELD[p]]
        return json.dumps(ev).encode()
    if kind == "bad_enum":
        if p == "shop":
            ev["action"] = "teleport"
        elif p == "video":
            ev["duration"] = -5
        else:
            ev["ms_played"] = -1
        return json.dumps(ev).encode()
    if kind == "oversized":
        ev["comment"] = "x" * 70_000
        return json.dumps(ev).encode()
    if kind == "far_future":
        ev[TIME_FIELD[p]] = 4_102_444_800 if p != "video" else "2100-01-01T00:00:00Z"
        return json.dumps(ev).encode()
    if kind == "invalid_utf8":
        return line.encode()[:-2] + b"\xff\xfe\"}"
    if kind == "not_object":
        return json.dumps([ev[ITEM_FIELD[p]], 1, 2]).encode()
    if kind == "deep_nesting":
        return (b'{"event_id":"x","nested":' + b"[" * 64 + b"]" * 64 + b"}")
    if kind == "infinity":
        key = {"shop": "price", "video": "duration", "music": "ms_played"}[p]
        ev[key] = math.inf
        return json.dumps(ev).encode()  # Python writes the non-JSON literal Infinity
    if kind == "ancient":
        ev[TIME_FIELD[p]] = {"shop": 86_400.0, "video": "1971-01-01T00:00:00Z",
                             "music": 86_400_000}[p]
        return json.dumps(ev).encode()
    if kind == "huge_number":  # valid JSON that parses to an infinite float
        key = {"shop": "price", "video": "duration", "music": "ms_played"}[p]
        return line.replace(f'"{key}":{json.dumps(ev[key])}', f'"{key}":1e400').encode()
    if kind == "oversized_string":
        ev[ITEM_FIELD[p]] = "y" * 5_000
        return json.dumps(ev).encode()
    if kind == "oversized_array":
        ev[ITEM_FIELD[p]] = list(range(4_000))
        return json.dumps(ev).encode()
    if kind == "field_flood":
        ev.update({f"f{i}": i for i in range(2_000)})
        return json.dumps(ev, separators=(",", ":")).encode()
    if kind == "wrong_type_user":
        ev[USER_FIELD[p]] = {"id": ev[USER_FIELD[p]]}
        ev.pop("account_id", None)
        return json.dumps(ev).encode()
    if kind == "empty_object":
        return b"{}"
    raise ValueError(kind)  # pragma: no cover
