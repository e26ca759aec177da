"""The task protocol shared by every family: generation with disjoint splits, prompts,
and reading the model's final answer out of a raw decoded assistant turn.

Split membership is a property of the problem, not of the call: a problem belongs to
``test`` when ``sha256(f"{task}:{key}") % 10 == 0`` for its canonical key, and
``generate`` draws candidates and rejects those of the other split (and repeats), so no
seed can ever put the same problem in both splits. A key may group several problems
that must share a split (a tic-tac-toe board and its rotations, every question about
one spelling word, the same arithmetic in different stories). Within one call problems
are distinct by their identity (the board, the word and letter, the expression), so
two phrasings of one problem never both appear.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import NamedTuple

from rdn.config import SPECIAL_TOKENS

TEST_BUCKETS = 10  # one key in ten belongs to the test split
SPLITS = ("train", "test")
MAX_STALE_DRAWS = 20_000  # draws in a row without a new problem before a family counts as exhausted


class Problem(NamedTuple):
    """One generated problem: its split key, its identity, the question, the reference answer content."""

    key: str
    ident: str
    question: str
    answer: str | list[dict]


def split_of(task: str, key: str) -> str:
    """``test`` for one canonical key in ten (by SHA-256, so stable across runs and machines)."""
    digest = hashlib.sha256(f"{task}:{key}".encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


# --------------------------------------------------------------------------- reading replies

_SPECIAL = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_TURN_END = ("<|assistant_end|>", "<|bos|>")


def final_text(reply: str) -> str:
    """The model's own last words: the text after its last tool block, specials removed, stripped.

    ``reply`` is a raw decoded assistant turn. It ends at the first ``<|assistant_end|>``
    (or ``<|bos|>``); a ``<|python_start|>``..``<|python_end|>`` call and an
    ``<|output_start|>``..``<|output_end|>`` result are tool blocks, so the tool's output
    (and an unterminated block) never counts as the answer. Stray closing tokens are dropped."""
    closers = {"<|python_start|>": "<|python_end|>", "<|output_start|>": "<|output_end|>"}
    tail: list[str] = []
    inside: str | None = None  # the closer we wait for while inside a tool block
    for piece in _SPECIAL.split(reply):
        if piece in _TURN_END:
            break
        if piece in closers:
            inside, tail = closers[piece], []
        elif inside is not None:
            if piece == inside:
                inside = None
        elif piece not in SPECIAL_TOKENS:
            tail.append(piece)
    return "".join(tail).strip() if inside is None else ""


_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def numbers_in(text: str) -> list[float]:
    """The numbers written in ``text``, in order ("1,234" and "1234" alike; "-5"; "2.5")."""
    return [float(x.replace(",", "")) for x in _NUMBER.findall(text)]


def last_number(text: str) -> float | None:
    found = numbers_in(text)
    return found[-1] if found else None


def same_number(got: float | None, truth: float) -> bool:
    """Numeric equality, 1e-6 relative for non-integers; integers must match exactly
    (a relative tolerance would accept 1000001 for 1000000)."""
    if got is None or not math.isfinite(got):
        return False
    if float(truth).is_integer():
        return got == truth
    return abs(got - truth) <= 1e-6 * abs(truth)


def assistant_parts(message: dict) -> list[dict]:
    """An assistant message's content as a list of parts (a plain string is one text part)."""
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def reference_final_text(conversation: list[dict]) -> str:
    """The final text of the conversation's reference answer (its last assistant message)."""
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("a conversation to score must end with the reference assistant answer")
    parts = assistant_parts(conversation[-1])
    tail = []
    for part in parts:
        tail = [] if part["type"] != "text" else tail + [part["text"]]
    return "".join(tail).strip()


def last_user_text(conversation: list[dict]) -> str:
    """The content of the conversation's last user message (the question)."""
    for message in reversed(conversation):
        if message.get("role") == "user":
            return message["content"]
    raise ValueError("the conversation has no user message")


# --------------------------------------------------------------------------- the protocol

class Task:
    """A family of generated problems with verifiable answers.

    Subclasses set ``name`` and implement ``sample(rng) -> Problem``, ``key(conversation)``
    (the canonical key recomputed from a conversation; equals the generated ``Problem.key``)
    and ``score``."""

    name: str = "task"

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def key(self, conversation: list[dict]) -> str:
        raise NotImplementedError

    def score(self, conversation: list[dict], reply: str) -> float:
        """Reward in [0, 1] of a raw decoded assistant turn ``reply``; 1.0 means correct."""
        raise NotImplementedError

    def generate(self, n: int, seed: int, split: str = "train") -> list[list[dict]]:
        """``n`` distinct complete conversations (user question, reference assistant answer)
        of ``split``; the same (n, seed, split) always gives the same list, and a longer
        request extends a shorter one."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
        if n < 0:
            raise ValueError(f"n must be >= 0 (got {n})")
        rng = random.Random(f"{self.name}:{seed}:{split}")
        out: list[list[dict]] = []
        seen: set[str] = set()
        stale = 0
        while len(out) < n:
            problem = self.sample(rng)
            if problem.ident in seen or split_of(self.name, problem.key) != split:
                stale += 1
                if stale == MAX_STALE_DRAWS:
                    raise ValueError(f"{self.name}: found only {len(out)} distinct {split} problems of the {n} "
                                     f"requested; this family has too few problems for that many")
                continue
            stale = 0
            seen.add(problem.ident)
            out.append([{"role": "user", "content": problem.question},
                        {"role": "assistant", "content": problem.answer}])
        return out

    def prompt(self, conversation: list[dict]) -> list[dict]:
        """The conversation without its final assistant message (what the model is asked)."""
        if not conversation or conversation[-1].get("role") != "assistant":
            raise ValueError("prompt() needs a complete conversation ending with the assistant's answer")
        return conversation[:-1]

