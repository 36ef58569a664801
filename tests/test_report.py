"""``xrec report``: the HTML opens in a real headless Chromium and every plot is drawn.

Not "the file exists": each report is opened twice in Chromium (the DOM after load, and
a screenshot at the same window size); the report's inline script notes where each plot
area landed (``data-box``), and for every expected series the screenshot must show
pixels of that series' colour inside that plot's area (axes, grid and legends are outside
it or of other colours). A malformed or empty SVG draws nothing there and fails.

Chromium is not installed by the test: without a ``chromium`` binary the tests skip and
say so (``.ci/run`` installs Debian's chromium, so CI runs them).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import redis as redis_sync
from click.testing import CliRunner

from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from streams.platforms import load_platforms
from streams.records import DriftReaction, DriftSignal
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings, settings_env
from tests.kafka_util import produce
from xrec.cli import cli

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no headless browser: `chromium` is not on PATH (Debian: apt-get "
    "install chromium; .ci/run installs it so CI runs this test)")
WINDOW = (1240, 3600)


# ----------------------------------------------------------------------------- helpers
def _png_rgb(path: Path) -> np.ndarray:
    """An 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) as an H×W×3 array."""
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    i, idat, hdr = 8, [], None
    while i < len(b):
        (n,) = struct.unpack(">I", b[i:i + 4])
        kind, data = b[i + 4:i + 8], b[i + 8:i + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat.append(data)
        i += 12 + n
    assert hdr is not None
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, hdr
    bpp = 3 if ctype == 2 else 4
    stride = w * bpp
    raw = zlib.decompress(b"".join(idat))
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int64)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if f == 0:
            cur = line
        elif f == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            cur = (line + prev) % 256
        else:  # Average / Paeth: left-to-right, byte by byte
            lb, pb = line.tolist(), prev.tolist()
            cb = [0] * stride
            for x in range(stride):
                a = cb[x - bpp] if x >= bpp else 0
                up = pb[x]
                if f == 3:
                    cb[x] = (lb[x] + (a + up) // 2) & 255
                else:
                    c = pb[x - bpp] if x >= bpp else 0
                    p = a + up - c
                    pa, pb_, pc = abs(p - a), abs(p - up), abs(p - c)
                    pred = a if pa <= pb_ and pa <= pc else (up if pb_ <= pc else c)
                    cb[x] = (lb[x] + pred) & 255
            cur = np.array(cb, np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, bpp)[:, :, :3]


def _chromium(url: str, *extra: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--force-color-profile=srgb",
           "--virtual-time-budget=3000", f"--window-size={WINDOW[0]},{WINDOW[1]}", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def render(html_path: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """The DOM after load and the screenshot of ``html_path`` in headless Chromium."""
    url = html_path.resolve().as_uri()
    dom = _chromium(url, "--dump-dom")
    assert dom.returncode == 0 and "<figure" in dom.stdout, dom.stderr[-2000:]
    shot = tmp / (html_path.stem + ".png")
    res = _chromium(url, f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    return dom.stdout, _png_rgb(shot)


def figures(dom: str) -> dict[str, dict]:
    """{plot id: {box: (x, y, w, h), series: {name: (colour, points)}, empty: bool}}"""
    out = {}
    for m in re.finditer(r'<figure id="([^"]+)" data-plot="[^"]+" data-box="([\d,.-]+)">'
                         r"(.*?)</figure>", dom, re.S):
        body = m.group(3)
        series = {}
        points = {}
        for s in re.finditer(r'<g class="series" data-series="([^"]+)" data-points="(\d+)">'
                             r'(.*?)</g>', body, re.S):
            colour = re.search(r'(?:stroke|fill)="(#[0-9a-f]{6})"', s.group(3))
            series[s.group(1)] = (colour.group(1) if colour else None, int(s.group(2)))
            points[s.group(1)] = {(c.group(1), c.group(2)) for c in re.finditer(
                r'<circle cx="([\d.-]+)" cy="([\d.-]+)"', s.group(3))}
        x, y, w, h = (int(float(v)) for v in m.group(2).split(","))
        out[m.group(1)] = {"box": (x, y, w, h), "series": series, "empty": "no data" in body,
                           "hidden": drawn_over(points)}
    return out


def drawn_over(points: dict[str, set]) -> set[str]:
    """Series whose every point is also a point of a series drawn after it (in document
    order): drawn, but entirely under the later ones (e.g. several platforms at 0)."""
    names = list(points)
    return {n for i, n in enumerate(names)
            if points[n] and points[n] <= set().union(*(points[o] for o in names[i + 1:]))}


def colour_pixels(img: np.ndarray, box: tuple[int, int, int, int], colour: str,
                  tol: int = 10) -> int:
    x, y, w, h = box
    assert y + h <= img.shape[0] and x + w <= img.shape[1], \
        f"plot area {box} is outside the {img.shape[1]}×{img.shape[0]} screenshot"
    want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    area = img[y + 1:y + h - 1, x + 1:x + w - 1].astype(int)
    return int((np.abs(area - want).max(axis=2) <= tol).sum())


def covered(group: dict, metric: str) -> set[str]:
    """Series of an eval report's group whose every point lies on a point of a series drawn
    after it (same slice, same value): drawn, but hidden under the later one."""
    ms = list(group["methods"])
    out = set()
    for i, m in enumerate(ms):
        pts = [(k, v) for k, v in enumerate(group["methods"][m][metric]) if v is not None]
        if pts and all(any(group["methods"][o][metric][k] == v for o in ms[i + 1:])
                       for k, v in pts):
            out.add(m)
    return out


def assert_drawn(figs: dict, img: np.ndarray, plot: str, series: set[str] | None = None,
                 min_px: int = 20, hidden_ok: set[str] | frozenset[str] = frozenset()
                 ) -> None:
    """Every series of ``plot`` (at least ``series``) is visibly drawn in its plot area in
    its own colour; those of ``hidden_ok`` (entirely under later series) need only have
    their points in the plot."""
    assert plot in figs, f"plot {plot} missing; have {sorted(figs)}"
    f = figs[plot]
    assert not f["empty"], f"plot {plot} says 'no data'"
    if series is not None:
        assert series <= set(f["series"]), (plot, series, set(f["series"]))
    colours = [c for c, _ in f["series"].values()]
    assert len(set(colours)) == len(colours), f"{plot}: two series share a colour {colours}"
    for name, (colour, n) in f["series"].items():
        assert colour and n > 0, (plot, name)
        if name in hidden_ok or name in f.get("hidden", ()):
            continue
        px = colour_pixels(img, f["box"], colour)
        assert px >= min_px, f"{plot}: series {name} ({colour}) drew {px} pixels"


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    """A small eval run's full report (about 5 s on an idle 2-core machine)."""
    rep = tmp_path_factory.mktemp("eval") / "eval.json"
    res = CliRunner().invoke(cli, [
        "eval", "--dataset", "synthetic", "--sim-events", "1200", "--batch", "64", "--methods",
        "xrec,popularity,popco", "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return rep


# ------------------------------------------------------------------------------- tests
def test_eval_report_has_per_slice_series(eval_file):
    rep = json.loads(eval_file.read_text())
    s = rep["series"]
    assert s["events"][-1] == rep["events"] == 1200
    assert set(s["groups"]) == {"all", "coldstart", "platform:shop", "platform:video",
                                "platform:music"}
    g = s["groups"]["all"]
    assert sum(g["n"]) == rep["evaluated"]  # every ranked positive in exactly one slice
    # the slices add up to the whole run's figures
    for m in ("xrec", "popco"):
        rec = sum(r * n for r, n in zip(g["methods"][m]["recall@10"], g["n"], strict=True)
                  if r is not None)
        assert abs(rec / sum(g["n"]) - rep["results"][m]["all"]["recall@10"]) < 1e-3


@needs_browser
def test_report_of_an_eval_run_renders_every_plot(eval_file, tmp_path):
    rep = eval_file
    out = tmp_path / "eval.html"
    res = CliRunner().invoke(cli, ["report", "--from-eval", str(rep), "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"report: {out.resolve()}" in res.output
    html = out.read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched to open it
    dom, img = render(out, tmp_path)
    figs = figures(dom)
    methods = {"xrec", "popularity", "popco"}
    for g in ("all", "platform-shop", "platform-video", "platform-music"):
        for metric in ("ndcg10", "recall10"):
            assert_drawn(figs, img, f"eval-{g}-{metric}", methods)
    cold = json.loads(rep.read_text())["series"]["groups"]["coldstart"]
    for metric in ("ndcg10", "recall10"):  # sparse (few cold starts in 1,200 events): points
        hidden = covered(cold, {"ndcg10": "ndcg@10", "recall10": "recall@10"}[metric])
        assert len(hidden) < len(methods)  # the last drawn one is always visible
        assert_drawn(figs, img, f"eval-coldstart-{metric}", methods, min_px=3,
                     hidden_ok=hidden)
    assert figs["deadletters"]["empty"]  # the synthetic eval stream has no bad records


def test_report_needs_a_reachable_stack(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    res = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "r.html")])
    assert res.exit_code != 0
    assert "cannot reach the Kafka broker" in str(res.exception) + res.output
    assert not (tmp_path / "r.html").exists()


@needs_browser
@pytest.mark.integration
def test_report_of_a_live_stack_renders_every_plot(stack, ns, worker_factory, tmp_path,
                                                   monkeypatch):
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=900, users=60, malformed=0.05, seed=11), d)
    s = make_settings(stack, ns, quality_window_s=0.5, train_interval_s=0.1)
    t = Topics(s)
    reg = load_platforms(s.platforms_path)
    create_all_topics(s)
    worker_factory(s)
    rep = Replayer(stack.bootstrap)
    try:
        rep.replay([Source(d / f, t.catalog(p)) for p, f in man["files"]["catalog"].items()],
                   progress=False)
        rep.replay([Source(d / f, t.events(p), reg[p])
                    for p, f in man["files"]["events"].items()], rate=300, progress=False)
    finally:
        rep.close()
    # drift markers: a detector fires rarely in 900 events, so one signal and the train
    # agent's reaction are published here, as the monitor and the trainer would
    now = time.time()
    produce(stack.bootstrap, t.drift, [
        DriftSignal(platform="video", signal="popularity", detector="js", value=0.4,
                    reference=0.2, window=300, events=400, worker="test", time=now - 1
                    ).model_dump_json().encode(),
        DriftReaction(platform="video", signal="popularity", actions=["lr_boost"],
                      time=now - 0.5).model_dump_json().encode()])
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    expected_dl = sum(man["deadletter_expected"].values())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        if (st.get("events_applied", 0) >= man["valid_events"]
                and st.get("deadlettered", 0) >= expected_dl and r.get(f"{ns}:heads:version")):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"the worker did not drain: {st}")
    time.sleep(1.2)  # the last quality windows

    for k, v in settings_env(s).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "stack.html"
    res = CliRunner().invoke(cli, ["report", "--out", str(out), "--timeout", "60"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "http://" not in html and "https://" not in html
    dom, img = render(out, tmp_path)
    figs = figures(dom)
    plats = {"shop", "video", "music"}
    for metric in ("recall_at_10", "ndcg_at_10"):
        assert_drawn(figs, img, f"quality-{metric}-all", {"all", *plats})
        assert_drawn(figs, img, f"quality-{metric}-coldstart", {"all"}, min_px=3)
        box = figs[f"quality-{metric}-all"]["box"]  # the drift markers, on the same axis
        assert colour_pixels(img, box, "#d62728", tol=40) >= 20
        assert colour_pixels(img, box, "#111111", tol=40) >= 20
    assert_drawn(figs, img, "latency", {"p50", "p90", "p99"})
    assert_drawn(figs, img, "throughput", {"all", *plats})
    assert_drawn(figs, img, "head-freshness", {"newest event → head published",
                                               "batch taken → head published"})
    assert_drawn(figs, img, "head-versions", {"head version"}, min_px=5)
    codes = set(man["deadletter_expected"])
    assert_drawn(figs, img, "deadletters", codes)
