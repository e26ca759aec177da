"""Generated assistant tokens as the text a person reads, piece by piece.

Both ``rdn chat`` (a terminal) and ``rdn serve-chat`` (HTTP) show a reply while it is being
generated. :class:`ReplyText` turns the token stream into pieces of readable text:

* plain text as soon as it is complete UTF-8 (a character split across tokens is held back
  until its last byte arrives);
* a calculator call (``<|python_start|>EXPR<|python_end|><|output_start|>VALUE<|output_end|>``)
  as one piece ``[calc EXPR = VALUE]`` of kind ``"tool"``, once its output is known;
* special tokens (``<|assistant_end|>``, a stray block end) not at all.

:func:`tool_calls_to_parts` is the inverse used on the way in: an assistant message of an
earlier turn, sent back by a client as plain text, gets its ``[calc EXPR = VALUE]`` pieces
turned into the ``python``/``python_output`` parts the model was trained on.
"""

from __future__ import annotations

import codecs
import re

TOOL_CALL = re.compile(r"\[calc (?P<expr>[^\]=]*?) = (?P<value>[^\]]*)\]")


class ReplyText:
    """Feed tokens with :meth:`feed`; each call returns the pieces ``[(kind, text), ...]``
    ("text" or "tool") that became readable. :meth:`close` returns what is still pending."""

    def __init__(self, tok):
        self.tok = tok
        sid = tok.special_id
        self.ids = {name: sid(f"<|{name}|>") for name in
                    ("python_start", "python_end", "output_start", "output_end")}
        self.special = set(tok.special_ids.values())
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.block: str | None = None  # None, "python" or "output"
        self.expr: list[int] = []
        self.value: list[int] = []

    def feed(self, token: int) -> list[tuple[str, str]]:
        ids = self.ids
        if token == ids["python_start"]:
            self.block, self.expr = "python", []
        elif token == ids["python_end"] and self.block == "python":
            self.block = None
        elif token == ids["output_start"]:
            self.block, self.value = "output", []
        elif token == ids["output_end"] and self.block == "output":
            self.block = None
            return [("tool", f"[calc {self.tok.decode(self.expr).strip()} = {self.tok.decode(self.value).strip()}]")]
        elif self.block == "python":
            self.expr.append(token)
        elif self.block == "output":
            self.value.append(token)
        elif token not in self.special:
            text = self.utf8.decode(self.tok.id_bytes(token))
            return [("text", text)] if text else []
        return []

    def close(self) -> list[tuple[str, str]]:
        """What is pending when the reply ends: an unfinished call (``[calc EXPR ...]``), a
        cut-off character (U+FFFD)."""
        out = []
        if self.block == "python":
            out.append(("tool", f"[calc {self.tok.decode(self.expr).strip()} ...]"))
        tail = self.utf8.decode(b"", final=True)
        if tail:
            out.append(("text", tail))
        return out


def tool_calls_to_parts(text: str) -> str | list[dict]:
    """An assistant message's text with each ``[calc EXPR = VALUE]`` made a ``python`` and a
    ``python_output`` part (:mod:`rdn.tokenizer.chat`); the text itself when it has none."""
    parts: list[dict] = []
    at = 0
    for m in TOOL_CALL.finditer(text):
        if m.start() > at:
            parts.append({"type": "text", "text": text[at:m.start()]})
        parts.append({"type": "python", "text": m.group("expr")})
        parts.append({"type": "python_output", "text": m.group("value")})
        at = m.end()
    if not parts:
        return text
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts
