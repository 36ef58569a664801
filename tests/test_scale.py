"""Big catalogs: the ANN index (models/ann.py), its hook in ModelServer, bench/scale.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from models.ann import AnnIndex  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal(
        (n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_on_a_hand_made_set_with_biases() -> None:
    rng = np.random.default_rng(3)
    d, n = 16, 4000
    centres = _unit(rng, 40, d)
    x = _clustered(rng, n, d, centres)
    bias = (0.3 * rng.standard_normal(n)).astype(np.float32)
    tau = 2.0
    q = _clustered(rng, 100, d, centres)
    exact = np.argsort(-(tau * q @ x.T + bias), axis=1)[:, :10]
    idx = AnnIndex(x, bias, tau, ef_search=128)
    got = idx.search(q, 10)
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)])
    assert rec >= 0.95
    # the bias matters: without it the exact top-10 differs, and the index follows it
    no_bias = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, no_bias, strict=True)]) < rec
    # a point query finds itself (the largest inner product of a unit vector is itself)
    one = np.eye(d, dtype=np.float32)[:1]
    top = int(np.argmax(one @ x.T + bias / tau))
    assert top in idx.search(one, 5)[0]


def test_excluded_items_never_come_back() -> None:
    rng = np.random.default_rng(5)
    x = _unit(rng, 3000, 8)
    idx = AnnIndex(x, ef_search=64)
    q = _unit(rng, 20, 8)
    exact = np.argsort(-(q @ x.T), axis=1)
    # exclude each query's own best 50 (the worst case: every exclusion is a top item)
    excl = [exact[r, :50].tolist() for r in range(len(q))]
    excl[0] = []
    cand = idx.candidates(q, 10, excl)
    for r, c in enumerate(cand):
        assert len(c) == 10
        assert not set(c.tolist()) & set(excl[r])
    assert set(cand[0].tolist()) & set(exact[0, :10].tolist())
    # more exclusions than items left: what is left, never an excluded one
    small = AnnIndex(x[:30])
    c = small.candidates(q[:1], 10, [list(range(25))])[0]
    assert set(c.tolist()) <= set(range(25, 30))


def test_model_server_ann_hook_matches_exact_and_keeps_exclusions() -> None:
    """The served path with the hook (XREC_ANN_MIN_ITEMS below the catalog) gives the
    exact path's answers, popco hybrid on, consumed items excluded."""
    from models.heads import HeadsModel, save_model
    from models.index import ItemIndex
    from streams.heads import Ask, ModelServer, model_config
    from streams.settings import Settings
    from streams.state import AggRow

    d, n = 16, 3000
    answers = []
    for lim in (n + 1, 100):
        s = Settings(env="dev", kafka_bootstrap_servers="unused:9092",
                     redis_url="redis://127.0.0.1:1/0", ann_min_items=lim)
        vec = type("V", (), {})()
        vec.dim = d
        ix = ItemIndex(d)
        ix.upsert([f"i{j}" for j in range(n)], _unit(np.random.default_rng(1), n, d))
        vec.index = {"video": ix}
        srv = ModelServer(s, vec, "t")
        srv.tables.sync()
        model = HeadsModel(model_config(s, d), ["video"])
        srv.cur = srv._prepare(1, save_model(model, compact=True), srv.tables.table.snapshot(),
                               srv.tables.stamp)
        rng = np.random.default_rng(2)
        pop = AggRow([(f"i{j}", 1.0 / (1 + r)) for r, j in
                      enumerate(rng.choice(n, 200, replace=False))], 0)
        asks = []
        for u in range(24):
            h = [("video", f"i{int(j)}", 1, 1e9 - t) for t, j in
                 enumerate(rng.integers(0, n, 20))]
            co = [AggRow([(f"i{int(j)}", float(rng.random())) for j in
                          rng.integers(0, n, 30)], 0) for _ in range(2)]
            # exclude the items popco likes best, too: they must not come back
            ex = [x[1] for x in h] + pop.items[: 5 + u]
            asks.append(Ask(h, "video", 1e9, exclude=ex, pop=pop if u % 3 else None, co=co,
                            co_src=[x[1] for x in h[:2]]))
        srv.answer(asks, 10)
        srv._ann_wait()
        got = srv.answer(asks, 10)
        if lim < n:
            assert "video" in srv._ann  # the ANN path served this
        for a, lst in zip(asks, got, strict=True):
            assert len(lst) == 10
            assert not {i for i, _ in lst} & set(a.exclude)
        answers.append(got)
        srv._pool.shutdown(wait=False)
        srv._ann_pool.shutdown(wait=False)
    exact, ann = answers
    rec = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / 10
                   for a, b in zip(ann, exact, strict=True)])
    assert rec >= 0.95
    # same items get the same scores (exact re-scoring, the same standardisation)
    for a, b in zip(ann, exact, strict=True):
        sb = dict(b)
        for i, sc in a:
            if i in sb:
                assert sc == pytest.approx(sb[i], abs=2e-4)


def test_bench_scale_quick_json() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--json",
                          "--users", "300", "--catalog-sizes", "2000,8000", "--queries", "64",
                          "--cluster", "--cluster-users", "150"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # the contract's keys, exactly (details go to stderr)
    assert set(out) == {"users", "bytes_per_user", "redis_calls_per_event",
                        "apply_events_per_s", "catalog"}
    assert set(out["apply_events_per_s"]) == {"single", "cluster"}
    assert out["users"] == 300
    assert out["bytes_per_user"] > 0 and out["redis_calls_per_event"] > 0
    # a local 3-primary cluster was started, measured on the same workload, and stopped
    assert out["apply_events_per_s"]["single"] > 0
    assert out["apply_events_per_s"]["cluster"] > 0
    assert "same workload" in res.stderr
    assert [c["items"] for c in out["catalog"]] == [2000, 8000]
    for c in out["catalog"]:
        assert set(c) == {"items", "exact_ms_per_user", "ann_ms_per_user", "ann_recall@10"}
        assert c["exact_ms_per_user"] > 0 and c["ann_ms_per_user"] > 0
        assert 0.5 <= c["ann_recall@10"] <= 1.0
    assert "bytes per user" in res.stderr
