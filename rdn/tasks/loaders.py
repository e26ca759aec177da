"""Conversations from local files, never the network: JSONL, and parquet copies of public sets.

``validate_conversation`` is the one conversation validator of the project, re-exported
from :mod:`rdn.tokenizer.chat` (which renders what it accepts), so a conversation that
loads here always renders. It raises a ``ValueError`` whose text starts ``message N: ``.

Parquet layouts (the usual public column names; extra columns are ignored):

- ``gsm8k``: ``question``, ``answer`` (worked solution ending ``#### N``). GSM8K's
  ``<<48/2=24>>`` annotations become calculator calls: a ``python`` part and a
  ``python_output`` part holding ``calculator(expr)``; the rest stays text, the
  ``#### N`` line included. Scored by :func:`score_gsm8k`.
- ``mmlu``: ``question``, ``choices`` (list), ``answer`` (int index) -> lettered
  choices A, B, ...; the reference answer is the letter.
- ``arc``: ``question``, ``choices`` ({``text``: list, ``label``: list}), ``answerKey``
  (one of the labels) -> lettered choices as for mmlu.
- ``smoltalk``: ``messages`` (list of {``role``, ``content``}) -> the conversation.

Every loaded conversation ends with an assistant message (it is training data).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rdn.tasks.base import final_text, last_number, numbers_in, reference_final_text, same_number
from rdn.tokenizer.chat import validate_conversation
from rdn.inference.tools import calculator

PARQUET_COLUMNS = {"gsm8k": ("question", "answer"), "mmlu": ("question", "choices", "answer"),
                   "arc": ("question", "choices", "answerKey"), "smoltalk": ("messages",)}
LETTERS = "ABCDEFGHIJ"


def _check_training_conversation(conv) -> None:
    validate_conversation(conv)
    if conv[-1]["role"] != "assistant":
        raise ValueError(f"message {len(conv) - 1}: the last message must be the assistant's answer "
                         f"(got {conv[-1]['role']!r})")


# --------------------------------------------------------------------------- JSONL

def load_jsonl_conversations(path: str | Path) -> list[list[dict]]:
    """One conversation per non-blank line: a JSON list of messages, or an object with
    ``messages``. Errors are ValueErrors naming ``path:line`` (and the message index)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: conversations file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if isinstance(obj, dict):
                if "messages" not in obj:
                    raise ValueError(f"{path}:{lineno}: an object line needs a 'messages' key "
                                     f"(got keys {sorted(obj)})")
                obj = obj["messages"]
            try:
                _check_training_conversation(obj)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            out.append(obj)
    if not out:
        raise ValueError(f"{path}: no conversations in the file")
    return out


# --------------------------------------------------------------------------- parquet

_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def gsm8k_parts(solution: str) -> list[dict] | str:
    """A GSM8K worked solution as assistant content, ``<<expr=value>>`` turned into tool calls."""
    parts: list[dict] = []
    pos = 0
    for m in _ANNOTATION.finditer(solution):
        if m.start() > pos:
            parts.append({"type": "text", "text": solution[pos:m.start()]})
        pos = m.end()
        expr = m.group(1).split("=", 1)[0].strip()
        output = calculator(expr)
        if expr and not output.startswith("error"):
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": output}]
    if pos < len(solution):
        parts.append({"type": "text", "text": solution[pos:]})
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _gsm8k_answer(text: str) -> float | None:
    """The first number after the last ``####`` if there is one, else the last number."""
    if "####" in text:
        found = numbers_in(text.rsplit("####", 1)[1])
        return found[0] if found else None
    return last_number(text)


def score_gsm8k(conversation: list[dict], reply: str) -> float:
    """1.0 iff the reply's final answer (after ``####``, else its last number, in the text after
    the last tool block) equals the reference's ``#### N``."""
    truth = _gsm8k_answer(reference_final_text(conversation))
    if truth is None:
        raise ValueError("the reference answer has no final number")
    return float(same_number(_gsm8k_answer(final_text(reply)), truth))


def _multiple_choice(question: str, choices: list, answer: str) -> list[dict]:
    listing = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    prompt = f"{question}\n\n{listing}\n\nAnswer with the letter of the correct choice."
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _row_conversation(kind: str, row: dict) -> list[dict]:
    if kind == "gsm8k":
        answer = row["answer"]
        if not isinstance(answer, str) or "####" not in answer:
            raise ValueError(f"column 'answer': a worked solution ending '#### N' is expected (got {answer!r:.60})")
        return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": gsm8k_parts(answer)}]
    if kind == "mmlu":
        choices, index = list(row["choices"] or []), row["answer"]
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"column 'choices': 2 to {len(LETTERS)} choices expected (got {len(choices)})")
        if not isinstance(index, int) or not 0 <= index < len(choices):
            raise ValueError(f"column 'answer': an index into the {len(choices)} choices expected (got {index!r})")
        return _multiple_choice(row["question"], choices, LETTERS[index])
    if kind == "arc":
        choices = row["choices"] or {}
        texts, labels = list(choices.get("text") or []), list(choices.get("label") or [])
        if len(texts) != len(labels) or not 2 <= len(texts) <= len(LETTERS):
            raise ValueError(f"column 'choices': matching 'text' and 'label' lists of 2 to {len(LETTERS)} "
                             f"expected (got {len(texts)} texts, {len(labels)} labels)")
        if row["answerKey"] not in labels:
            raise ValueError(f"column 'answerKey': one of the labels {labels} expected (got {row['answerKey']!r})")
        return _multiple_choice(row["question"], texts, LETTERS[labels.index(row["answerKey"])])
    messages = row["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"column 'messages': a list of {{role, content}} expected (got {type(messages).__name__})")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]


def load_parquet_task(path: str | Path, kind: str) -> list[list[dict]]:
    """Conversations from a local parquet file of a public set (``kind``: gsm8k, mmlu, arc,
    smoltalk). Errors are ValueErrors naming the path, and the column or row."""
    path = Path(path)
    if kind not in PARQUET_COLUMNS:
        raise ValueError(f"unknown parquet task kind {kind!r}; known: {', '.join(PARQUET_COLUMNS)}")
    if not path.is_file():
        raise ValueError(f"{path}: parquet file not found")
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    needed = PARQUET_COLUMNS[kind]
    missing = [c for c in needed if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column {missing[0]!r}; a {kind} file needs columns "
                         f"{', '.join(needed)} (found {', '.join(names) or 'none'})")
    out = []
    for i, row in enumerate(pq.read_table(path, columns=list(needed)).to_pylist()):
        try:
            conv = _row_conversation(kind, row)
            _check_training_conversation(conv)
        except ValueError as e:
            raise ValueError(f"{path}: row {i}: {e}") from None
        out.append(conv)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


__all__ = ["PARQUET_COLUMNS", "gsm8k_parts", "load_jsonl_conversations", "load_parquet_task", "score_gsm8k",
           "validate_conversation"]
