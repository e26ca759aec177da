"""The calculator tool: Python's own arithmetic as the oracle for valid input; everything else refused fast."""

from __future__ import annotations

import random
import time

import pytest

from rdn.inference.tools import calculator, format_number


def test_valid_expressions_match_python_arithmetic():
    rng = random.Random(0)
    ops = ["+", "-", "*", "/", "//", "%"]
    for _ in range(500):
        a, b, c = rng.randint(-999, 999), rng.randint(1, 999), rng.randint(1, 50)
        expr = f"({a} {rng.choice(ops)} {b}) {rng.choice(ops)} {c}"
        want = eval(expr, {"__builtins__": {}})  # noqa: S307 -- the oracle, on numbers we generated
        assert calculator(expr) == format_number(want), expr
    assert calculator("2**10") == "1024" and calculator("-3**2") == "-9" and calculator("7/2") == "3.5"
    assert calculator(" 17 × 3 ") == "51" and calculator("10 ÷ 4") == "2.5"


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "(1).real", "x", "lambda: 1", "[1, 2]", "'a' * 10", "abs(-1)",
    "1 if 1 else 2", "a.b", "1; 2", "{1: 2}", "(lambda x: x)(1)", "True + 1", "1 < 2", "not 1",
])
def test_anything_but_arithmetic_is_an_error_string(expr):
    out = calculator(expr)
    assert out.startswith("error:"), (expr, out)


@pytest.mark.parametrize("expr", ["9**9**9", "2**10000", "10**59*10**59", "(10**30)**3", "1" * 500,
                                  "(" * 200 + "1" + ")" * 200, "+".join(["1"] * 300), "1e308*1e308", "1/0", "5%0",
                                  "(-8)**0.5", "0**-1"])
def test_huge_or_failing_input_is_refused_without_hanging(expr):
    # CPU time of this thread, not wall time: other processes on a loaded machine do not
    # count. A hang here is Python computing a huge number (9**9**9 has ~3.7e8 digits:
    # minutes of CPU); a refusal is a parse and a walk over at most a few hundred nodes
    # (microseconds), so 0.5 s of CPU tells the two apart by orders of magnitude.
    start = time.thread_time()
    out = calculator(expr)
    assert out.startswith("error:"), (expr, out)
    assert time.thread_time() - start < 0.5


def test_non_string_and_empty():
    assert calculator("") == "error: empty expression"
    assert calculator(None).startswith("error:")  # type: ignore[arg-type]
