"""Prequential metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import PointwiseStats, RankingStats, auc, rank_of


def test_rank_counts_greater_and_half_of_ties_and_skips_excluded():
    s = np.array([0.9, 0.5, 0.7, 0.5, 0.1])
    assert rank_of(s, 1) == (2.5, 5)  # 0.9, 0.7 greater; one tie → +0.5
    assert rank_of(s, 1, np.array([0, 2])) == (0.5, 3)  # excluded items are not candidates
    assert rank_of(s, 0) == (0.0, 5)
    assert rank_of(s, 0, np.array([0])) == (0.0, 5)  # the target is never excluded
    assert rank_of(np.zeros(11), 4) == (5.0, 11)  # all tied: the random expectation


def test_ranking_stats_by_hand():
    st = RankingStats()
    for r in (0, 1, 9, 10, 19, 25):
        st.add(r)
    sm = st.summary()
    assert sm["n"] == 6
    assert sm["recall@10"] == pytest.approx(3 / 6, abs=1e-5)
    assert sm["recall@20"] == pytest.approx(5 / 6, abs=1e-5)
    ndcg = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 6
    assert sm["ndcg@10"] == pytest.approx(ndcg, abs=1e-5)
    mrr = (1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 20 + 1 / 26) / 6
    assert sm["mrr"] == pytest.approx(mrr, abs=1e-5)
    assert RankingStats().summary()["ndcg@10"] is None


def test_auc_by_hand():
    # positives 0.8, 0.4; negatives 0.6, 0.4 → pairs: (0.8>0.6)=1, (0.8>0.4)=1,
    # (0.4<0.6)=0, (0.4=0.4)=0.5 → 2.5 / 4
    assert auc(np.array([0.8, 0.4, 0.6, 0.4]), np.array([1, 1, 0, 0])) == pytest.approx(0.625)
    assert auc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    assert auc(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0


def test_f1_uses_online_calibration_learned_before_each_prediction():
    pw = PointwiseStats()
    rng = np.random.default_rng(0)
    for _ in range(2000):
        y = int(rng.random() < 0.5)
        pw.add(0.8 if y else 0.2, y)  # a perfectly separating score
    sm = pw.summary()
    assert sm["auc"] == 1.0
    assert sm["f1"] > 0.95  # calibration converges; the first predictions were wrong
    assert pw.fp + pw.fn > 0
