"""Offline task families with generated problems and verifiable answers.

A task is a :class:`Task` with ``name``, ``generate(n, seed, split="train")`` (complete
conversations: a user question, then the reference assistant answer), ``prompt(conv)``
(the conversation without that answer) and ``score(conv, reply) -> float`` in [0, 1],
where ``reply`` is the raw decoded assistant turn, special-token strings included; the
answer is read from the text after the last tool block (see :func:`final_text`).

Generation is deterministic per (n, seed, split), and the splits are disjoint by a hash
of each problem's canonical key (see :mod:`rdn.tasks.base`). Families:

- ``calculator``: word problems; answer = calculator call, its output, ``The answer is N.``
- ``tictactoe``: optimal move by full minimax; answer ``Play N.``
- ``brackets``: the closers of a nested prefix; answer e.g. ``)}]``
- ``spelling``: letter counts (``3``) and dash spellings (``a-p-p-l-e``)

Local data (JSONL conversations, parquet copies of public sets) is in :mod:`rdn.tasks.loaders`.
The params validate task names against ``rdn.config.TaskName``; adding a family means a
name there and a class here (this module refuses to import while the two differ).
"""

from __future__ import annotations

from rdn.config import TASK_NAMES
from rdn.tasks.base import Task, final_text, split_of
from rdn.tasks.brackets import BracketsTask
from rdn.tasks.calculator import CalculatorTask
from rdn.tasks.spelling import SpellingTask
from rdn.tasks.tictactoe import TicTacToeTask

TASKS: dict[str, Task] = {t.name: t for t in (CalculatorTask(), TicTacToeTask(), BracketsTask(), SpellingTask())}
if tuple(TASKS) != TASK_NAMES:  # the params accept exactly the names in rdn.config.TaskName
    raise ImportError(f"rdn.tasks registers {tuple(TASKS)} but rdn.config.TaskName lists {TASK_NAMES}: "
                      "add or remove the family in both places")


def get_task(name: str) -> Task:
    """The task family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "final_text", "get_task", "split_of"]
