"""Chat conversations as token ids: validation, rendering with a loss mask, completion prompts.

A conversation is a ``list[dict]`` of messages ``{"role": ..., "content": ...}``: an optional
``system`` message first, then ``user`` and ``assistant`` alternating, starting with ``user``.
User and system content is a non-empty string; assistant content is a non-empty string or a
non-empty list of parts ``{"type": "text" | "python" | "python_output", "text": str}``
(a ``python_output`` part must directly follow a ``python`` part). Other keys of a message are
ignored. The rendered format is nanochat's::

    <|bos|><|user_start|>USER<|user_end|><|assistant_start|>TEXT<|python_start|>EXPR<|python_end|>
    <|output_start|>VALUE<|output_end|>TEXT<|assistant_end|><|user_start|>...

A system message has no tokens of its own: its text is merged into the first user message
(``system + "\\n\\n" + user``), as nanochat does, so a model needs no extra special tokens.

Loss mask (1 = the model is trained to produce the token): the assistant's text, its tool calls
(``<|python_start|>`` EXPR ``<|python_end|>``) and ``<|assistant_end|>`` (so it learns to stop).
Everything else is 0: BOS, user turns, ``<|assistant_start|>`` (the prompt puts it there at
inference time, see :func:`render_for_completion`, so it is never sampled) and the tool's output
``<|output_start|>`` VALUE ``<|output_end|>`` (the engine forces it; the model never writes it).

Text is always encoded as ordinary text: a message containing ``"<|assistant_end|>"`` yields the
ids of ``<``, ``|``, ``assistant``... and never the special id (see :mod:`rdn.tokenizer.bpe`).
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


class ConversationError(ValueError):
    """A conversation that breaks the format; the message names the offending message index."""


# --------------------------------------------------------------------------- validation

def _check_text(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise ConversationError(f"{where}: content must be a string (got {type(value).__name__})")
    if not value:
        raise ConversationError(f"{where}: content is empty")


def _check_parts(parts: list, where: str) -> None:
    if not parts:
        raise ConversationError(f"{where}: content is an empty list of parts")
    for j, part in enumerate(parts):
        at = f"{where}: part {j}"
        if not isinstance(part, dict):
            raise ConversationError(f"{at}: must be a dict with 'type' and 'text' (got {type(part).__name__})")
        kind = part.get("type")
        if kind not in PART_TYPES:
            raise ConversationError(f"{at}: unknown type {kind!r} (expected one of {', '.join(PART_TYPES)})")
        if kind == "python_output" and (j == 0 or parts[j - 1].get("type") != "python"):
            raise ConversationError(f"{at}: a python_output part must directly follow a python part")
        _check_text(part.get("text"), at)


def validate_conversation(conv: Any) -> None:
    """Raise :class:`ConversationError` naming the first offending message ("message 2: ...")."""
    if not isinstance(conv, list) or not conv:
        raise ConversationError(f"a conversation must be a non-empty list of messages (got {conv!r:.80})")
    start = 0
    for i, msg in enumerate(conv):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise ConversationError(f"{where}: must be a dict with 'role' and 'content' (got {type(msg).__name__})")
        role = msg.get("role")
        if role not in ROLES:
            raise ConversationError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in msg:
            raise ConversationError(f"{where}: has no 'content'")
        if role == "system":
            if i != 0:
                raise ConversationError(f"{where}: a system message may only come first")
            start = 1
        else:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise ConversationError(f"{where}: expected role {expected!r} here (got {role!r}); "
                                        "after an optional system message, user and assistant alternate, user first")
        content = msg["content"]
        if role == "assistant" and isinstance(content, list):
            _check_parts(content, where)
        else:
            _check_text(content, where)
    if len(conv) == start:
        raise ConversationError("message 0: a system message must be followed by a user message")


# --------------------------------------------------------------------------- rendering

def _merge_system(conv: list[dict]) -> list[dict]:
    """The conversation with a leading system message folded into the first user message."""
    if conv[0]["role"] != "system":
        return conv
    first = conv[1]
    merged = {"role": "user", "content": conv[0]["content"] + "\n\n" + first["content"]}
    return [merged, *conv[2:]]


def render_conversation(tok, conv: list[dict], max_tokens: int | None = None,
                        stats: dict | None = None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (equal length) of a whole conversation, starting with BOS.

    With ``max_tokens`` both are cut to that length. ``stats`` (if given) counts
    ``stats["conversations"]`` always and ``stats["truncated"]`` when the cut dropped tokens."""
    validate_conversation(conv)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None (got {max_tokens})")
    sid = tok.special_id
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], supervised: int) -> None:
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    add([tok.bos_id], 0)
    for msg in _merge_system(conv):
        content = msg["content"]
        if msg["role"] == "user":
            add([sid("<|user_start|>"), *tok.encode(content), sid("<|user_end|>")], 0)
            continue
        add([sid("<|assistant_start|>")], 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                add(tok.encode(part["text"]), 1)
            elif part["type"] == "python":
                add([sid("<|python_start|>"), *tok.encode(part["text"]), sid("<|python_end|>")], 1)
            else:  # python_output: written by the tool, not the model
                add([sid("<|output_start|>"), *tok.encode(part["text"]), sid("<|output_end|>")], 0)
        add([sid("<|assistant_end|>")], 1)

    if stats is not None:
        stats["conversations"] = stats.get("conversations", 0) + 1
        stats.setdefault("truncated", 0)
    if max_tokens is not None and len(ids) > max_tokens:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if stats is not None:
            stats["truncated"] += 1
    return ids, mask


def render_for_completion(tok, conv: list[dict]) -> list[int]:
    """The prompt that asks for the next assistant turn: the conversation without a final
    assistant message (dropped if present), which must then end with a user message, followed
    by ``<|assistant_start|>``."""
    validate_conversation(conv)
    if conv[-1]["role"] == "assistant":
        conv = conv[:-1]
    if conv[-1]["role"] != "user":  # unreachable for a valid conversation; kept as the contract
        raise ConversationError(f"message {len(conv) - 1}: a completion prompt must end with a user message")
    ids, _ = render_conversation(tok, conv)
    return ids + [tok.special_id("<|assistant_start|>")]


# --------------------------------------------------------------------------- parsing

def parse_assistant_tokens(tok, tokens: list[int]) -> list[dict]:
    """Assistant message parts from generated tokens (the inverse of rendering one assistant turn).

    Reads up to ``<|assistant_end|>`` or ``<|bos|>`` (excluded); ``<|python_start|>``..
    ``<|python_end|>`` becomes a ``python`` part, ``<|output_start|>``..``<|output_end|>`` a
    ``python_output`` part, everything else ``text``. Empty pieces are left out; a block cut off
    by the end of the tokens still becomes its part. Stray block-end tokens are dropped."""
    sid = tok.special_id
    opens = {sid("<|python_start|>"): ("python", sid("<|python_end|>")),
             sid("<|output_start|>"): ("python_output", sid("<|output_end|>"))}
    stops = {sid("<|assistant_end|>"), tok.bos_id}
    closers = {close for _, close in opens.values()}
    parts: list[dict] = []
    kind, close, buf = "text", None, []

    def flush() -> None:
        text = tok.decode(buf)
        if text:
            parts.append({"type": kind, "text": text})
        buf.clear()

    for t in tokens:
        if t in stops:
            break
        if close is None and t in opens:
            flush()
            kind, close = opens[t]
        elif close is not None and t == close:
            flush()
            kind, close = "text", None
        elif close is None and t in closers:
            continue
        else:
            buf.append(t)
    flush()
    return parts
