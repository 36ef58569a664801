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
