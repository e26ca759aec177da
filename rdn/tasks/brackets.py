"""Brackets: give the exact sequence that closes every open bracket of a prefix.

Prefixes nest ``()``, ``[]`` and ``{}`` to a depth of 1-8 (uniform), as pure bracket
strings (``([]{(``) or as code-like text with content between the brackets
(``f(a[1, {"k": (2``): calls, indexing, list and dict literals, arithmetic grouping,
with already-closed groups along the way that must not be closed again. Snippets never
put brackets inside string literals and never use ``<`` or ``>`` (which the
hierarchical coordinates also count as brackets), so the answer is the plain stack
reading of the text. This is the family where depth coordinates should help most.

Reference answer: the closers alone, innermost first (``)}]``). The score is 1.0 iff the
final text with all whitespace removed equals them exactly.

Split key: the prefix itself.
"""

from __future__ import annotations

import random

from rdn.tasks.base import Problem, Task, final_text, last_user_text, reference_final_text

PAIRS = {"(": ")", "[": "]", "{": "}"}
MAX_DEPTH = 8

_NAMES = ["x", "y", "n", "i", "data", "items", "row", "value", "total", "config", "result", "node", "args",
          "key", "user", "point", "matrix", "buf", "count", "table"]
_FUNCS = ["f", "g", "len", "max", "min", "sum", "print", "sorted", "dict", "list", "tuple", "str", "round",
          "np.array", "json.dumps", "math.sqrt", "os.path.join", "self.update", "obj.get", "fetch"]
_STRINGS = ['"k"', '"name"', "'id'", '"x"', "'value'", '"a b"', "'ok'", '"items"', "''", '"2024"']
_KEYS = ['"k"', '"name"', '"id"', "'x'", '"type"', '"data"', "'size'", '"items"', "1", "'a'"]
_OPS = [" + ", " - ", " * ", " / ", " % ", " == ", " and ", " or "]


def closing_sequence(text: str) -> str:
    """The closers for every bracket still open at the end of ``text``, innermost first."""
    stack: list[str] = []
    for ch in text:
        if ch in PAIRS:
            stack.append(ch)
        elif ch in PAIRS.values():
            assert stack and PAIRS[stack[-1]] == ch, f"unbalanced closer {ch!r} in {text!r}"
            stack.pop()
    return "".join(PAIRS[o] for o in reversed(stack))


# --------------------------------------------------------------------------- generators

def _atom(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(_NAMES)
    if kind == 1:
        return str(rng.choice([0, 1, 2, 3, 7, 10, 42, 100, 255, 1024]) if rng.random() < 0.7
                   else round(rng.random() * 10, 2))
    if kind == 2:
        return rng.choice(_STRINGS)
    return rng.choice(["None", "True", "False", "-1", "x.y", "self.n", "i + 1"])


def _closed(rng: random.Random, depth: int = 0) -> str:
    """A complete, balanced expression (it may contain closed brackets)."""
    if depth >= 2 or rng.random() < 0.55:
        return _atom(rng)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.choice(_FUNCS)}({_closed(rng, depth + 1)})"
    if kind == 1:
        return f"{rng.choice(_NAMES)}[{_closed(rng, depth + 1)}]"
    if kind == 2:
        return "[" + ", ".join(_closed(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    if kind == 3:
        return "{" + f"{rng.choice(_KEYS)}: {_closed(rng, depth + 1)}" + "}"
    return f"({_closed(rng, depth + 1)}{rng.choice(_OPS)}{_closed(rng, depth + 1)})"


def _code_opener(rng: random.Random, bracket: str, inside: str | None) -> str:
    """Text that ends by opening ``bracket``, placed as the next element of container ``inside``."""
    before = ""
    if inside is not None:
        elements = [_closed(rng) for _ in range(rng.choice([0, 0, 1, 1, 2]))]
        if inside == "{":
            pairs = [f"{rng.choice(_KEYS)}: {e}" for e in elements]
            before = "".join(p + ", " for p in pairs) + f"{rng.choice(_KEYS)}: "
        else:
            before = "".join(e + ", " for e in elements)
            if rng.random() < 0.2:
                before += f"{_closed(rng)}{rng.choice(_OPS)}"
    if bracket == "(":
        head = rng.choice(_FUNCS) if rng.random() < 0.7 else ""
    elif bracket == "[":
        head = rng.choice(_NAMES) if rng.random() < 0.4 else ""
    else:
        head = ""
    return f"{before}{head}{bracket}"


def code_prefix(rng: random.Random, depth: int) -> str:
    """A code-like prefix with exactly ``depth`` brackets left open."""
    text, inside = "", None
    if rng.random() < 0.4:
        text = rng.choice([f"{rng.choice(_NAMES)} = ", "return ", "if ", "yield ", f"assert {rng.choice(_NAMES)} == "])
    for _ in range(depth):
        bracket = rng.choice(list(PAIRS))
        text += _code_opener(rng, bracket, inside)
        inside = bracket
    tail = rng.random()
    if tail < 0.65:  # else the prefix ends right at an opener
        text += f"{rng.choice(_KEYS)}: {_closed(rng)}" if inside == "{" else _closed(rng)
        text += ", " if tail < 0.15 else ""
    return text


def _balanced(rng: random.Random, depth: int) -> str:
    """A short balanced bracket string with at most ``depth`` levels."""
    if depth == 0 or rng.random() < 0.35:
        return ""
    opener = rng.choice(list(PAIRS))
    return opener + _balanced(rng, depth - 1) + PAIRS[opener] + _balanced(rng, depth - 1)


def pure_prefix(rng: random.Random, depth: int) -> str:
    """Only brackets: ``depth`` left open, with closed groups between them."""
    text = ""
    for _ in range(depth):
        if rng.random() < 0.4:
            text += _balanced(rng, 2)
        text += rng.choice(list(PAIRS))
    if rng.random() < 0.4:
        text += _balanced(rng, 2)
    return text


_QUESTIONS = (
    "Close all open brackets of this text, innermost first. Reply with the closing brackets only.\n\n{}",
    "What exact sequence of closing brackets completes the following?\n\n{}",
    "Write only the brackets needed to close everything that is still open here:\n\n{}",
)


# --------------------------------------------------------------------------- the task

class BracketsTask(Task):
    """Close every open bracket; the answer is the closers alone, innermost first."""

    name = "brackets"

    def sample(self, rng: random.Random) -> Problem:
        depth = rng.randint(1, MAX_DEPTH)
        prefix = code_prefix(rng, depth) if rng.random() < 0.65 else pure_prefix(rng, depth)
        question = rng.choice(_QUESTIONS).format(prefix)
        return Problem(prefix, prefix, question, closing_sequence(prefix))

    def key(self, conversation: list[dict]) -> str:
        return prefix_of(last_user_text(conversation))

    def score(self, conversation: list[dict], reply: str) -> float:
        got = "".join(final_text(reply).split())
        return float(got == reference_final_text(conversation))


def prefix_of(question: str) -> str:
    """The prefix in a generated question: everything after its first blank line."""
    return question.split("\n\n", 1)[1]
