"""Offline task families with generated problems and verifiable answers.

Every family has ``generate(n, seed, split)`` -> complete conversations (the last message
is the reference assistant answer), ``prompt(conv)`` (the conversation without that
answer) and ``score(conv, reply) -> float`` in [0, 1]. Problems are deterministic per
seed, and the train and test splits are disjoint: a problem belongs to ``test`` when a
hash of its canonical key falls in the test bucket, and generation rejects problems of
the other split. ``reply`` is the raw decoded assistant turn, special-token strings
included; scorers read the final answer from the text after the last tool output.
"""

from __future__ import annotations

from rdn.tasks.base import Task, final_text
from rdn.tasks.families import BracketsTask, CalculatorTask, SpellingTask, TicTacToeTask

TASKS: dict[str, Task] = {t.name: t for t in (CalculatorTask(), TicTacToeTask(), BracketsTask(), SpellingTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "final_text", "get_task"]
