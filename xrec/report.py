"""``xrec report``: one self-contained HTML file with plots, of a running stack or an eval run.

Why one file and inline SVG: the report is opened where the stack is not (a laptop, a CI
artifact, an e-mail), so it needs no network, no script and no plotting dependency: every
plot is SVG drawn here, colours and legends included. A short inline script only notes
where each plot area landed on the page (``data-box``), which the test reads to count each
series' pixels in a browser screenshot; the report renders the same without it.

Sources:

* a running stack: the result topics read from the beginning up to what they held when the
  report started (``xrec.metrics.quality``, ``xrec.metrics.drift``, ``xrec.models.heads``,
  ``xrec.deadletter``, ``xrec.recs.<platform>``), plus, when Redis is reachable, when the
  recommenders swapped each head version in. Time axis: seconds since the first record.
* an ``xrec eval --report FILE`` run: its per-slice series; baselines beside xrec, the time
  axis in events.

    >>> p = Plot("q", "quality", "events", "NDCG@10", [Series("xrec", [(0, 0.1), (1, 0.2)])])
    >>> "<polyline" in svg_plot(p, {"xrec": "#1f77b4"})
    True
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.errors import InputFileError, StackError

__all__ = ["Series", "Marker", "Plot", "PALETTE", "svg_plot", "render_html", "read_stack",
           "stack_plots", "eval_plots", "stack_report", "eval_report"]

#: series colours (Tableau's, without its red and grey: red marks drift signals, grey axes)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#7b4173")
SIGNAL_COLOUR = "#d62728"
REACTION_COLOUR = "#111111"
W, H = 560, 300  # one plot's SVG, CSS pixels
ML, MR, MT, MB = 64, 16, 14, 44  # margins: the plot area is the rest
LABELS = {"ndcg@10": "NDCG@10", "recall@10": "recall@10"}
BUCKETS = 60  # time buckets of the latency and throughput plots


@dataclass
class Series:
    name: str
    points: list[tuple[float, float | None]]  # None: a gap


@dataclass
class Marker:
    x: float
    label: str
    kind: str = "signal"  # signal | reaction | injected


@dataclass
class Plot:
    id: str
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    caption: str = ""
    markers: list[Marker] = field(default_factory=list)
    kind: str = "line"  # line | bar (bar: series' first points' y, one bar per series)
    x_range: tuple[float, float] | None = None
    y_min_zero: bool = True


# ----------------------------------------------------------------------------- drawing
def _nice(span: float) -> float:
    """A tick step of 1, 2 or 5 × 10^k giving about five ticks over ``span``."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / 5
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _ticks(lo: float, hi: float) -> list[float]:
    step = _nice(hi - lo)
    t = math.ceil(lo / step - 1e-9) * step
    out = []
    while t <= hi + step * 1e-6:
        out.append(round(t, 10))
        t += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10000:
        return f"{v / 1000:,.0f}k"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        return f"{v:.4g}"
    return f"{v:.3g}"


def _esc(s: object) -> str:
    return html.escape(str(s), quote=True)


def svg_plot(p: Plot, colours: dict[str, str]) -> str:
    """The SVG of one plot: axes, ticks, grid, series (or bars), markers; "no data" if empty."""
    pw, ph = W - ML - MR, H - MT - MB
    out = [f'<svg class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'role="img" aria-label="{_esc(p.title)}">',
           f'<rect class="plotarea" x="{ML}" y="{MT}" width="{pw}" height="{ph}" '
           'fill="#ffffff" stroke="#bbbbbb"/>']
    pts = [(x, y) for s in p.series for x, y in s.points if y is not None]
    if not pts:
        out.append(f'<text x="{ML + pw / 2}" y="{MT + ph / 2}" text-anchor="middle" '
                   'class="empty">no data</text></svg>')
        return "".join(out)
    if p.kind == "bar":
        return _bars(p, colours, out, pw, ph)
    xs = [x for x, _ in pts] + [m.x for m in p.markers]
    x0, x1 = p.x_range or (min(xs), max(xs))
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    ys = [y for _, y in pts]
    y0 = 0.0 if p.y_min_zero and min(ys) >= 0 else min(ys)
    y1 = max(ys)
    if y1 <= y0:
        y1 = y0 + (abs(y0) or 1.0)
    y1 += (y1 - y0) * 0.05

    def sx(x: float) -> float:
        return ML + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return MT + ph - (y - y0) / (y1 - y0) * ph

    for t in _ticks(y0, y1):
        yy = sy(t)
        out.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                   f'stroke="#e6e6e6"/><text x="{ML - 6}" y="{yy + 4:.1f}" '
                   f'text-anchor="end" class="tick">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        xx = sx(t)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{MT + ph}" y2="{MT + ph + 4}" '
                   f'stroke="#555555"/><text x="{xx:.1f}" y="{MT + ph + 16}" '
                   f'text-anchor="middle" class="tick">{_fmt(t)}</text>')
    out.append(f'<text x="{ML + pw / 2}" y="{H - 6}" text-anchor="middle" class="axis">'
               f'{_esc(p.x_label)}</text><text transform="translate(14 {MT + ph / 2}) '
               f'rotate(-90)" text-anchor="middle" class="axis">{_esc(p.y_label)}</text>')
    for s in p.series:
        c = colours.get(s.name, PALETTE[0])
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in s.points:
            if y is None:
                runs.append([])
            else:
                runs[-1].append((x, y))
        shown = [r for r in runs if r]
        n = sum(len(r) for r in shown)
        out.append(f'<g class="series" data-series="{_esc(s.name)}" data-points="{n}">'
                   f'<title>{_esc(s.name)}</title>')
        for r in shown:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in r)
            if len(r) > 1:
                out.append(f'<polyline points="{coords}" fill="none" stroke="{c}" '
                           'stroke-width="2.5" stroke-linejoin="round"/>')
            if n <= 80 or len(r) == 1:
                out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>'
                           for x, y in r)
        out.append("</g>")
    label_markers = len(p.markers) <= 8
    for i, m in enumerate(p.markers):
        if not x0 <= m.x <= x1:
            continue
        xx = round(sx(m.x))  # whole pixels: a crisp 2-pixel line
        colour = REACTION_COLOUR if m.kind == "reaction" else SIGNAL_COLOUR
        dash = "3,3" if m.kind == "reaction" else "6,4"
        out.append(f'<g class="marker" data-kind="{m.kind}"><title>{_esc(m.label)}</title>'
                   f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{MT}" y2="{MT + ph}" '
                   f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>')
        if label_markers:
            out.append(f'<text x="{xx + 3:.1f}" y="{MT + 10 + 11 * (i % 4)}" class="mlabel" '
                       f'fill="{colour}">{_esc(m.label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _bars(p: Plot, colours: dict[str, str], out: list[str], pw: float, ph: float) -> str:
    vals = [(s.name, next((y for _, y in s.points if y is not None), 0.0)) for s in p.series]
    top = max(v for _, v in vals) * 1.05 or 1.0
    for t in _ticks(0, top):
        yy = MT + ph - t / top * ph
        out.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                   f'stroke="#e6e6e6"/><text x="{ML - 6}" y="{yy + 4:.1f}" '
                   f'text-anchor="end" class="tick">{_fmt(t)}</text>')
    slot = pw / len(vals)
    bw = max(4.0, min(60.0, slot * 0.7))
    for i, (name, v) in enumerate(vals):
        bh = v / top * ph
        x = ML + slot * i + (slot - bw) / 2
        out.append(f'<g class="series" data-series="{_esc(name)}" data-points="1">'
                   f'<title>{_esc(name)}: {_fmt(v)}</title><rect x="{x:.1f}" '
                   f'y="{MT + ph - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                   f'fill="{colours.get(name, PALETTE[0])}"/><text x="{x + bw / 2:.1f}" '
                   f'y="{MT + ph - bh - 4:.1f}" text-anchor="middle" class="tick">{_fmt(v)}'
                   f'</text><text x="{x + bw / 2:.1f}" y="{MT + ph + 14 + 11 * (i % 2)}" '
                   f'text-anchor="middle" class="tick">{_esc(name[:max(6, int(slot / 5.5))])}'
                   '</text></g>')  # staggered: long reason codes side by side stay apart
    out.append(f'<text transform="translate(14 {MT + ph / 2}) rotate(-90)" '
               f'text-anchor="middle" class="axis">{_esc(p.y_label)}</text>'
               f'<text x="{ML + pw / 2}" y="{H - 3}" text-anchor="middle" class="axis">'
               f'{_esc(p.x_label)}</text></svg>')
    return "".join(out)


def colour_map(names: Iterable[str]) -> dict[str, str]:
    """One colour per name, in first-seen order (the same name: the same colour everywhere)."""
    out: dict[str, str] = {}
    for n in names:
        if n not in out:
            out[n] = PALETTE[len(out) % len(PALETTE)]
    return out


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px}
.meta{color:#555;margin:0 0 8px} .note{color:#8a5a00}
.grid{display:grid;grid-template-columns:repeat(2,580px);gap:14px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:8px;width:562px}
figcaption b{display:block;font-size:14px} figcaption span{color:#555;font-size:12px}
.legend{margin:4px 0;font-size:12px} .legend i{display:inline-block;width:14px;height:3px;
vertical-align:middle;margin:0 4px 0 10px}
.legend i.sig{border-top:2px dashed #d62728;height:0} .legend i.rea{border-top:2px dotted #111;
height:0} svg text{font-size:11px;fill:#333} svg text.axis{font-size:12px}
svg text.empty{font-size:16px;fill:#999} svg text.mlabel{font-size:10px}
table{border-collapse:collapse;font-size:12px;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th:first-child,td:first-child{
text-align:left}
"""

#: notes where each plot area lands on the page (``data-box`` = x,y,w,h in CSS pixels)
_JS = """
window.addEventListener('load',function(){document.querySelectorAll('figure').forEach(
function(f){var r=f.querySelector('rect.plotarea');if(!r)return;var b=r.getBoundingClientRect();
f.setAttribute('data-box',[b.left+scrollX,b.top+scrollY,b.width,b.height].map(Math.round)
.join(','));});document.body.setAttribute('data-ready','1');});
"""


def _legend(p: Plot, colours: dict[str, str]) -> str:
    if p.kind == "bar":
        return ""
    parts = [f'<i style="background:{colours.get(s.name, PALETTE[0])}"></i>{_esc(s.name)}'
             for s in p.series if any(y is not None for _, y in s.points)]
    kinds = {m.kind for m in p.markers}
    if kinds & {"signal", "injected"}:
        parts.append('<i class="sig"></i>' + ("drift injected" if "injected" in kinds
                                              else "drift signal"))
    if "reaction" in kinds:
        parts.append('<i class="rea"></i>reaction')
    return f'<div class="legend">{"".join(parts)}</div>'


def render_html(title: str, meta: Sequence[str], sections: Sequence[tuple[str, list[Plot]]],
                colours: dict[str, str], extra_html: str = "") -> str:
    """The whole report: a header, sections of plots (two per row), optional extra HTML."""
    body = [f"<h1>{_esc(title)}</h1>"]
    body += [f'<p class="meta">{m}</p>' for m in meta]
    for name, plots in sections:
        body.append(f"<h2>{_esc(name)}</h2><div class=\"grid\">")
        for p in plots:
            body.append(f'<figure id="{_esc(p.id)}" data-plot="{_esc(p.id)}"><figcaption>'
                        f"<b>{_esc(p.title)}</b><span>{_esc(p.caption)}</span></figcaption>"
                        f"{_legend(p, colours)}{svg_plot(p, colours)}</figure>")
        body.append("</div>")
    body.append(extra_html)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style><script>{_JS}</script>"
            f"</head><body>{''.join(body)}</body></html>\n")


# ------------------------------------------------------------------------ stack source
@dataclass
class StackData:
    quality: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    heads: list[dict[str, Any]] = field(default_factory=list)
    deadletters: list[dict[str, Any]] = field(default_factory=list)
    #: (platform, produced_at, published_at) per recommendation record
    recs: list[tuple[str, float, float]] = field(default_factory=list)
    swaps: list[dict[str, Any]] = field(default_factory=list)
    topics: dict[str, int] = field(default_factory=dict)  # records read per topic
    complete: bool = True
    notes: list[str] = field(default_factory=list)


def read_stack(bootstrap: str, topics: Any, platforms: Iterable[str], *,
               redis_url: str | None = None, redis_prefix: str = "xrec:",
               timeout_s: float = 60.0, say: Callable[[str], None] = lambda m: None,
               security: dict[str, Any] | None = None) -> StackData:
    """Read the result topics from the beginning up to their ends when this started.
    ``security``: TLS / SASL keyword arguments (:func:`streams.security.kafka_kwargs`).

    A partition is done when its position is past the end offset read at the start and it
    has been quiet for half a second, or it returned a record produced after the start
    (a live stack keeps writing; Tansu's end offsets can also fall short of a final
    multi-record batch, so the end offset alone is not enough). ``timeout_s`` bounds it all.
    """
    from kafka import KafkaConsumer, TopicPartition

    _probe(bootstrap)
    try:
        c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                          client_id="xrec-report", fetch_max_wait_ms=50,
                          max_poll_records=5000, request_timeout_ms=15000,
                          **(security or {}))
    except Exception as exc:  # noqa: BLE001 - NoBrokersAvailable and friends
        raise StackError(f"cannot reach the broker at {bootstrap} ({exc}). Is the stack up? "
                         "Start one with `xrec dev`, or point KAFKA_BOOTSTRAP_SERVERS at it"
                         ) from None
    data = StackData()
    t_start = time.time()
    try:
        existing = c.topics()  # lists topics without creating any (asking one by name would)
        quality, drift, heads, dl = topics.quality, topics.drift, topics.heads, topics.deadletter
        recs_prefix = topics.recs("")
        wanted = [quality, drift, heads, dl] + sorted(
            {topics.recs(p) for p in platforms} | {t for t in existing
                                                   if t.startswith(recs_prefix)})
        names = [t for t in wanted if t in existing]
        missing = [t for t in (quality, drift, heads, dl) if t not in existing]
        if missing:
            data.notes.append("topics not on the broker (nothing published yet?): "
                              + ", ".join(missing))
        tps = [TopicPartition(t, p) for t in names for p in sorted(
            c.partitions_for_topic(t) or ())]
        if not tps:
            return data
        c.assign(tps)
        c.seek_to_beginning(*tps)
        begin = c.beginning_offsets(tps)
        end = c.end_offsets(tps)
        pending = {tp for tp in tps if end[tp] > begin[tp]}
        quiet = {tp: time.monotonic() for tp in tps}
        deadline = time.monotonic() + timeout_s
        last_say = time.monotonic()
        n = 0
        while pending:
            now = time.monotonic()
            if now > deadline:
                data.complete = False
                data.notes.append(f"stopped reading after {timeout_s:g} s (--timeout): the "
                                  "plots cover what was read by then")
                say(f"timeout after {timeout_s:g} s; {len(pending)} partitions not read "
                    "to their end")
                break
            batch = c.poll(timeout_ms=200)
            for tp, records in batch.items():
                quiet[tp] = time.monotonic()
                for rec in records:
                    n += 1
                    data.topics[tp.topic] = data.topics.get(tp.topic, 0) + 1
                    _take(data, tp.topic, rec.value, quality, drift, heads, dl)
                    if rec.timestamp and rec.timestamp / 1000 > t_start:
                        pending.discard(tp)  # written after the report started
            for tp in list(pending):
                if c.position(tp) >= end[tp] and time.monotonic() - quiet[tp] > 0.5:
                    pending.discard(tp)
            if time.monotonic() - last_say > 2:
                last_say = time.monotonic()
                say(f"  read {n:,} records; {len(pending)} partitions to go")
        say(f"read {n:,} records from {len(data.topics)} topics in "
            f"{time.time() - t_start:.1f} s")
    finally:
        c.close()
    if redis_url:
        data.swaps = _head_swaps(redis_url, redis_prefix, data)
    return data


def _probe(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, with what to do, when no bootstrap server answers (the client
    alone retries for half a minute)."""
    import socket

    errors = []
    for hp in bootstrap.split(","):
        host, _, port = hp.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)),
                                     timeout=timeout_s).close()
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{hp.strip()}: {exc}")
    raise StackError(f"cannot reach the broker at {bootstrap} ({'; '.join(errors)}). Is the "
                     "stack up? Start one with `xrec dev`, or point KAFKA_BOOTSTRAP_SERVERS "
                     "at it")


def _take(data: StackData, topic: str, value: bytes | None, quality: str, drift: str,
          heads: str, dl: str) -> None:
    if not value:
        return
    try:
        d = json.loads(value)
    except ValueError:
        return  # not ours to judge here; the report draws what it can read
    if not isinstance(d, dict):
        return
    if topic == quality:
        data.quality.append(d)
    elif topic == drift:
        data.drift.append(d)
    elif topic == heads:
        data.heads.append(d)
    elif topic == dl:
        data.deadletters.append(d)
    elif "published_at" in d and "produced_at" in d:
        data.recs.append((str(d.get("platform", "?")), float(d["produced_at"]),
                          float(d["published_at"])))


def _head_swaps(url: str, prefix: str, data: StackData) -> list[dict[str, Any]]:
    import redis

    try:
        r = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        try:
            raw = r.lrange(f"{prefix}heads:swaps", 0, -1)
        finally:
            r.close()
    except Exception as exc:  # noqa: BLE001 - optional: the topics carry the rest
        from streams.security import redact_url  # the URL may hold a password

        data.notes.append(f"Redis at {redact_url(url)} not readable ({exc}): no head swap "
                          "times")
        return []
    out = []
    for x in raw:
        try:
            out.append(json.loads(x))
        except ValueError:
            continue
    return out


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    i = (len(s) - 1) * q
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def stack_plots(d: StackData) -> tuple[list[tuple[str, list[Plot]]], dict[str, str], float]:
    """Sections of plots of a stack, their colours, and the time origin (epoch s)."""
    times = ([q["at"] for q in d.quality if "at" in q] + [x["time"] for x in d.drift
                                                          if "time" in x]
             + [h["published_at"] for h in d.heads if "published_at" in h]
             + [x["at"] for x in d.deadletters if "at" in x] + [r[2] for r in d.recs])
    t0 = min(times) if times else time.time()
    t1 = max(times) if times else t0 + 1
    xr = (0.0, max(t1 - t0, 1.0))
    xl = "seconds since the first record"
    plats = sorted({q.get("platform", "?") for q in d.quality} | {r[0] for r in d.recs},
                   key=lambda p: (p != "all", p))
    colours = colour_map(["all", *plats])
    markers = []
    for x in d.drift:
        if x.get("kind") in ("signal", "reaction") and "time" in x:
            markers.append(Marker(x["time"] - t0, f"{x.get('platform')}/{x.get('signal')}",
                                  x["kind"]))
    sections = []
    qplots = []
    for metric, label in (("recall_at_10", "recall@10"), ("ndcg_at_10", "NDCG@10")):
        for cohort, what in (("all", "all users"), ("coldstart", "cross-platform cold start")):
            series = []
            for p in plats:
                pts = sorted((q["at"] - t0, q.get(metric)) for q in d.quality
                             if q.get("platform") == p and q.get("cohort") == cohort
                             and q.get("n") and q.get(metric) is not None)
                if pts:
                    series.append(Series(p, pts))  # type: ignore[arg-type]
            qplots.append(Plot(
                f"quality-{metric}-{cohort}", f"Prequential {label}, {what}", xl, label, series,
                caption=("each positive ranked by the served model before it learned from "
                         "it, per quality window and platform ('all': pooled)"
                         + ("; cohort: a user's first event on a platform while having "
                            "history on another" if cohort == "coldstart" else "")
                         + "; dashed red: drift signals, dotted black: trainer reactions"),
                markers=markers, x_range=xr))
    sections.append(("Quality, with drift signals and reactions", qplots))

    splots = []
    recs = sorted(d.recs, key=lambda r: r[2])
    width = max(1.0, _nice(5 * (t1 - t0) / BUCKETS))  # a round step, ~BUCKETS of them
    buckets: dict[int, list[tuple[str, float]]] = {}
    for p, prod, pub in recs:
        buckets.setdefault(int((pub - t0) // width), []).append((p, (pub - prod) * 1000))
    lat = []
    for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        lat.append(Series(name, [((b + 0.5) * width, _pct([v for _, v in buckets[b]], q))
                                 for b in sorted(buckets)]))
    colours.update(colour_map([*colours, "p50", "p90", "p99"]))
    splots.append(Plot("latency", "Event → recommendation latency", xl, "ms", lat,
                       caption=f"percentiles per {width:g} s of publish time: the event's "
                       "produce time to its recommendation's publish time", x_range=xr))
    thr = [Series("all", [((b + 0.5) * width, len(buckets[b]) / width)
                          for b in sorted(buckets)])]
    for p in plats:
        if p == "all":
            continue
        thr.append(Series(p, [((b + 0.5) * width, sum(1 for x, _ in buckets[b] if x == p)
                               / width) for b in sorted(buckets)]))
    splots.append(Plot("throughput", "Throughput: recommendations published", xl,
                       "records / s", thr, caption=f"per {width:g} s, by platform",
                       x_range=xr))
    sections.append(("Serving", splots))

    hplots = []
    heads = sorted((h for h in d.heads if "published_at" in h), key=lambda h: h["published_at"])
    pub_at = {h.get("version"): h["published_at"] for h in heads}
    fresh = [Series("newest event → head published",
                    [(h["published_at"] - t0, h["published_at"] - h["newest_produced_at"])
                     for h in heads if "newest_produced_at" in h]),
             Series("batch taken → head published",
                    [(h["published_at"] - t0, h["published_at"] - h["batch_arrived_at"])
                     for h in heads if "batch_arrived_at" in h])]
    used = sorted((pub_at[s["version"]] - t0, float(s["event_to_use_s"])) for s in d.swaps
                  if s.get("version") in pub_at and s.get("event_to_use_s") is not None)
    if used:
        fresh.append(Series("newest event → head in use", used))  # type: ignore[arg-type]
    colours.update(colour_map([*colours, *(s.name for s in fresh)]))
    hplots.append(Plot("head-freshness", "Head versions: freshness", xl, "seconds", fresh,
                       caption="per head version the train agent published: how old its "
                       "newest training event was when it was published"
                       + (" and when a recommender swapped it in" if used else ""),
                       x_range=xr))
    ver = [Series("head version", [(h["published_at"] - t0, float(h.get("version", 0)))
                                   for h in heads])]
    loss = [Series("training loss", [(h["published_at"] - t0, h.get("loss"))
                                     for h in heads])]
    colours.update(colour_map([*colours, "head version", "training loss"]))
    hplots.append(Plot("head-versions", "Head versions published", xl, "version", ver,
                       caption=f"{len(heads)} versions on the heads topic"
                       + (f", the last v{heads[-1].get('version')}" if heads else ""),
                       x_range=xr))
    hplots.append(Plot("head-loss", "Training loss per head version", xl, "loss", loss,
                       caption="sampled-softmax loss of the batch that produced the version",
                       x_range=xr, y_min_zero=False))
    sections.append(("Model heads", hplots))

    codes: dict[str, int] = {}
    for x in d.deadletters:
        c = str(x.get("code", "?"))
        codes[c] = codes.get(c, 0) + 1
    dls = [Series(c, [(0.0, float(n))]) for c, n in sorted(codes.items(), key=lambda kv: -kv[1])]
    colours.update(colour_map([*colours, *codes]))
    sections.append(("Dead letters", [Plot(
        "deadletters", "Dead letters by reason", "reason code", "records", dls, kind="bar",
        caption=f"{len(d.deadletters):,} records on the dead-letter topic")]))
    return sections, colours, t0


def stack_report(d: StackData, bootstrap: str) -> str:
    sections, colours, t0 = stack_plots(d)
    when = dt.datetime.fromtimestamp(t0).astimezone().isoformat(timespec="seconds")
    meta = [f"source: stack at {_esc(bootstrap)}; time 0 = {_esc(when)}; report written "
            f"{_esc(dt.datetime.now().astimezone().isoformat(timespec='seconds'))}",
            "records read: " + (", ".join(f"{_esc(t)} {n:,}" for t, n in sorted(
                d.topics.items())) or "none")]
    meta += [f'<span class="note">{_esc(n)}</span>' for n in d.notes]
    return render_html("xrec report: live stack", meta, sections, colours)


# ------------------------------------------------------------------------- eval source
def eval_plots(rep: dict[str, Any]) -> tuple[list[tuple[str, list[Plot]]], dict[str, str]]:
    from models.prequential import METHODS

    ser = rep.get("series")
    if not ser or not ser.get("events"):
        raise InputFileError("the eval report has no time series (written by an older xrec?): "
                             "rerun `xrec eval ... --report FILE`")
    xs = ser["events"]
    every = ser.get("every_events")
    groups = ser["groups"]
    order = ["all"] + sorted(g for g in groups if g.startswith("platform:")) + (
        ["coldstart"] if "coldstart" in groups else [])
    methods = [m for m in METHODS if any(m in groups[g]["methods"] for g in groups)]
    methods += sorted({m for g in groups for m in groups[g]["methods"]} - set(methods))
    colours = colour_map(methods)
    markers = [Marker(float(x.get("at_event", 0)), f"{x.get('kind')}"
                      + (f" ({x['platform']})" if x.get("kind") == "labels" and x.get("platform")
                         else ""), "injected") for x in rep.get("drift_injected") or []]
    sections = []
    for g in order:
        if g not in groups:
            continue
        plots = []
        for metric in ("ndcg@10", "recall@10"):
            series = [Series(m, list(zip(xs, groups[g]["methods"][m][metric], strict=True)))
                      for m in methods if m in groups[g]["methods"]]
            what = {"all": "all positives", "coldstart": "cross-platform cold start"}.get(
                g, g.replace("platform:", "platform "))
            plots.append(Plot(f"eval-{g.replace(':', '-')}-{metric.replace('@', '')}",
                              f"Prequential {LABELS[metric]}, {what}",
                              "events", metric, series, markers=markers,
                              caption=f"per slice of {every:,} events (the positives ranked "
                              f"in it: {sum(groups[g]['n']):,} in all); xrec beside the "
                              "baselines, every method ranking the same events"))
        sections.append((f"Quality: {g}", plots))
    dead = rep.get("deadlettered") or {}
    colours.update(colour_map([*colours, *dead]))
    sections.append(("Dead letters", [Plot(
        "deadletters", "Dead letters by reason", "reason code", "records",
        [Series(c, [(0.0, float(n))]) for c, n in sorted(dead.items(), key=lambda kv: -kv[1])],
        kind="bar", caption="input records the normalizer rejected")]))
    return sections, colours


def _summary_table(rep: dict[str, Any]) -> str:
    res = rep.get("results") or {}
    cols = ["recall@10", "ndcg@10", "mrr", "auc", "n"]
    rows = []
    for m, groups in res.items():
        a = groups.get("all") or {}
        cells = "".join(f"<td>{'-' if a.get(c) is None else _esc(_fmt(a[c]))}</td>"
                        for c in cols)
        rows.append(f"<tr><td>{_esc(m)}</td>{cells}</tr>")
    head = "".join(f"<th>{c}</th>" for c in ["method", *cols])
    cmp = rep.get("comparison") or {}
    ratio = ""
    if cmp.get("ratio_ndcg@10") is not None:
        ci = cmp.get("ratio_ci95") or []
        ratio = (f"<p>xrec / best baseline ({_esc(cmp.get('best_baseline'))}) NDCG@10: "
                 f"{cmp['ratio_ndcg@10']:.3f}"
                 + (f" (95% paired bootstrap over users {ci[0]:.3f}–{ci[1]:.3f})" if ci
                    else "") + "</p>")
    return (f"<h2>Whole run</h2><table><tr>{head}</tr>{''.join(rows)}</table>{ratio}")


def eval_report(rep: dict[str, Any], source: str) -> str:
    sections, colours = eval_plots(rep)
    meta = [f"source: eval report {_esc(source)}; dataset {_esc(rep.get('dataset'))}, "
            f"{rep.get('events', 0):,} events, {rep.get('evaluated', 0):,} positives ranked; "
            f"platforms {_esc(', '.join(rep.get('platforms', [])))}",
            "no broker in an eval run: latency, throughput and head versions are a stack's "
            "(xrec report without --from-eval)"]
    return render_html("xrec report: prequential evaluation", meta, sections, colours,
                       _summary_table(rep))


def load_eval(path: Path) -> dict[str, Any]:
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputFileError(f"{path}: not a readable eval report ({exc})") from None
    if not isinstance(rep, dict) or "results" not in rep:
        raise InputFileError(f"{path}: not an `xrec eval --report` file (no results)")
    return rep
