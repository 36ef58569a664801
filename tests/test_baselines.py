"""The prequential harness's baselines on hand-made streams, and the one input they share."""

from __future__ import annotations

import math

import numpy as np

from models.baselines import ItemKNN, Method, PopCo, Popularity, Query, Tuned
from models.heads import ItemTable
from models.prequential import EvalConfig, Event, Prequential
from models.sasrec import SASRec, SASRecConfig


def table(n: int = 6, platforms: tuple[str, ...] = ("video",)) -> ItemTable:
    t = ItemTable(8, 64)
    for p in platforms:
        ids = [f"{p}{k}" for k in range(n)]
        t.set_text(p, ids, np.eye(n, 8, dtype=np.float32))
    return t


def q(
    t: ItemTable,
    p: str,
    item: str,
    hist: list[str] = (),
    label: int = 1,
    time: float = 0.0,
    weight: float = 1.0,
) -> Query:
    g = t.ensure(p, item)
    h = [
        (t.ensure(p2, i2), 1, time - 1 - k)
        for k, (p2, i2) in enumerate(x.split(":") if ":" in x else (p, x) for x in hist)
    ]
    return Query(
        p, g, t.local[g], label, time, h, np.zeros(0, np.int64), True, False, weight=weight
    )


class Recorder(Method):
    """Wraps a method; keeps every list of queries it was asked to rank or learn from."""

    def __init__(self, inner: Method) -> None:
        self.inner, self.name = inner, inner.name
        self.asked: list[list[Query]] = []
        self.taught: list[list[Query]] = []

    def scores(self, qs, p):
        self.asked.append(qs)
        return self.inner.scores(qs, p)

    def learn(self, qs, batch):
        self.taught.append(qs)
        self.inner.learn(qs, batch)


def test_every_method_ranks_from_the_same_queries_with_in_batch_history():
    cat = {
        p: ([f"{p}{k}" for k in range(6)], np.eye(6, 384, dtype=np.float32))
        for p in ("video", "music")
    }
    pq = Prequential(
        cat,
        EvalConfig(batch=4, methods=("xrec", "popularity", "itemknn", "popco", "sasrec",
                                     "text_zero_shot", "textpop")),
    )
    build = pq._build
    recs: list[Recorder] = []

    def wrapped(total):
        build(total)
        recs.extend(Recorder(m) for m in pq.methods)
        pq.methods[:] = recs

    pq._build = wrapped  # type: ignore[method-assign]
    events = [
        Event("u1", "video", "video1", 1, 1.0, 1.0),
        Event("u1", "video", "video2", 1, 1.0, 2.0),
        Event("u2", "music", "music1", 1, 1.0, 3.0),
        Event("u1", "music", "music3", 1, 1.0, 4.0),
        Event("u2", "video", "video1", 1, 1.0, 5.0),
        Event("u2", "video", "video4", 0, 1.0, 6.0),
    ]
    pq.run(events, total=len(events))
    assert [r.name for r in recs] == ["xrec", "popularity", "itemknn", "popco", "sasrec",
                                      "text_zero_shot", "textpop"]
    first = recs[0]
    for r in recs[1:]:  # the very same query objects, in the same order, for every method
        assert len(r.asked) == len(first.asked) and len(r.taught) == len(first.taught)
        assert all(a is b for a, b in zip(r.asked, first.asked, strict=True))
        assert all(a is b for a, b in zip(r.taught, first.taught, strict=True))
    batch1 = first.taught[0]
    t = pq.table
    # u1's second event sees the first one of the same micro-batch; its music event sees both
    assert [h[0] for h in batch1[1].history] == [t.ensure("video", "video1")]
    assert [h[0] for h in batch1[3].history] == [
        t.ensure("video", "video2"),
        t.ensure("video", "video1"),
    ]
    assert batch1[3].coldstart and not batch1[2].coldstart


def test_popularity_counts_and_decay():
    t = table()
    counts = Popularity(t, math.inf)
    counts.learn(
        [q(t, "video", "video1", time=0.0)] * 3 + [q(t, "video", "video2", time=100.0)], []
    )
    s = counts.scores([q(t, "video", "video0")], "video")[0]
    assert s.argmax() == t.local[t.ensure("video", "video1")] and s[2] == 1.0
    fast = Popularity(t, half_life_s=10.0)  # 100 s later, one positive beats three
    fast.learn([q(t, "video", "video1", time=0.0)] * 3 + [q(t, "video", "video2", time=100.0)], [])
    s = fast.scores([q(t, "video", "video0")], "video")[0]
    assert s.argmax() == t.local[t.ensure("video", "video2")]
    assert counts.params() == {"half_life_days": None}


def test_itemknn_scores_co_consumed_items_and_falls_back_to_popularity():
    t = table()
    knn = ItemKNN(t, fit_window=50, score_window=20)
    # many users: video1 then video2; video3 is the most popular item overall
    teach = []
    for k in range(5):
        teach += [
            q(t, "video", "video1", time=10 * k),
            q(t, "video", "video2", ["video1"], time=10 * k + 1),
        ]
    teach += [q(t, "video", "video3", time=100 + k) for k in range(8)]
    knn.learn(teach, [])
    s = knn.scores([q(t, "video", "video0", ["video1"]), q(t, "video", "video0", [])], "video")
    v = {i: t.local[t.ensure("video", f"video{i}")] for i in range(6)}
    assert s[0].argmax() == v[2]  # the neighbour of the user's positive
    assert (
        s[1].argmax() == v[3] and s[1].max() < 1e-5
    )  # no positives: popularity only, as tie-break
    # cosine: co-count / sqrt(n(h) n(i)) = 5 / sqrt(5 * 5)
    assert abs(s[0][v[2]] - 1.0) < 1e-4


def test_popco_is_the_worker_scorer():
    t = table()
    pc = PopCo(t, half_life_s=math.inf, window=5, keep=200, blend=0.7)
    pc.learn(
        [
            q(t, "video", "video1"),
            q(t, "video", "video2", ["video1"], weight=2.0),
            q(t, "video", "video3", ["video2", "video1"]),
            q(t, "video", "video4"),
            q(t, "video", "video4"),
        ],
        [],
    )
    v = {i: t.local[t.ensure("video", f"video{i}")] for i in range(6)}
    m = pc._mat("video")
    # a positive of weight w on i adds w/k to co(r_k, i) for the k-th most recent earlier positive
    assert m[v[1], v[2]] == 2.0 and m[v[2], v[3]] == 1.0 and m[v[1], v[3]] == 0.5
    s = pc.scores([q(t, "video", "video0", ["video1"]), q(t, "video", "video0", [])], "video")
    pop = pc.pop.vec("video")
    assert pop[v[4]] == 2.0 and pop[v[2]] == 2.0  # weights, plain counts (infinite half-life)
    co = m[v[1], :6]  # the user's one recent positive: video1 (k = 1)
    assert np.allclose(s[0], 0.7 * co / co.max() + 0.3 * pop / pop.max())
    assert np.allclose(s[1], pop / pop.max())  # nothing co-occurs: popularity alone


class Fixed(Method):
    """Ranks the item ``good`` first or last."""

    def __init__(self, good: bool, n: int) -> None:
        self.good, self.n, self.name = good, n, "fixed"

    def params(self):
        return {"good": self.good}

    def scores(self, qs, p):
        out = np.zeros((len(qs), self.n))
        for r, x in enumerate(qs):
            out[r, x.local] = 1.0 if self.good else -1.0
        return out


def test_tuned_keeps_the_candidate_best_on_the_warm_up_only():
    t = table(12)  # more items than the cut-off: last place is outside the top 10
    tuned = Tuned("fixed", [Fixed(False, 12), Fixed(True, 12)], warm_events=4)
    for k in range(3):
        qs = [q(t, "video", "video1", time=k), q(t, "video", "video2", time=k)]
        tuned.scores(qs, "video")
        tuned.learn(qs, [None, None])
    assert tuned.chosen is not None and tuned.params()["good"] is True
    p = tuned.params()
    assert p["chosen_on_warmup"] is True and set(p["warmup_ndcg@10"]) == {"good=False", "good=True"}
    assert p["warmup_ndcg@10"]["good=True"] == 1.0 and p["warmup_ndcg@10"]["good=False"] == 0.0


def test_sasrec_learns_what_follows_what_and_keeps_to_its_own_random_numbers():
    import torch

    t = table(8)
    m = SASRec(t, SASRecConfig(dim=32, lr=3e-3, steps=2, dropout=0.0, max_len=10))
    v = [t.ensure("video", f"video{k}") for k in range(8)]
    rng = np.random.default_rng(0)

    def walk(k0: int, n: int) -> list[str]:  # video k is always followed by video k+1
        return [f"video{(k0 + j) % 8}" for j in range(n)]

    def hits() -> int:
        n = 0
        for k in range(8):
            s = m.scores([q(t, "video", "video0", walk(k, 3)[::-1])], "video")[0]
            n += int(s.argmax() == t.local[v[(k + 3) % 8]])  # the item after the newest
        return n

    assert hits() <= 3  # untrained, it does not know the order
    state = torch.get_rng_state()
    for _ in range(60):
        qs = []
        for _ in range(16):
            seq = walk(int(rng.integers(8)), int(rng.integers(2, 6)))
            qs.append(q(t, "video", seq[-1], seq[:-1][::-1]))  # history newest first
        m.learn(qs, qs)
    assert torch.equal(torch.get_rng_state(), state)  # other methods' figures are unchanged
    assert m.steps == 120
    assert hits() >= 7


def _ranks(methods: tuple[str, ...], weight: float) -> dict[str, list]:
    """Every method's rank of every query over a small two-platform stream."""
    cat = {p: ([f"{p}{k}" for k in range(8)],
               np.random.default_rng(3).normal(size=(8, 384)).astype(np.float32))
           for p in ("video", "music")}
    pq = Prequential(cat, EvalConfig(batch=4, methods=methods, hybrid_weight=weight))
    got: dict[str, list] = {}
    pq.observers.append(lambda _b, _q, ranks: [got.setdefault(m, []).extend(r)
                                               for m, r in ranks.items()])
    rng = np.random.default_rng(5)
    events = [Event(f"u{rng.integers(4)}", p, f"{p}{rng.integers(8)}", int(rng.random() < .8),
                    1.0, float(k)) for k, p in enumerate(rng.choice(["video", "music"], 80))]
    pq.run(events, total=len(events))
    return got


def test_xrec_is_the_model_plus_weighted_popco_on_the_same_information():
    both = _ranks(("xrec", "xrec_model", "popco"), 0.0)
    assert any(r is not None for r in both["xrec"])
    assert both["xrec"] == both["xrec_model"]  # weight 0: the model's order exactly
    mixed = _ranks(("xrec", "xrec_model", "popco"), 0.2)
    alone = _ranks(("xrec",), 0.2)  # its parts not in the run: it trains them, once a batch
    assert alone["xrec"] == mixed["xrec"]
    assert mixed["xrec_model"] == both["xrec_model"]
    heavy = _ranks(("xrec", "xrec_model", "popco"), 1e6)
    differs = [a != b for a, b in zip(heavy["xrec"], heavy["xrec_model"], strict=True)]
    assert any(differs)  # popco's weight moves the ranking


def test_popco_reads_only_the_strongest_neighbours_as_the_worker_does():
    """``read`` (XREC_COOC_READ): each recent item contributes its ``read`` strongest
    co-occurrence entries only, as the worker's ZREVRANGE 0..read-1."""
    t = table()
    teach = [q(t, "video", "video1"), q(t, "video", "video2", ["video1"], weight=3.0),
             q(t, "video", "video3", ["video1"], weight=2.0),
             q(t, "video", "video4", ["video1"], weight=1.0)]
    full = PopCo(t, half_life_s=math.inf, window=1, keep=200, blend=1.0)
    cut = PopCo(t, half_life_s=math.inf, window=1, keep=200, blend=1.0, read=2)
    full.learn(teach, [])
    cut.learn(teach, [])
    v = {i: t.local[t.ensure("video", f"video{i}")] for i in range(6)}
    ask = [q(t, "video", "video0", ["video1"])]
    a, b = full.scores(ask, "video")[0], cut.scores(ask, "video")[0]
    assert a[v[4]] > 0 and b[v[4]] == 0  # the third-strongest neighbour is not read
    assert b[v[2]] == a[v[2]] and b[v[3]] == a[v[3]]
    assert cut.params()["read"] == 2
