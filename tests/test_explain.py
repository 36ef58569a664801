"""Why each item was recommended (streams/explain.py): the reasons ride on the served
ranking, name only items of the user's own history (any platform), follow the model's
attention × similarity, and say "co-occurrence" / "popular" where the popco part of the
served score decides. No broker, no Redis: the server's Redis clients never connect."""

import pytest
import torch

from models.heads import History
from streams.explain import describe, why_json
from streams.heads import Ask
from streams.records import Recommendations, Why
from streams.state import AggRow, RecsOut
from tests.test_ranking import PLATS, server  # noqa: F401 - the fixture

T = 1e4


def history(rng, n, plats=PLATS, label=None):
    """n random interactions, newest first: (platform, item, label, time)."""
    out = []
    for j in range(n):
        p = plats[int(rng.integers(0, len(plats)))]
        lab = int(rng.integers(0, 2)) if label is None else label
        out.append((p, f"{p}-{int(rng.integers(0, 40))}", lab, T - 10.0 * (j + 1)))
    return out


def test_model_reasons_name_only_the_users_own_positives(server):  # noqa: F811
    srv, ids, rng = server
    srv.s.explain_top = 5
    asks = [Ask(history(rng, int(rng.integers(1, 12))), PLATS[n % 3], T) for n in range(30)]
    asks.append(Ask(history(rng, 6, label=0), "video", T))  # negatives only: nothing to cite
    asks.append(Ask(history(rng, 8, plats=("music",), label=1), "video", T))  # cross-platform
    out = srv.answer(asks, k=10)
    kinds = set()
    for a, items in zip(asks, out, strict=True):
        assert a.why is not None and len(a.why) == min(5, len(items))
        positives = {(p, i) for p, i, lab, _ in a.history if lab == 1}
        for w in a.why:
            why = Why.model_validate_json(w)
            kinds.add(why.kind)
            if why.kind == "popular":
                assert why.platform == a.platform and not why.evidence
                continue
            assert why.kind == "history"  # no popularity rows here: never "similar"
            assert 1 <= len(why.evidence) <= 2
            assert {(e.platform, e.item) for e in why.evidence} <= positives
            assert all(0 < e.share <= 1 for e in why.evidence)
            assert sum(e.share for e in why.evidence) <= 1 + 1e-6
    assert "history" in kinds
    assert all(Why.model_validate_json(w).kind == "popular" for w in asks[-2].why)
    music = [Why.model_validate_json(w) for w in asks[-1].why]  # video recs from music
    assert all(w.kind == "history" and {e.platform for e in w.evidence} == {"music"}
               for w in music)


def test_model_evidence_is_attention_times_similarity(server):  # noqa: F811
    """The vectorised reasons equal a per-item loop over a_j × cos(e_j, e_i)."""
    srv, ids, rng = server
    srv.s.explain_top = 5
    hist = history(rng, 10, label=1)
    a = Ask(hist, "shop", T)
    (items,) = srv.answer([a], k=5)
    t, tower = srv.tables.table, srv.cur.tower
    rows = srv.tables.gid_history(hist)
    h = History.build([rows], [T], [t.platform_index("shop")], 12, 16)
    with torch.inference_mode():
        _, att = tower.user(t, h, attention=True)
    for (item, _), w in zip(items, a.why, strict=True):
        gi = t.gid[("shop", item)]
        part: dict[tuple[str, str], float] = {}
        for j, (g, _, _) in enumerate(rows[:12]):
            c = float(att[0, j]) * max(0.0, float(tower.emb[gi] @ tower.emb[g]))
            key = (t.platforms[t.plat[g]], t.ids[g])
            part[key] = part.get(key, 0.0) + c
        best = max(part, key=part.get)
        why = Why.model_validate_json(w)
        assert (why.evidence[0].platform, why.evidence[0].item) == best
        assert why.evidence[0].share == pytest.approx(part[best] / sum(part.values()),
                                                      abs=2e-3)


def test_hybrid_reasons_say_cooccurrence_or_popular_where_popco_decides(server):  # noqa: F811
    srv, ids, rng = server
    srv.s.explain_top = 5
    srv.s.hybrid_weight = 50.0  # popco's part outweighs the model's for every item
    src = "music-3"
    hist = [("music", src, 1, T - 5.0), ("video", "video-1", 1, T - 9.0)]
    co = AggRow([("music-7", 9.0), ("music-8", 4.0)], before=0)
    pop = AggRow([(f"music-{i}", 40.0 - i) for i in range(20, 40)], before=0)
    a = Ask(hist, "music", T, exclude=[src], pop=pop, co=[co], co_src=[src])
    (items,) = srv.answer([a], k=5)
    whys = [Why.model_validate_json(w) for w in a.why]
    got = {i: w for (i, _), w in zip(items, whys, strict=True)}
    assert [i for i, _ in items[:2]] == ["music-7", "music-8"]
    assert got["music-7"].kind == "cooccurrence"
    assert [(e.platform, e.item, e.share) for e in got["music-7"].evidence] == [
        ("music", src, 1.0)]
    assert all(w.kind == "popular" and w.platform == "music" for i, w in got.items()
               if i not in ("music-7", "music-8"))
    # a small weight: the model decides; items outside the popular head are "similar"
    srv.s.hybrid_weight = 1e-3
    b = Ask(hist, "music", T, exclude=[src], pop=pop, co=[co], co_src=[src])
    (items,) = srv.answer([b], k=5)
    pop_items = {i for i in pop.items}
    for (i, _), w in zip(items, b.why, strict=True):
        why = Why.model_validate_json(w)
        if why.kind in ("history", "similar"):
            assert why.kind == ("history" if i in pop_items else "similar")
            assert {(e.platform, e.item) for e in why.evidence} <= {("music", src),
                                                                     ("video", "video-1")}


def test_reasons_off_and_on_the_wire(server):  # noqa: F811
    srv, ids, rng = server
    srv.s.explain_top = 5
    a = Ask(history(rng, 5, label=1), "video", T)
    (items,) = srv.answer([a], k=8)
    rec = RecsOut("u" * 16, "video", items, "xrec-heads-v1", T, T, T + 1, 1, a.why)
    parsed = Recommendations.model_validate_json(rec.model_dump_json())
    assert [r.item for r in parsed.items] == [i for i, _ in items]
    assert [r.why is not None for r in parsed.items] == [True] * 5 + [False] * 3
    assert "user" not in (parsed.items[0].why.model_dump_json())
    srv.s.explain_top = 0
    b = Ask(a.history, "video", T)
    (again,) = srv.answer([b], k=8)
    assert b.why is None and again == items  # the same ranking, with or without reasons
    assert '"why"' not in RecsOut("u", "video", again, "s", T, T, T, 1, b.why).model_dump_json()


def test_describe_in_words():
    w = why_json("history", [("music", "m1", 0.61), ("video", "v2", 0.2)])
    titles = {("music", "m1"): "Blue in Green"}
    text = describe(Why.model_validate_json(w), lambda p, i: titles.get((p, i)))
    assert text == ("because of m1 “Blue in Green” on music (61%), v2 on video (20%) "
                    "in your history")
    assert describe(Why.model_validate_json(why_json("popular", platform="shop"))) == \
        "popular on shop"
    co = why_json("cooccurrence", [("shop", "s9", 1.0)])
    assert describe(Why.model_validate_json(co)) == "people who had s9 on shop (100%) had this too"


def test_one_pass_for_platforms_with_and_without_popco_rows(server):  # noqa: F811
    """Every platform's rankings are explained in one pass: rows of one platform's hybrid
    parts must not leak into another's reasons."""
    srv, ids, rng = server
    srv.s.explain_top = 4
    srv.s.hybrid_weight = 50.0
    src = "music-3"
    hist = [("music", src, 1, T - 5.0), ("video", "video-1", 1, T - 9.0)]
    co = AggRow([("music-7", 9.0), ("music-8", 4.0)], before=0)
    pop = AggRow([(f"music-{i}", 40.0 - i) for i in range(20, 40)], before=0)
    a = Ask(hist, "music", T, exclude=[src], pop=pop, co=[co], co_src=[src])
    b = Ask(hist, "video", T, exclude=["video-1"])  # no popco rows: the model decides
    out = srv.answer([b, a], k=6)
    wa = [Why.model_validate_json(w) for w in a.why]
    wb = [Why.model_validate_json(w) for w in b.why]
    assert len(wa) == len(wb) == 4
    assert wa[0].kind == "cooccurrence" and wa[0].evidence[0].item == src
    assert all(w.kind in ("cooccurrence", "popular") for w in wa)
    assert all(w.platform == "music" for w in wa if w.kind == "popular")
    assert all(w.kind == "history" for w in wb)  # never "similar": video has no popularity row
    assert all({(e.platform, e.item) for e in w.evidence} <= {("music", src), ("video", "video-1")}
               for w in wb)
    assert [i for i, _ in out[1][:2]] == ["music-7", "music-8"]
