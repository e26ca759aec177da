"""Tools the chat model may call. One today: a safe arithmetic calculator.

The calculator parses with :mod:`ast` and evaluates only numbers, parentheses and the
operators ``+ - * / // % **`` (unary ``+``/``-`` too), with bounds on exponents and on
the size of every intermediate result, so no input can run code, hang, or exhaust
memory. It never raises: any rejected or failing input returns a short ``error: ...``
string, which is what the model then sees as the tool output. ``eval``/``exec`` are
never used.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 200
MAX_ABS_EXPONENT = 64
MAX_RESULT_DIGITS = 60          # |result| < 10**60
MAX_NODES = 100

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def _check_size(value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    if abs(value) >= 10 ** MAX_RESULT_DIGITS:
        raise CalculatorError("result too large")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_ABS_EXPONENT:
                raise CalculatorError(f"exponent larger than {MAX_ABS_EXPONENT}")
            if left == 0 and right < 0:
                raise CalculatorError("division by zero")
            if abs(left) > 1 and abs(right) * math.log10(abs(left)) >= MAX_RESULT_DIGITS:
                raise CalculatorError("result too large")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise CalculatorError("result is not a real number")
        return _check_size(result)
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def format_number(value: int | float) -> str:
    """Integers as integers (also 6.0 -> "6"); other floats with up to 10 significant digits."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression safely; returns the result or ``error: ...``."""
    if not isinstance(expression, str):
        return "error: expression must be text"
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
    if not text:
        return "error: empty expression"
    if len(text) > MAX_EXPRESSION_CHARS:
        return f"error: expression longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return "error: not an arithmetic expression"
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        return "error: expression too complex"
    try:
        return format_number(_eval(tree))
    except CalculatorError as e:
        return f"error: {e}"
    except (OverflowError, ZeroDivisionError, ValueError, TypeError):
        return "error: arithmetic failure"
