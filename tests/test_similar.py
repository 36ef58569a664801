"""Catalog → encoder → Redis vectors → in-memory index, and `xrec similar` across platforms."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis as redis_sync
from click.testing import CliRunner

from models.index import ItemIndex
from producers.replay import Replayer, Source
from producers.simulate import SimConfig, simulate
from producers.themes import THEMES
from streams.topics import Topics
from tests.conftest import create_all_topics, make_settings, settings_env
from tests.kafka_util import produce
from xrec.cli import cli


def test_item_index_upsert_and_search():
    idx = ItemIndex(3)
    idx.upsert(["a", "b", "c"], np.eye(3))
    idx.upsert(["b"], [[0.6, 0.8, 0]])  # an update replaces, never duplicates
    assert len(idx) == 3
    assert idx.search([1, 0, 0], k=2) == [("a", 1.0), ("b", 0.6)]
    assert idx.search([1, 0, 0], k=5, exclude=["a"])[0] == ("b", 0.6)
    assert ItemIndex(3).search([1, 0, 0]) == []


@pytest.mark.integration
def test_catalog_to_similar(stack, ns, worker_factory, tmp_path):
    s = make_settings(stack, ns)
    t = Topics(s)
    create_all_topics(s)
    worker_factory(s, agents="catalog")
    man = simulate(SimConfig(events=10, seed=4), tmp_path)
    rep = Replayer(stack.bootstrap)
    rep.replay([Source(tmp_path / f, t.catalog(p)) for p, f in man["files"]["catalog"].items()],
               progress=False)
    rep.close()
    # an item with no usable text, and a Chinese title
    produce(stack.bootstrap, t.catalog("shop"), [
        json.dumps({"sku": "sku-blank", "title": "?!"}).encode(),
        json.dumps({"sku": "sku-zh", "title": "天文望远镜", "category": "天文"}).encode()])
    total = sum(man["items"].values()) + 2
    r = redis_sync.Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        if st.get("catalog_items", 0) >= total:
            break
        time.sleep(0.3)
    assert st["catalog_items"] == total
    assert st["catalog_encoded"] == total - 1 and st["catalog_notext"] == 1
    assert r.hget(f"{ns}:item:shop:sku-blank", "notext") == "1"

    env = settings_env(s)
    per = 30  # items per theme: theme k owns ids k*30 .. k*30+29
    space = list(THEMES).index("space")

    def theme(item_id: str) -> int:
        return int(item_id.split("-")[1]) // per

    out = CliRunner().invoke(cli, ["similar", "--item", f"vid-{space * per:05d}", "--platform",
                                   "video", "--to", "music,shop", "--json"], env=env)
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    for p in ("music", "shop"):
        hits = res["results"][p]
        assert len(hits) == 10
        same = sum(theme(h["item"]) == space for h in hits)
        assert same >= 6, (p, hits)  # semantically matched items outrank unrelated ones
    out = CliRunner().invoke(cli, ["similar", "--text", "cooking pasta in an italian kitchen",
                                   "--to", "shop,video", "--json"], env=env)
    res = json.loads(out.output)
    cooking = list(THEMES).index("cooking")
    for p in ("shop", "video"):
        top = res["results"][p][:5]
        assert sum(theme(h["item"]) == cooking for h in top if h["item"][4:].isdigit()) >= 3, top
    out = CliRunner().invoke(cli, ["similar", "--item", "nope", "--platform", "shop"], env=env)
    assert out.exit_code == 2 and "no vector" in out.output

    # a catalog update re-encodes only the item whose text changed
    rb = redis_sync.Redis.from_url(stack.redis_url)
    vkey = next(k for k in rb.scan_iter(f"{ns}:vec:*:shop".encode()))
    before = rb.hget(vkey, "sku-00000")
    same = json.loads((tmp_path / "shop.catalog.jsonl").read_text().splitlines()[0])
    produce(stack.bootstrap, t.catalog("shop"), [
        json.dumps(same).encode(),
        json.dumps({**same, "sku": "sku-00001", "title": "Ultralight titanium camping stove"})
        .encode()])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st2 = {k: int(v) for k, v in r.hgetall(f"{ns}:stats").items()}
        if st2["catalog_items"] >= total + 2:
            break
        time.sleep(0.2)
    assert st2["catalog_encoded"] == st["catalog_encoded"] + 1
    assert rb.hget(vkey, "sku-00000") == before
    assert "camping stove" in r.hget(f"{ns}:item:shop:sku-00001", "text")
