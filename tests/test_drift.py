"""Drift: detector behaviour pinned on fixed-seed streams, simulator ground truth, reactions."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from models.drift import DriftConfig, DriftMonitor, ReactionConfig, Reactions, js_divergence
from producers.simulate import SimConfig, parse_drift, simulate


def stream(n: int, change: int | None, seed: int = 0, kind: str = "labels"):
    """(item, label, vec, hit) per event; one platform. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(60, 8))
    vecs /= np.linalg.norm(vecs, axis=1)[:, None]
    zipf = 1.0 / np.arange(1, 31) ** 1.1
    zipf /= zipf.sum()
    for i in range(n):
        after = change is not None and i >= change
        fam = 30 if (after and kind == "catalog" and rng.random() < 0.6) else 0
        item = fam + int(rng.choice(30, p=zipf))
        p_pos = 0.3 if (after and kind == "labels") else 0.8
        p_hit = 0.1 if (after and kind == "hit") else 0.35
        yield f"i{item}", int(rng.random() < p_pos), vecs[item], int(rng.random() < p_hit)


def fired(change: int | None, kind: str, n: int = 12000, seed: int = 0):
    m = DriftMonitor(DriftConfig())
    for item, label, vec, hit in stream(n, change, seed, kind):
        m.observe("a", item, label, vec, hit)
    return [(s.signal, s.stream_index) for s in m.signals]


def test_detection_indices_are_pinned_on_fixed_seed_streams():
    # exact indices: a change in the detectors or their settings shows up here
    assert fired(6000, "labels") == [("labels", 6048)]
    assert fired(6000, "hit") == [("hit", 6112), ("hit", 6112)]  # platform a, and all
    assert fired(6000, "catalog") == [("popularity", 6200), ("centroid", 6400)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_alarm_on_drift_free_streams(seed):
    assert fired(None, "labels", n=30000, seed=seed) == []


def test_js_divergence_by_hand():
    assert js_divergence(Counter(a=1), Counter(a=5)) == 0.0
    assert js_divergence(Counter(a=1), Counter(b=1)) == pytest.approx(1.0)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4)
    exp = 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)) + \
        0.5 * (1.0 * np.log2(1 / 0.75))
    assert js_divergence(Counter(a=1, b=1), Counter(a=2)) == pytest.approx(exp)


class FakeTrainer:
    def __init__(self):
        from models.trainer import TrainConfig

        self.cfg = TrainConfig(lr=0.01)
        self.resets = 0
        self.anchored = 0

    def forget_replay(self):
        return 7

    def reanchor_ema(self):
        self.anchored += 1

    def set_lr(self, lr):
        self.cfg.lr = lr

    def reset_optimizer(self):
        self.resets += 1


def test_reactions_boost_then_restore_and_respect_the_off_switch():
    tr = FakeTrainer()
    r = Reactions(tr, {"off": ReactionConfig(enabled=False),
                       "hits_only": ReactionConfig(signals=("hit",))},
                  ReactionConfig(lr_factor=3.0, boost_examples=100))
    assert r.react("off", "hit") is None and tr.cfg.lr == 0.01
    assert r.react("hits_only", "labels") is None
    done = r.react("shop", "popularity")
    assert done["actions"] == ["lr×3 for 100 examples", "replay buffer cleared (7 old examples)",
                               "EMA re-anchored"]
    assert tr.cfg.lr == pytest.approx(0.03) and tr.anchored == 1 and tr.resets == 0
    assert not r.tick(60) and tr.cfg.lr == pytest.approx(0.03)
    assert r.tick(60) and tr.cfg.lr == pytest.approx(0.01)


def test_hit_rate_drops_move_the_history_horizon_not_the_weights():
    tr = FakeTrainer()
    calls = []
    r = Reactions(tr, default=ReactionConfig(history_horizon_s=600),
                  horizon=lambda p, s: calls.append((p, s)))
    done = r.react("all", "hit")
    assert calls == [("all", 600)]
    assert done["actions"] == ["histories from now on only, for 600 s"]
    assert tr.cfg.lr == 0.01 and tr.anchored == 0  # weights untouched
    assert Reactions(tr).react("video", "hit") is None  # no horizon callback: nothing to do


def test_server_history_horizon_cuts_and_expires():
    from streams.heads import cut

    hist = [("shop", "a", 1, 100.0), ("music", "b", 1, 50.0)]
    assert cut(hist, 120.0, None) == hist
    assert cut(hist, 120.0, (90.0, 200.0)) == [("shop", "a", 1, 100.0)]
    assert cut(hist, 250.0, (90.0, 200.0)) == hist  # expired


def test_simulator_drift_ground_truth(tmp_path):
    end = 1_790_000_000.0
    base = simulate(SimConfig(events=3000, seed=4, end_time=end), tmp_path / "none")
    assert base["drift"] == []
    m = simulate(SimConfig(events=3000, seed=4, end_time=end,
                           drift=["interest@1500", "labels@0.5:music", "catalog@2000"]),
                 tmp_path / "d")
    assert m["drift"] == [{"kind": "interest", "at_event": 1500, "platform": None},
                          {"kind": "labels", "at_event": 1500, "platform": "music"},
                          {"kind": "catalog", "at_event": 2000, "platform": None}]
    assert m["items"]["shop"] == base["items"]["shop"] + 30  # the new family
    evs = []
    for p in ("shop", "video", "music"):
        for line in (tmp_path / "d" / f"{p}.events.jsonl").read_text().splitlines():
            e = json.loads(line)
            evs.append((int(e["event_id"].split("-")[1]), p, e))
    evs.sort()
    fam = [n for n, p, e in evs if int(e.get("sku", e.get("video_id", e.get("track_id",
                                                                           "x-0")))[4:]) >= 360]
    assert fam and min(fam) >= 2000  # the family appears only after its change point
    skipped = [e["skipped"] for n, p, e in evs if p == "music"]
    half = len(skipped) // 2
    assert np.mean(skipped[half:]) > np.mean(skipped[:half]) + 0.2  # fewer positives
    # before the first change point, the stream is the drift-free one
    none = sorted((int(json.loads(x)["event_id"].split("-")[1]), x)
                  for p in ("shop", "video", "music")
                  for x in (tmp_path / "none" / f"{p}.events.jsonl").read_text().splitlines())
    drift = sorted((n, json.dumps(e, separators=(",", ":"))) for n, p, e in evs)
    assert [x for n, x in none if n < 1500] == [x for n, x in drift if n < 1500]


def test_drift_spec_errors():
    with pytest.raises(ValueError, match="KIND@T"):
        parse_drift("nope", 100)
    with pytest.raises(ValueError, match="outside"):
        parse_drift("interest@500", 100)
    with pytest.raises(ValueError, match="only labels"):
        parse_drift("interest@0.5:shop", 100)
    assert parse_drift("labels@0.25", 1000).at == 250


def test_running_window_stats_equal_the_windows_recomputed():
    # the monitor keeps counts and a vector sum as events enter and leave its windows;
    # checked against the windows themselves, long past many evictions and re-sums
    m = DriftMonitor(DriftConfig(window=40))
    for n, (item, label, vec, hit) in enumerate(stream(3000, 1500, 3, "catalog")):
        m.observe("a", item, label, vec if n % 7 else None, hit)
        if n % 97 == 0 or n == 2999:
            pm = m.platforms["a"]
            counts, cen = pm._window_stats()
            assert counts == Counter(pm.items)
            if pm.vecs:
                mean = np.mean(np.stack(list(pm.vecs)), axis=0)
                assert cen is not None
                np.testing.assert_allclose(cen, mean / np.linalg.norm(mean), atol=1e-9)
    assert pm.vadds > 0  # the running sum was in use, not only the fresh sums
