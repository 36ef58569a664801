"""Serving-path ranking: the folded user tower equals the model's, and one batched pass
(matrix products, exclusions as a mask, top-K by partial sort) equals ranking each request
on its own by brute force. No broker, no Redis: the server's Redis clients never connect."""

import numpy as np
import pytest
import torch

from models.heads import HeadsModel, History, ItemTable, ModelConfig, ServingTower, save_model
from models.index import ItemIndex
from models.metrics import rank_of
from streams.heads import Ask, ModelServer
from streams.settings import Settings
from streams.vectors import VectorStore

PLATS = ("shop", "video", "music")
DIM = 16


def trained_model(table: ItemTable, seed: int = 0) -> HeadsModel:
    torch.manual_seed(seed)
    m = HeadsModel(ModelConfig(text_dim=DIM, dim=8, hist_len=12, buckets=64), PLATS)
    with torch.no_grad():  # weights away from their start (identity value, zero MLP, ...)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.eval()
    return m


def catalog(rng, n=40):
    vecs = {p: rng.standard_normal((n, DIM)).astype(np.float32) for p in PLATS}
    ids = {p: [f"{p}-{i}" for i in range(n)] for p in PLATS}
    return ids, vecs


def test_serving_tower_equals_the_model_user_tower():
    rng = np.random.default_rng(1)
    ids, vecs = catalog(rng)
    t = ItemTable(DIM, 64)
    for p in PLATS:
        t.set_text(p, ids[p], vecs[p])
    m = trained_model(t)
    rows = [sorted([(int(rng.integers(0, len(t))), int(rng.integers(0, 2)),
                     float(rng.uniform(0, 1e4))) for _ in range(int(rng.integers(0, 15)))],
                   key=lambda x: -x[2]) for _ in range(60)]
    h = History.build(rows, [1e4] * 60, [int(rng.integers(0, 3)) for _ in range(60)], 12, 16)
    with torch.inference_mode():
        e, _ = m.item_emb(t, np.arange(len(t)))
        ref = m.user(t, h, items=e)
    tower = ServingTower(m, t)
    got = tower.user(t, h)
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    # rows added later are folded alone, to the same values as a fresh fold
    t.ensure("video", "late-item")
    tower.grow(t)
    fresh = ServingTower(m, t)
    assert torch.allclose(tower.emb, fresh.emb, atol=1e-6)
    assert torch.allclose(tower.att, fresh.att, atol=1e-6)


@pytest.fixture
def server(tmp_path):
    rng = np.random.default_rng(2)
    ids, vecs = catalog(rng)
    s = Settings(env="dev", redis_url="redis://127.0.0.1:9/0", kafka_bootstrap_servers="x:1",
                 hist_len=12, model_dim=8, model_buckets=64)
    vs = VectorStore(s.redis_url, s.redis_prefix, "test-encoder", DIM)
    for p in PLATS:
        vs.index[p] = ItemIndex(DIM)
        vs.index[p].upsert(ids[p], vecs[p])
    srv = ModelServer(s, vs, worker="test")
    srv.tables.sync()
    m = trained_model(srv.tables.table)
    srv.cur = srv._prepare(1, save_model(m, compact=False), srv.tables.table.snapshot(),
                           srv.tables.stamp)
    return srv, ids, rng


def brute_force(srv: ModelServer, ask: Ask) -> np.ndarray:
    """Scores of every catalog item of the ask's platform, computed for this ask alone."""
    t = srv.tables.table
    hist = srv.tables.gid_history(ask.history)
    h = History.build([hist], [ask.now], [t.platform_index(ask.platform)], 12, 16)
    m = srv.cur.model
    with torch.inference_mode():
        e, b = m.item_emb(t, np.arange(len(t)))
        q = m.user(t, h, items=e)
        rows = t.rows(ask.platform)
        return m.scores(q, e[rows], b[rows])[0].numpy().astype(np.float64)


def test_one_batched_pass_equals_brute_force_per_request(server):
    srv, ids, rng = server
    asks = []
    for n in range(40):
        p = PLATS[n % 3]
        hist = sorted([(PLATS[int(rng.integers(0, 3))], f"{PLATS[int(rng.integers(0, 3))]}-"
                        f"{int(rng.integers(0, 40))}", int(rng.integers(0, 2)),
                        float(rng.uniform(0, 1e4))) for _ in range(int(rng.integers(0, 10)))],
                      key=lambda x: -x[3])
        hist = [(q, f"{q}-{i.split('-')[1]}", lab, tm) for q, i, lab, tm in hist]
        exclude = [f"{p}-{int(i)}" for i in rng.integers(0, 40, size=int(rng.integers(0, 30)))]
        extra = [f"{p}-{int(rng.integers(0, 40))}"] if n % 4 == 0 else []
        target = f"{p}-{int(rng.integers(0, 40))}" if n % 2 == 0 else None
        asks.append(Ask(hist, p, 1e4, exclude=exclude, extra=extra, target=target))
    asks.append(Ask([], "video", 1e4, target="not-in-the-catalog"))
    asks.append(Ask([], "shop", 1e4, exclude=ids["shop"][:-3]))  # 3 candidates left
    out = srv.answer(asks, k=10)
    t = srv.tables.table
    for a, got in zip(asks, out, strict=True):
        s = brute_force(srv, a)
        cols = [t.local[t.gid[(a.platform, i)]] for i in [*a.exclude, *a.extra]
                if (a.platform, i) in t.gid]
        if a.target is not None:
            g = t.gid.get((a.platform, a.target))
            if g is None:
                assert got is None
                continue
            want, _ = rank_of(s, t.local[g], np.asarray(cols, dtype=np.int64))
            assert got == pytest.approx(want, abs=1.0)  # float rounding may swap near-ties
        else:
            masked = s.copy()
            masked[cols] = -np.inf
            finite = int(np.isfinite(masked).sum())
            kth = np.sort(masked)[::-1][min(10, finite) - 1]
            col_of = {t.ids[g]: j for j, g in enumerate(t.rows(a.platform))}
            got_items = [i for i, _ in got]
            assert len(got_items) == min(10, finite) == len(set(got_items))
            assert not set(got_items) & (set(a.exclude) | set(a.extra))
            # the best k of the brute-force scores (up to float rounding at the k-th place)
            assert all(masked[col_of[i]] >= kth - 1e-4 for i in got_items)
            for i, sc in got:
                assert sc == pytest.approx(masked[col_of[i]], abs=1e-4)
            scores = [sc for _, sc in got]
            assert scores == sorted(scores, reverse=True)
    assert len(out[-1]) == 3  # fewer candidates than k: what is left, nothing excluded


def test_a_new_head_version_is_prepared_off_the_loop_and_swapped_whole(server):
    srv, ids, _ = server
    before = srv.answer([Ask([], "music", 1.0)], k=5)[0]
    m2 = trained_model(srv.tables.table, seed=7)
    nxt = srv._prepare(2, save_model(m2, compact=True), srv.tables.table.snapshot(),
                       srv.tables.stamp)
    assert nxt.version == 2 and len(nxt.tower) == len(srv.tables.table)
    srv.cur = nxt
    after = srv.answer([Ask([], "music", 1.0)], k=5)[0]
    assert srv.version == 2 and before != after


def test_prequential_and_serving_asks_in_one_pass_equal_two_passes(server):
    """answer() scores a platform's prequential asks and its other asks in one pass (the
    hybrid's rows, the text prior, exclusions and reasons all per row): every rank, item,
    score and reason must be what answering each kind alone gives."""
    from streams.state import AggRow

    srv, ids, rng = server
    srv.s.explain_top = 3
    pops = {p: AggRow([(i, 40.0 - n) for n, i in enumerate(ids[p][:25])], before=0)
            for p in PLATS}

    def make():
        asks = []
        for n in range(24):
            p = PLATS[n % 3]
            hist = [(PLATS[(n + j) % 3], f"{PLATS[(n + j) % 3]}-{(7 * n + j) % 40}",
                     int(j % 3 != 2), 1e4 - j) for j in range(n % 6)]
            co = [AggRow([(f"{p}-{(n + j) % 40}", 5.0 - j)], before=0) for j in range(2)]
            target = f"{p}-{(3 * n) % 40}" if n % 2 == 0 else None
            asks.append(Ask(hist, p, 1e4, exclude=[f"{p}-{n % 40}"] if n % 3 else [],
                            target=target, pop=pops[p], co=co if n % 4 else [],
                            co_src=[f"{p}-1", f"{p}-2"] if n % 4 else []))
        return asks

    merged = make()
    out = srv.answer(merged, k=5)
    apart = make()
    evals = [a for a in apart if a.target is not None]
    recs = [a for a in apart if a.target is None]
    want = dict(zip(map(id, evals), srv.answer(evals, k=5), strict=True))
    want.update(zip(map(id, recs), srv.answer(recs, k=5), strict=True))
    for a, b, got in zip(merged, apart, out, strict=True):
        w = want[id(b)]
        if a.target is not None:
            assert got == pytest.approx(w)
        else:
            assert [i for i, _ in got] == [i for i, _ in w]
            assert [s for _, s in got] == pytest.approx([s for _, s in w], abs=1e-5)
            assert a.why == b.why and a.why
