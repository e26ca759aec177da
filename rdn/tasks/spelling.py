"""Spelling (SpellingBee-like): count a letter in a word, or spell a word with dashes.

Words come from ``words.txt`` beside this module (about 3,000 common English words,
written for this project; nothing is downloaded). A count question asks about a letter
of the word most of the time and about an absent letter (answer 0) otherwise.

Reference answers: the count as bare digits (``"3"``), or the letters joined by dashes
(``"a-p-p-l-e"``). The score is exact: the final text with all whitespace removed and
at most one trailing period dropped must equal the reference (case-sensitive).

Split key: the word, so test words are never seen in training, in either kind of question.
"""

from __future__ import annotations

import functools
import random
import re
import string
from pathlib import Path

from rdn.tasks.base import Problem, Task, final_text, last_user_text, reference_final_text

WORDS_FILE = Path(__file__).with_name("words.txt")
ABSENT_LETTER_RATE = 0.15

_COUNT_QUESTIONS = (
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the letter '{letter}' in the word '{word}'. Answer with a number.",
    "In the word '{word}', how many times does the letter '{letter}' occur?",
)
_SPELL_QUESTIONS = (
    "Spell '{word}' with dashes.",
    "Spell the word '{word}' letter by letter, separated by dashes.",
    "Write '{word}' with a dash between each letter.",
)
_QUOTED_WORD = re.compile(r"'([a-z]+)'")


@functools.lru_cache(maxsize=1)
def load_words() -> tuple[str, ...]:
    """The word list (lowercase a-z); '#' lines are comments."""
    words = []
    for lineno, line in enumerate(WORDS_FILE.read_text(encoding="utf-8").splitlines(), start=1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"{WORDS_FILE}:{lineno}: not a lowercase a-z word: {word!r}")
        words.append(word)
    return tuple(dict.fromkeys(words))


def _normalize(text: str) -> str:
    text = "".join(text.split())
    return text[:-1] if text.endswith(".") else text


class SpellingTask(Task):
    """Letter counts and dash spellings, scored exactly."""

    name = "spelling"

    def sample(self, rng: random.Random) -> Problem:
        word = rng.choice(load_words())
        if rng.random() < 0.5:
            question = rng.choice(_SPELL_QUESTIONS).format(word=word)
            return Problem(word, f"spell:{word}", question, "-".join(word))
        if rng.random() < ABSENT_LETTER_RATE:
            letter = rng.choice(sorted(set(string.ascii_lowercase) - set(word)))
        else:
            letter = rng.choice(word)  # by occurrence: repeated letters are asked about more often
        question = rng.choice(_COUNT_QUESTIONS).format(letter=letter, word=word)
        return Problem(word, f"count:{word}:{letter}", question, str(word.count(letter)))

    def key(self, conversation: list[dict]) -> str:
        words = [w for w in _QUOTED_WORD.findall(last_user_text(conversation)) if len(w) > 1]
        if not words:
            raise ValueError("no quoted word in the spelling question")
        return words[0]

    def score(self, conversation: list[dict], reply: str) -> float:
        return float(_normalize(final_text(reply)) == reference_final_text(conversation))
