import pytest

from models.popco import decay_factor, popco_rank, popco_scores

POP = [("a", 10.0), ("b", 5.0), ("c", 2.5), ("d", 1.0)]


def test_cold_user_gets_popularity():
    assert popco_rank(POP, [], lambda i: False, 3, 0.7) == [("a", 1.0), ("b", 0.5), ("c", 0.25)]


def test_hand_computed_blend():
    # neighbours of the most recent item (rank 1) and of the previous one (rank 2)
    nb = [[("c", 4.0), ("x", 2.0)], [("c", 2.0), ("b", 4.0)]]
    # co: c = 4 + 2/2 = 5, x = 2, b = 4/2 = 2; max 5
    # score = 0.5 * co/5 + 0.5 * pop/10
    got = dict(popco_scores(POP, nb, 0.5, 10))
    assert got["c"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)
    assert got["b"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.5)
    assert got["x"] == pytest.approx(0.5 * 0.4)
    assert got["a"] == pytest.approx(0.5 * 1.0)
    assert [i for i, _ in popco_scores(POP, nb, 0.5, 10)][:2] == ["c", "a"]


def test_seen_items_are_excluded_and_ties_are_deterministic():
    pop = [("z", 1.0), ("y", 1.0), ("x", 1.0)]
    assert [i for i, _ in popco_rank(pop, [], lambda i: i == "y", 5, 0.7)] == ["x", "z"]


def test_rank_goes_deeper_when_the_head_is_seen():
    pop = [(f"i{n:03d}", 1000.0 - n) for n in range(200)]
    seen = {f"i{n:03d}" for n in range(150)}
    got = popco_rank(pop, [], seen.__contains__, 10, 0.7)
    assert [i for i, _ in got] == [f"i{n:03d}" for n in range(150, 160)]


def test_decay_halves_per_half_life():
    assert decay_factor(100.0, 0.0, 100.0) == pytest.approx(2.0)
    assert decay_factor(0.0, 100.0, 100.0) == pytest.approx(0.5)
    assert decay_factor(-1e9, 0.0, 1.0) == 0.0
