import pytest

from streams.errors import ConfigError
from streams.expr import Expr, ExprError


@pytest.mark.parametrize("src,rec,want", [
    ("a + 1", {"a": 2}, 3),
    ("'watch'", {}, "watch"),
    ("rating is not None and rating >= 4", {"rating": 5}, True),
    ("rating is not None and rating >= 4", {"rating": None}, False),
    ("min(1.0, x / 10)", {"x": 30}, 1.0),
    ("'like' if liked else ('skip' if skipped else 'play')", {"liked": False, "skipped": True},
     "skip"),
    ("action in ('cart', 'purchase')", {"action": "cart"}, True),
    ("not flag", {"flag": False}, True),
    ("lower(name)", {"name": "ABC"}, "abc"),
])
def test_eval(src, rec, want):
    assert Expr(src).eval(rec) == want


@pytest.mark.parametrize("src", [
    "__import__('os')", "x.__class__", "open('f')", "x[0]", "lambda: 1", "(y := 2)",
    "[c for c in x]", "f'{x}'",
])
def test_unsafe_expressions_are_rejected(src):
    with pytest.raises(ConfigError):
        Expr(src)


def test_runtime_errors_are_expr_errors():
    with pytest.raises(ExprError, match="ZeroDivisionError"):
        Expr("a / b").eval({"a": 1, "b": 0})
    with pytest.raises(ExprError):
        Expr("a + 1").eval({"a": None})


def test_names_are_collected():
    assert Expr("a / b if c else min(d, 1)").names == {"a", "b", "c", "d"}


def test_compiled_eval_equals_the_tree_walker_on_every_builtin_expression():
    """The normalizer runs the compiled code; the tree walker is the reference."""
    import json
    import random

    from streams.platforms import load_platforms

    rnd = random.Random(11)
    samples = [None, True, False, 0, 1, -3, 2.5, 1e9, "", "x", "watch", "PURCHASE", 1800.0]
    checked = 0
    for p in load_platforms().values():
        exprs = [p.event.event_id, p.event.item, p.event.time, p.event.kind,
                 *[e for r in p.event.rules for e in (r.when, r.weight) if e is not None]]
        names = sorted({n for e in exprs for n in e.names})
        for _ in range(300):
            rec = {n: rnd.choice(samples) for n in names if rnd.random() < 0.9}
            for e in exprs:
                try:
                    want: object = ("ok", e.reference_eval(rec))
                except ExprError as exc:
                    want = ("error", str(exc))
                try:
                    got: object = ("ok", e.eval(rec))
                except ExprError as exc:
                    got = ("error", str(exc))
                assert got == want, (e, json.dumps(rec))
                checked += 1
    assert checked > 1000


def test_compiled_names_read_missing_fields_as_none_and_functions_stay_functions():
    assert Expr("x is None").eval({}) is True
    assert Expr("min(a, 2)").eval({"a": 5, "min": 0}) == 2  # a field named min: still min()
    assert Expr("[a, 1]").eval({"a": 0}) == (0, 1)
    with pytest.raises(ConfigError, match="reserved"):
        Expr("__xrec_fn_min + 1")
