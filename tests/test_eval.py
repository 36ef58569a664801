"""``xrec eval``: the JSON contract, user files, the MovieLens conversion, and that the
evaluation is test-then-train (a method never sees an event before ranking it)."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from models.prequential import EvalConfig, Event, Method, Prequential
from producers.simulate import SimConfig, simulate
from xrec.cli import cli


def test_eval_on_user_files_prints_the_json_contract_last(tmp_path):
    d = tmp_path / "sim"
    man = simulate(SimConfig(events=1500, users=60, seed=3), d)
    args = ["eval", "--json", "--batch", "128"]
    for p in ("shop", "video", "music"):
        args += ["--events", str(d / man["files"]["events"][p]),  # platform from the name
                 "--catalog", f"{p}:{d / man['files']['catalog'][p]}"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(last) == {"dataset", "events", "methods", "best_baseline", "ratio_ndcg@10",
                         "ratio_ci95"}
    assert last["dataset"] == "files" and last["events"] == 1500
    assert set(last["methods"]) == {"xrec", "popularity", "itemknn", "popco", "sasrec",
                                    "text_zero_shot", "textpop", "xrec_frozen", "xrec_model"}
    best = last["best_baseline"]
    assert best in {"popularity", "itemknn", "popco", "sasrec", "text_zero_shot", "textpop"}
    assert last["methods"][best]["ndcg@10"] == max(
        last["methods"][m]["ndcg@10"] for m in last["methods"]
        if m not in ("xrec", "xrec_frozen", "xrec_model"))
    assert abs(last["ratio_ndcg@10"]
               - last["methods"]["xrec"]["ndcg@10"] / last["methods"][best]["ndcg@10"]) < 2e-3
    lo, hi = last["ratio_ci95"]
    assert lo <= last["ratio_ndcg@10"] <= hi
    for m in last["methods"].values():
        assert {"ndcg@10", "recall@10", "auc", "coldstart_recall@10"} <= set(m)
        assert 0 <= m["recall@10"] <= 1 and 0 <= m["ndcg@10"] <= m["recall@10"]
    assert "coldstart" in res.stderr and "popularity" in res.stderr  # the table, on stderr
    assert "chosen_on_warmup=True" in res.stderr  # the baselines' settings are reported


def test_eval_usage_errors():
    r = CliRunner().invoke(cli, ["eval"])
    assert r.exit_code == 2 and "--dataset" in r.output
    r = CliRunner().invoke(cli, ["eval", "--dataset", "synthetic", "--methods", "magic"])
    assert r.exit_code == 2 and "unknown methods" in r.output


def _ml_fixture(tmp_path, monkeypatch):
    ml = tmp_path / "cache" / "xrec" / "datasets" / "ml-100k"
    ml.mkdir(parents=True)
    (ml / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5\t880000300\n1\t11\t3\t880000100\n2\t10\t1\t880000200\n2\t12\t4\t880000400\n"
        "1\t13\t4\t880000500\n")
    (ml / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n11\tHeat\t1995\tAction Crime\n"
        "12\tFargo\t1996\tCrime Drama Thriller\n13\tSense and Sensibility\t1995\tDrama Romance\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_movielens_conversion(tmp_path, monkeypatch):
    """Ratings ≥ 4 positive, ≤ 3 negative, replayed in timestamp order as `video`."""
    from pydantic import SecretStr

    from streams.platforms import load_platforms
    from streams.settings import Settings
    from xrec.evaluate import _movielens_files, _normalized

    _ml_fixture(tmp_path, monkeypatch)
    ev, cat = _movielens_files(tmp_path, lambda m: None)
    assert [p for p, _ in ev] == ["video"] and [p for p, _ in cat] == ["video"]
    s = Settings(pseudonym_secret=SecretStr("x" * 32))
    dead: dict[str, int] = {}
    inter = _normalized(s, load_platforms(""), ev, dead)
    assert not dead
    assert [(x.item, x.label) for x in inter] == [("ml-11", 0), ("ml-10", 0), ("ml-10", 1),
                                                   ("ml-12", 1), ("ml-13", 1)]
    assert all(x.platform == "video" for x in inter)
    recs = [json.loads(line) for line in cat[0][1].read_text().splitlines()]
    assert recs[0] == {"video_id": "ml-10", "title": "Toy Story",
                       "genres": "Animation, Children's, Comedy", "year": 1995}


def test_movielens_genres_two_platforms_one_user(tmp_path, monkeypatch):
    """By first genre: Drama … on `cinema`, the rest on `video`; a user is one user key on
    both, so the first cinema rating after video ratings is a cross-platform cold start."""
    from pydantic import SecretStr

    from streams.platforms import PlatformRegistry, load_platforms
    from streams.settings import Settings
    from xrec.evaluate import _cinema_platform, _movielens_files, _normalized

    _ml_fixture(tmp_path, monkeypatch)
    ev, cat = _movielens_files(tmp_path, lambda m: None, by_genre=True)
    assert [p for p, _ in ev] == ["video", "cinema"]
    on = {p: [json.loads(x)["video_id"] for x in f.read_text().splitlines()] for p, f in cat}
    assert on == {"video": ["ml-10", "ml-11", "ml-12"], "cinema": ["ml-13"]}
    plats = PlatformRegistry([*load_platforms("").values(), _cinema_platform(tmp_path)])
    dead: dict[str, int] = {}
    inter = _normalized(Settings(pseudonym_secret=SecretStr("x" * 32)), plats, ev, dead)
    assert not dead
    u1 = [x for x in inter if x.item in ("ml-11", "ml-13")]
    assert [x.platform for x in u1] == ["video", "cinema"] and u1[0].user == u1[1].user
    cat_all = {p: ([f"ml-{k}" for k in range(10, 14)], np.eye(4, 8, dtype=np.float32))
               for p in ("video", "cinema")}
    pq = Prequential(cat_all, EvalConfig(batch=8, methods=("popularity",)))
    pq.run([Event(x.user, x.platform, x.item, x.label, x.weight, x.event_time) for x in inter],
           total=len(inter))
    assert pq.results()["popularity"]["coldstart"]["n"] == 1  # user 1's first cinema rating


class Spy(Method):
    """Records, for each ranking, which events it had learned from."""

    name = "popularity"

    def __init__(self, n: int) -> None:
        self.learned: set[float] = set()
        self.violations = 0
        self.n = n

    def scores(self, qs, p):
        self.violations += sum(q.time in self.learned for q in qs)
        return np.zeros((len(qs), self.n))

    def learn(self, qs, batch):
        self.learned |= {q.time for q in qs}


def test_prequential_ranks_before_learning():
    cat = {"video": ([f"i{k}" for k in range(5)], np.eye(5, 384, dtype=np.float32))}
    pq = Prequential(cat, EvalConfig(batch=3, methods=()))
    spy = Spy(5)
    pq._build = lambda total: pq.methods.append(spy)  # type: ignore[method-assign]
    events = [Event(f"u{k % 2}", "video", f"i{k % 5}", 1, 1.0, float(k)) for k in range(10)]
    pq.run(events)
    assert spy.violations == 0 and len(spy.learned) == 10
    # all-equal scores: every rank is the random expectation, never a lucky first place
    r = pq.results()["popularity"]["all"]
    assert r["n"] == pq.evaluated and 0 < r["recall@10"] <= 1
