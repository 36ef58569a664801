"""Cross-platform cold start from item texts (models/coldtext.py): the prior, the
``textpop`` baseline on a hand-made stream, and the same prior in the evaluated xrec and
in the worker's served hybrid (cold asks only). No broker, no Redis."""

from __future__ import annotations

import numpy as np
import pytest

from models.baselines import Hybrid, TextVectors
from models.coldtext import ColdWeight, text_prior, unit_rows
from models.prequential import EvalConfig, Event, Prequential
from streams.heads import Ask
from streams.state import AggRow
from tests.test_ranking import server  # noqa: F401 - the fixture

THEMES = 4


def themed(rng, n: int, dim: int = 32, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """n vectors around THEMES directions (item k has theme k % THEMES), and the themes."""
    centres = rng.standard_normal((THEMES, dim))
    theme = np.arange(n) % THEMES
    return (centres[theme] + spread * rng.standard_normal((n, dim))).astype(np.float32), theme


def test_the_prior_reads_a_positive_elsewhere_as_its_theme_times_popularity():
    rng = np.random.default_rng(0)
    x, theme = themed(rng, 40)
    cat = unit_rows(x)
    pop = rng.uniform(1, 10, size=40)
    liked = unit_rows(x[theme == 2][:2] + 0.1 * rng.standard_normal((2, 32)))
    out = text_prior([liked, np.zeros((0, 32), np.float32)], cat, pop, beta=10.0, alpha=0.3)
    assert out.shape == (2, 40)
    top = np.argsort(-out[0])[:10]
    assert (theme[top] == 2).sum() == 10  # the theme's 10 items first
    on = np.nonzero(theme == 2)[0]  # within the theme, popularity still counts
    assert np.corrcoef(out[0, on], np.log(pop[on]))[0, 1] > 0.5
    # no positives: the popularity term alone (plus a constant)
    assert list(np.argsort(-out[1])) == list(np.argsort(-pop, kind="stable"))
    # α spreads mass uniformly: the bigger it is, the flatter the text part
    flat = text_prior([liked], cat, None, beta=10.0, alpha=100.0)
    sharp = text_prior([liked], cat, None, beta=10.0, alpha=0.01)
    assert np.ptp(flat) < np.ptp(sharp)


def _themed_stream(rng, n_items=60, users=40, events=900):
    """Two platforms whose items share THEMES text directions; each user likes one theme
    and acts on both platforms (so first events on a platform are cross-platform cold)."""
    x, theme = themed(rng, 2 * n_items, dim=384, spread=0.2)
    cat = {p: ([f"{p}{k}" for k in range(n_items)], x[j * n_items:(j + 1) * n_items])
           for j, p in enumerate(("video", "music"))}
    likes = rng.integers(0, THEMES, size=users)
    evs = []
    for k in range(events):
        u = int(rng.integers(users))
        p = ("video", "music")[int(rng.integers(2))]
        on = np.nonzero(theme[:n_items] == likes[u])[0]
        item = int(rng.choice(on)) if rng.random() < 0.9 else int(rng.integers(n_items))
        evs.append(Event(f"u{u}", p, f"{p}{item}", 1, 1.0, float(k)))
    return cat, evs


def test_textpop_baseline_ranks_cold_starts_by_the_theme_liked_elsewhere():
    cat, evs = _themed_stream(np.random.default_rng(4))
    pq = Prequential(cat, EvalConfig(batch=16, methods=("textpop", "popularity")))
    pq.run(evs, total=len(evs))
    res = pq.results()
    cold = {m: res[m]["coldstart"] for m in ("textpop", "popularity")}
    assert cold["textpop"]["n"] >= 20
    assert cold["textpop"]["recall@10"] > cold["popularity"]["recall@10"] + 0.2
    params = pq.params()["textpop"]
    assert params["chosen_on_warmup"] is True
    assert {"beta", "alpha", "hist"} <= set(params)
    assert len(params["warmup_ndcg@10"]) == 18  # 3 β × 3 α × 2 half-lives


def _xrec_ranks(cat, evs, cold):
    got: dict[str, list] = {"cold": [], "rank": []}
    cfg = EvalConfig(batch=16, methods=("xrec",), cold_text=cold)
    pq = Prequential(cat, cfg)

    def obs(_b, qs, ranks):
        got["rank"].extend(ranks["xrec"])
        got["cold"].extend(q.coldstart for q in qs)

    pq.observers.append(obs)
    pq.run(evs, total=len(evs))
    return got


def test_xrec_adds_the_prior_on_cold_asks_only():
    cat, evs = _themed_stream(np.random.default_rng(5), events=500)
    off = _xrec_ranks(cat, evs, (0.0, 10.0, 0.3, 20))
    on = _xrec_ranks(cat, evs, (1e6, 10.0, 0.3, 20))
    assert off["cold"] == on["cold"] and any(on["cold"])
    warm = [(a, b) for a, b, c in zip(off["rank"], on["rank"], on["cold"], strict=True)
            if not c]
    cold = [(a, b) for a, b, c in zip(off["rank"], on["rank"], on["cold"], strict=True)
            if c and a is not None]
    assert warm and all(a == b for a, b in warm)  # the same model, the same ranks
    assert any(a != b for a, b in cold)
    # with an overwhelming weight a cold ask is ranked by the prior: the liked theme's
    # items come first, so the (on-theme, 90%) target's rank improves on average
    assert np.mean([b for _, b in cold]) < np.mean([a for a, _ in cold])


def test_the_worker_serves_the_same_prior_on_cold_asks_only(server):  # noqa: F811
    srv, ids, rng = server
    t = srv.tables.table
    pop = AggRow([(f"video-{i}", 40.0 - i) for i in range(40)], before=0)
    cold_hist = [("music", "music-3", 1, 9e3), ("shop", "shop-5", 1, 8e3),
                 ("music", "music-9", 0, 7e3)]
    warm_hist = [("video", "video-2", 1, 9.5e3), *cold_hist]

    def ranked(weight):
        srv._coldw = ColdWeight([weight], weight) if weight else None  # a fixed weight
        asks = [Ask(cold_hist, "video", 1e4, pop=pop), Ask(warm_hist, "video", 1e4, pop=pop,
                                                           exclude=["video-2"])]
        return [[i for i, _ in r] for r in srv.answer(asks, k=10)]

    cold0, warm0 = ranked(0.0)
    cold1, warm1 = ranked(1e6)
    assert warm1 == warm0  # history on the platform: untouched
    assert cold1 != cold0
    # the same prior as the evaluation's: the user's positives elsewhere (newest first,
    # negatives skipped) against the video catalog, popularity from the served row
    vecs = TextVectors(t)
    liked = vecs.all()[[t.gid[("music", "music-3")], t.gid[("shop", "shop-5")]]]
    pv = np.zeros(len(t.rows("video")))
    for item, w in zip(pop.items, pop.vals, strict=True):
        pv[t.local[t.gid[("video", item)]]] = w
    prior = text_prior([liked], vecs.all()[t.rows("video")], pv, srv.s.cold_text_beta,
                       srv.s.cold_text_alpha)[0]
    want = [t.ids[t.rows("video")[c]] for c in np.argsort(-prior)[:10]]
    assert cold1 == want


@pytest.mark.parametrize("grid", [(), (0.0, 0.5, 1.0, 2.0, 4.0)])
def test_hybrid_params_report_the_cold_prior(grid):
    cat, evs = _themed_stream(np.random.default_rng(6), events=64)
    pq = Prequential(cat, EvalConfig(batch=16, methods=("xrec",),
                                     cold_text=(0.5, 10.0, 0.3, 20), cold_text_grid=grid))
    pq.run(evs, total=len(evs))
    x = next(m for m in pq.methods if m.name == "xrec")
    assert isinstance(x, Hybrid)
    got = pq.params()["xrec"]["cold_text"]
    assert got["weight_start"] == 0.5 and got["beta"] == 10.0 and got["alpha"] == 0.3
    assert got["grid"] == sorted({0.5, *grid})
    assert got["weight_now"] in got["grid"]


def test_cold_weight_learns_which_weight_ranks_the_targets_best():
    rng = np.random.default_rng(8)
    base = rng.standard_normal((200, 50))
    target = rng.integers(0, 50, size=200)
    helps = rng.standard_normal((200, 50))
    helps[np.arange(200), target] += 3.0  # the prior points at the target
    hurts = rng.standard_normal((200, 50))
    hurts[np.arange(200), target] -= 3.0  # the prior points away from it
    for prior, want in ((helps, 4.0), (hurts, 0.0)):
        cw = ColdWeight((0.0, 0.5, 1.0, 2.0, 4.0), start=1.0, min_asks=30)
        cw.learn(base[:10], prior[:10], target[:10])
        assert cw.weight == 1.0  # too few asks yet: the starting weight
        cw.learn(base[10:], prior[10:], target[10:])
        assert cw.weight == want
    # excluded columns (-inf) never outrank the target, whatever the weight
    cw = ColdWeight((0.0, 4.0), start=0.0, min_asks=1)
    b = np.zeros((1, 5))
    b[0, 1:] = -np.inf
    cw.learn(b, np.array([[0.0, 9.0, 9.0, 9.0, 9.0]]), [0])
    assert cw.gain.tolist() == [1.0, 1.0]


def test_xrec_learns_to_drop_a_prior_whose_texts_mislead():
    """Give each music item the text of an item of the next theme: a user's positives
    elsewhere now point at the wrong music. The online weight falls to 0, and xrec's
    cold starts beat the same run with the prior's weight fixed at 4."""
    cat, evs = _themed_stream(np.random.default_rng(9), events=1500)
    ids, vecs = cat["music"]
    misled = {"video": cat["video"], "music": (ids, np.roll(vecs, -1, axis=0))}

    def run(grid, start):
        pq = Prequential(misled, EvalConfig(batch=16, methods=("xrec",),
                                            cold_text=(start, 10.0, 0.3, 20),
                                            cold_text_grid=grid))
        pq.run(evs, total=len(evs))
        return (pq.params()["xrec"]["cold_text"]["weight_now"],
                pq.results()["xrec"]["coldstart"]["recall@10"])

    w, adaptive = run((0.0, 0.5, 1.0, 2.0, 4.0), 1.0)
    w4, fixed = run((), 4.0)
    assert w == 0.0 and w4 == 4.0
    assert adaptive > fixed + 0.1
