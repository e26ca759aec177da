"""Arithmetic word problems solved with the calculator tool.

Templates cover shopping, sharing, distances, ages, savings, areas, populations, units,
discounts and bare arithmetic, with one- and two-step expressions over ``+ - * /`` and
numbers from one digit to millions (and prices in cents). Every answer is exact: integer,
or a terminating decimal with at most two places, computed with :class:`fractions.Fraction`
alongside the expression; a draw whose calculator output disagrees is rejected.

Reference answer (assistant parts): ``python`` EXPR, ``python_output`` ``calculator(EXPR)``,
``text`` ``"The answer is N."``. The score reads the last number of the text after the
tool output, so repeating the tool result is not enough: the model must state it.

Split key: the expression with the operands of ``+`` and ``*`` sorted, so the same
arithmetic ("17+25" or "25+17", in any story) never appears in both splits.
"""

from __future__ import annotations

import ast
import random
from decimal import Decimal
from fractions import Fraction
from typing import Callable

from rdn.tasks.base import Problem, Task, assistant_parts, final_text, last_number, reference_final_text, same_number
from rdn.inference.tools import calculator

ANSWER_PHRASE = "The answer is {}."

_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia",
          "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tomas", "Uma", "Vera", "Wei", "Yusuf", "Zoe"]
_THINGS = ["apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells", "stickers", "cookies",
           "beads", "buttons", "eggs", "lemons", "nails", "seeds", "tickets", "toy cars", "postcards", "candles"]
_GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
          ("mug", "mugs"), ("plant", "plants"), ("scarf", "scarves"), ("bottle of juice", "bottles of juice"),
          ("pair of socks", "pairs of socks"), ("loaf of bread", "loaves of bread")]
_CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("jar", "jars"), ("basket", "baskets"),
               ("shelf", "shelves"), ("tray", "trays"), ("carton", "cartons")]
_TOWNS = ["Ashford", "Brixton", "Carlow", "Dunmore", "Elmwood", "Fairview", "Glenrock", "Harbor City"]
_VEHICLES = [("train", "km", 40, 320), ("car", "km", 30, 130), ("bus", "km", 20, 90), ("truck", "miles", 20, 75),
             ("ship", "nautical miles", 5, 40), ("plane", "km", 300, 950), ("cyclist", "km", 8, 40)]
_SALE_ITEMS = ["jacket", "bicycle", "laptop", "sofa", "camera", "lamp", "pair of boots", "backpack", "guitar"]


def _n(rng: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi] whose digit count is uniform, so small and large sizes both appear."""
    sizes = range(len(str(lo)), len(str(hi)) + 1)
    digits = rng.choice(list(sizes))
    return rng.randint(max(lo, 10 ** (digits - 1) if digits > 1 else lo), min(hi, 10 ** digits - 1))


def _price(rng: random.Random, lo: int = 1, hi: int = 99) -> Fraction:
    """A price in dollars with cents (sometimes whole dollars)."""
    cents = rng.randint(lo * 100, hi * 100)
    roll = rng.random()
    if roll < 0.3:
        cents = max(100, cents // 100 * 100)
    elif roll < 0.65:
        cents = max(5, cents // 5 * 5)
    return Fraction(cents, 100)


def _lit(x: Fraction | int) -> str:
    """A number as the expression and the question write it: 12, 3.5, 0.75."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    text = format(Decimal(x.numerator) / Decimal(x.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _money(x: Fraction) -> str:
    return f"${_lit(x)}" if x.denominator == 1 else f"${Decimal(x.numerator) / Decimal(x.denominator):.2f}"


# --------------------------------------------------------------------------- templates
# Each returns (question, expression, exact value). Numbers in the expression appear in the question.

def _gets_more(rng):
    who, other, thing = *rng.sample(_NAMES, 2), rng.choice(_THINGS)
    a, b = _n(rng, 2, 99_999), _n(rng, 2, 9_999)
    return (f"{who} has {a} {thing}. {other} gives {who} {b} more. How many {thing} does {who} have now?",
            f"{a}+{b}", Fraction(a + b))


def _gives_away(rng):
    who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a = _n(rng, 10, 99_999)
    b = rng.randint(1, a - 1)
    return f"{who} had {a} {thing} and gave away {b} of them. How many {thing} are left?", f"{a}-{b}", Fraction(a - b)


def _containers(rng):
    (box, boxes), thing = rng.choice(_CONTAINERS), rng.choice(_THINGS)
    a, b = _n(rng, 2, 999), _n(rng, 2, 999)
    return f"Each {box} holds {a} {thing}. How many {thing} are there in {b} full {boxes}?", f"{a}*{b}", Fraction(a * b)


def _sharing(rng):
    who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    b, each = rng.randint(2, 60), _n(rng, 2, 9_999)
    a = b * each
    return (f"{who} shares {a} {thing} equally among {b} friends. How many {thing} does each friend get?",
            f"{a}/{b}", Fraction(each))


def _distance(rng):
    vehicle, unit, slow, fast = rng.choice(_VEHICLES)
    speed, hours = rng.randint(slow, fast), rng.randint(2, 30)
    return (f"A {vehicle} travels at {speed} {unit} per hour for {hours} hours. How many {unit} does it cover?",
            f"{speed}*{hours}", Fraction(speed * hours))


def _speed(rng):
    a, b = rng.sample(_TOWNS, 2)
    hours, speed = rng.randint(2, 12), rng.randint(20, 130)
    dist = hours * speed
    return (f"The road from {a} to {b} is {dist} km long. A car drives it in {hours} hours at a steady speed. "
            f"What is its speed in km per hour?", f"{dist}/{hours}", Fraction(speed))


def _older(rng):
    who, other = rng.sample(_NAMES, 2)
    a, b = rng.randint(1, 60), rng.randint(1, 40)
    return (f"{who} is {a} years old. {other} is {b} years older than {who}. How old is {other}?",
            f"{a}+{b}", Fraction(a + b))


def _born(rng):
    who = rng.choice(_NAMES)
    born = rng.randint(1900, 2020)
    year = rng.randint(born + 1, 2100)
    return f"{who} was born in {born}. How old does {who} turn in {year}?", f"{year}-{born}", Fraction(year - born)


def _shopping(rng):
    who, (one, many) = rng.choice(_NAMES), rng.choice(_GOODS)
    q, p = rng.randint(2, 40), _price(rng, 1, 60)
    return (f"{who} buys {q} {many} at {_money(p)} each. How many dollars does {who} spend?",
            f"{q}*{_lit(p)}", q * p)


def _change(rng):
    who, (one, _) = rng.choice(_NAMES), rng.choice(_GOODS)
    bill = rng.choice([5, 10, 20, 50, 100])
    p = _price(rng, 1, bill - 1) if bill > 5 else Fraction(rng.randint(10, 495), 100)
    return (f"{who} pays for a {one} that costs {_money(p)} with a ${bill} bill. How many dollars of change "
            f"does {who} get back?", f"{bill}-{_lit(p)}", bill - p)


def _savings(rng):
    who = rng.choice(_NAMES)
    per, weeks = _n(rng, 2, 500), rng.randint(2, 104)
    return (f"{who} saves ${per} every week. How many dollars has {who} saved after {weeks} weeks?",
            f"{per}*{weeks}", Fraction(per * weeks))


def _area(rng):
    length, width = _n(rng, 2, 2_000), _n(rng, 2, 900)
    place = rng.choice(["garden", "field", "room", "parking lot", "swimming pool"])
    return (f"A rectangular {place} is {length} meters long and {width} meters wide. What is its area in "
            f"square meters?", f"{length}*{width}", Fraction(length * width))


def _population(rng):
    town = rng.choice(_TOWNS)
    pop, moved = _n(rng, 1_000, 9_000_000), _n(rng, 10, 90_000)
    if rng.random() < 0.5:
        return (f"{town} had {pop} residents. During the year {moved} people moved in. How many residents does "
                f"{town} have now?", f"{pop}+{moved}", Fraction(pop + moved))
    moved = min(moved, pop - 1)
    return (f"{town} had {pop} residents. During the year {moved} people moved away. How many residents are "
            f"left?", f"{pop}-{moved}", Fraction(pop - moved))


def _units(rng):
    kind = rng.randrange(3)
    if kind == 0:
        km = Fraction(rng.randint(1, 400), rng.choice([1, 2, 4, 10]))
        return f"How many meters are there in {_lit(km)} kilometers?", f"{_lit(km)}*1000", km * 1000
    if kind == 1:
        minutes = _n(rng, 2, 5_000)
        return (f"A film festival lasts {minutes} minutes. How many seconds is that?",
                f"{minutes}*60", Fraction(minutes * 60))
    hours = rng.randint(2, 500)
    return f"How many minutes are there in {hours} hours?", f"{hours}*60", Fraction(hours * 60)


def _packs_plus(rng):  # two steps: a * b + c
    who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    packs, per, extra = rng.randint(2, 50), rng.randint(2, 48), _n(rng, 1, 999)
    return (f"{who} buys {packs} packs of {thing} with {per} in each pack, then finds {extra} more. How many "
            f"{thing} does {who} have in all?", f"{packs}*{per}+{extra}", Fraction(packs * per + extra))


def _gives_each(rng):  # two steps: a - b * c
    who, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    friends, each = rng.randint(2, 20), rng.randint(2, 50)
    start = friends * each + _n(rng, 0, 9_999)
    return (f"{who} has {start} {thing} and gives {each} to each of {friends} friends. How many {thing} does "
            f"{who} have left?", f"{start}-{friends}*{each}", Fraction(start - friends * each))


def _pool_and_share(rng):  # two steps: (a + b) / c
    who, other, thing = *rng.sample(_NAMES, 2), rng.choice(_THINGS)
    people = rng.randint(2, 12)
    total = people * _n(rng, 2, 2_000)
    a = rng.randint(1, total - 1)
    return (f"{who} collected {a} {thing} and {other} collected {total - a}. They share them equally among "
            f"{people} people. How many {thing} does each person get?",
            f"({a}+{total - a})/{people}", Fraction(total, people))


def _two_goods(rng):  # two steps: q1 * p1 + q2 * p2
    who = rng.choice(_NAMES)
    (_, many1), (_, many2) = rng.sample(_GOODS, 2)
    q1, q2, p1, p2 = rng.randint(2, 12), rng.randint(2, 12), _price(rng, 1, 30), _price(rng, 1, 30)
    return (f"{who} buys {q1} {many1} at {_money(p1)} each and {q2} {many2} at {_money(p2)} each. How many "
            f"dollars does {who} pay in total?", f"{q1}*{_lit(p1)}+{q2}*{_lit(p2)}", q1 * p1 + q2 * p2)


def _wage(rng):  # two steps: a * b - c
    who = rng.choice(_NAMES)
    rate, hours = rng.randint(8, 95), rng.randint(2, 60)
    spent = rng.randint(1, rate * hours - 1)
    return (f"{who} earns ${rate} per hour and works {hours} hours. Then {who} spends ${spent} on rent. How many "
            f"dollars does {who} have left?", f"{rate}*{hours}-{spent}", Fraction(rate * hours - spent))


def _discount(rng):  # two steps: p - p * d / 100
    one = rng.choice(_SALE_ITEMS)
    price, off = rng.randint(4, 900), rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
    return (f"A {one} costs ${price}. It is on sale for {off}% off. What is the sale price in dollars?",
            f"{price}-{price}*{off}/100", price - Fraction(price * off, 100))


def _average(rng):  # two steps: (a + b + c) / 3
    who = rng.choice(_NAMES)
    a, b = rng.randint(40, 100), rng.randint(40, 100)
    c = rng.choice([x for x in range(40, 101) if (a + b + x) % 3 == 0])
    return (f"{who} scored {a}, {b} and {c} points in 3 games. What is the average score per game?",
            f"({a}+{b}+{c})/3", Fraction(a + b + c, 3))


def _bare(rng):
    a, b = _n(rng, 2, 99_999), _n(rng, 2, 9_999)
    kind = rng.randrange(5)
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a}+{b}", Fraction(a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"Compute {a} minus {b}.", f"{a}-{b}", Fraction(a - b)
    if kind == 2:
        a, b = _n(rng, 2, 9_999), _n(rng, 2, 999)
        return f"What is {a} times {b}?", f"{a}*{b}", Fraction(a * b)
    if kind == 3:
        b = rng.randint(2, 99)
        a = b * _n(rng, 2, 9_999)
        return f"What is {a} divided by {b}?", f"{a}/{b}", Fraction(a // b)
    c = rng.randint(2, 99)
    a, b = max(a, b), min(a, b)
    return f"What is ({a} - {b}) * {c}?", f"({a}-{b})*{c}", Fraction((a - b) * c)


TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, Fraction]], ...] = (
    _gets_more, _gives_away, _containers, _sharing, _distance, _speed, _older, _born, _shopping, _change,
    _savings, _area, _population, _units, _packs_plus, _gives_each, _pool_and_share, _two_goods, _wage,
    _discount, _average, _bare)


# --------------------------------------------------------------------------- canonical key

def canonical_expression(expr: str) -> str:
    """``expr`` with the operands of each chain of ``+`` (or ``*``) sorted: "25+17" -> "17+25"."""

    def flat(node: ast.AST, op: type) -> list[ast.AST]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, op):
            return flat(node.left, op) + flat(node.right, op)
        return [node]

    def show(node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            return _lit(Fraction(str(node.value)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return f"-({show(node.operand)})"
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            sign = "+" if isinstance(node.op, ast.Add) else "*"
            return "(" + sign.join(sorted(show(n) for n in flat(node, type(node.op)))) + ")"
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Sub, ast.Div)):
            sign = "-" if isinstance(node.op, ast.Sub) else "/"
            return f"({show(node.left)}{sign}{show(node.right)})"
        raise ValueError(f"not a canonical arithmetic expression: {expr!r}")

    return show(ast.parse(expr, mode="eval").body)


# --------------------------------------------------------------------------- the task

class CalculatorTask(Task):
    """Word problems answered with one calculator call and ``The answer is N.``"""

    name = "calculator"

    def sample(self, rng: random.Random) -> Problem:
        while True:
            question, expr, value = rng.choice(TEMPLATES)(rng)
            output = calculator(expr)
            if output == _lit(value):  # else float rounding would show another number; draw again
                break
        answer = [{"type": "python", "text": expr}, {"type": "python_output", "text": output},
                  {"type": "text", "text": ANSWER_PHRASE.format(_lit(value))}]
        return Problem(canonical_expression(expr), expr, question, answer)

    def key(self, conversation: list[dict]) -> str:
        calls = [p["text"] for p in assistant_parts(conversation[-1]) if p["type"] == "python"]
        if not calls:
            raise ValueError("a calculator conversation's reference answer has no python part")
        return canonical_expression(calls[0])

    def score(self, conversation: list[dict], reply: str) -> float:
        truth = last_number(reference_final_text(conversation))
        if truth is None:
            raise ValueError("the reference answer states no number")
        return float(same_number(last_number(final_text(reply)), truth))
