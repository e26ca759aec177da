"""User data without network: JSONL conversations and local parquet copies of public sets."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from rdn.tokenizer.chat import ConversationError, validate_conversation


def load_jsonl_conversations(path: str | Path) -> list[list[dict]]:
    """One conversation per line: a JSON list of messages, or an object with ``messages``.
    Errors name ``path:line`` and the message index."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: conversations file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            conv = obj.get("messages") if isinstance(obj, dict) else obj
            try:
                validate_conversation(conv)
            except ConversationError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            out.append(conv)
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


_COLUMNS = {"gsm8k": ("question", "answer"), "mmlu": ("question", "choices", "answer"),
            "arc": ("question", "choices", "answerKey"), "smoltalk": ("messages",)}


def load_parquet_task(path: str | Path, kind: str) -> list[list[dict]]:
    """Conversations from a local parquet file of a public set in its usual column layout."""
    path = Path(path)
    if kind not in _COLUMNS:
        raise ValueError(f"unknown parquet task kind {kind!r}; known: {', '.join(_COLUMNS)}")
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise ValueError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
    for col in _COLUMNS[kind]:
        if col not in table.column_names:
            raise ValueError(f"{path}: no column {col!r} (a {kind} file needs {list(_COLUMNS[kind])})")
    rows = table.to_pylist()
    letters = "ABCDEFGHIJ"
    out = []
    for row in rows:
        if kind == "gsm8k":
            final = row["answer"].rsplit("####", 1)[-1].strip()
            out.append([{"role": "user", "content": row["question"]},
                        {"role": "assistant", "content": row["answer"], "truth": final}])
        elif kind in ("mmlu", "arc"):
            if kind == "mmlu":
                choices, answer = list(row["choices"]), letters[int(row["answer"])]
            else:
                choices, answer = list(row["choices"]["text"]), str(row["answerKey"])
                labels = list(row["choices"]["label"])
                answer = letters[labels.index(answer)] if answer in labels else answer
            listing = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
            out.append([{"role": "user", "content": f"{row['question']}\n{listing}\nAnswer with the letter."},
                        {"role": "assistant", "content": answer, "truth": answer}])
        else:
            out.append([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
    return out
