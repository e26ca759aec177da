"""``rdn chat``: talk to the newest checkpoint of a stage, one-shot (``-p``) or interactively.

Tokens are streamed to stdout as the model produces them; a calculator call shows up as a dim
``[calc 17+25 = 42]`` instead of its raw special tokens. The interactive loop keeps the whole
conversation (as the chat format of :mod:`rdn.tokenizer.chat`) and drops the oldest exchanges
when the prompt would no longer fit the model's decoding length. ``/clear`` starts over,
``/quit`` or Ctrl-D leaves; Ctrl-C abandons the reply being written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


from rdn.inference.engine import Engine
from rdn.inference.load import EngineLoadError, load_engine  # noqa: F401  (load_engine: part of this CLI's API)
from rdn.inference.reply import ReplyText
from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import parse_assistant_tokens, render_for_completion


class ChatError(ValueError):
    """A message that cannot be answered; printed as one line."""


# --------------------------------------------------------------------------- streaming display

class StreamPrinter:
    """Writes streamed tokens as text (:class:`~rdn.inference.reply.ReplyText`): plain text as it
    comes, a tool call as one dim ``[calc EXPR = VALUE]``, stop tokens not at all."""

    def __init__(self, tok: Tokenizer, out: TextIO):
        self.out = out
        self.color = out.isatty()
        self.text = ReplyText(tok)

    def _write(self, pieces: list[tuple[str, str]]) -> None:
        for kind, text in pieces:
            self.out.write(f"\033[2m{text}\033[0m" if kind == "tool" and self.color else text)
        self.out.flush()

    def feed(self, token: int, forced: bool) -> None:
        self._write(self.text.feed(token))

    def close(self) -> None:
        """Flush what is pending (a reply cut off by max_new_tokens mid-call or mid-character)."""
        self._write(self.text.close() + [("text", "\n")])


# --------------------------------------------------------------------------- the conversation loop

def reply(engine: Engine, conv: list[dict], out: TextIO, temperature: float, top_k: int | None,
          max_new_tokens: int, seed: int) -> list[int]:
    """Stream the assistant's answer to ``conv`` (ending with a user message) to ``out``; returns
    its tokens. Oldest exchanges are dropped from ``conv`` (in place) until the prompt fits."""
    while True:
        prompt = render_for_completion(engine.tok, conv)
        if len(prompt) + max_new_tokens <= engine.max_len or len(conv) < 3:
            break
        del conv[:2]
    if len(prompt) + max_new_tokens > engine.max_len:
        raise ChatError(f"message too long: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                        f"the model's {engine.max_len}")
    printer = StreamPrinter(engine.tok, out)
    tokens: list[int] = []
    try:
        for token, forced in engine.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_k=top_k, seed=seed):
            tokens.append(token)
            printer.feed(token, forced)
    finally:
        printer.close()
    return tokens


def _remember(engine: Engine, conv: list[dict], tokens: list[int]) -> None:
    parts = parse_assistant_tokens(engine.tok, tokens)
    if not parts:  # an empty reply cannot be a message: forget the question too
        conv.pop()
        return
    only_text = len(parts) == 1 and parts[0]["type"] == "text"
    conv.append({"role": "assistant", "content": parts[0]["text"] if only_text else parts})


def chat_main(checkpoint_dir: Path, tokenizer_dir: Path, prompt: str | None, temperature: float,
              top_k: int | None, max_new_tokens: int, device: str) -> int:
    """Entry point of ``rdn chat``; returns the exit status (1 on a checkpoint/tokenizer problem)."""
    try:
        engine, about = load_engine(Path(checkpoint_dir), Path(tokenizer_dir), device)
        if prompt is not None:
            reply(engine, [{"role": "user", "content": prompt}], sys.stdout, temperature, top_k, max_new_tokens, 0)
            return 0
    except (ChatError, EngineLoadError) as e:
        print(f"rdn chat: {e}", file=sys.stderr)
        return 1

    print(f"rdn chat: {about}\n/clear starts over, /quit or Ctrl-D leaves.", file=sys.stderr)
    conv: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if text in ("/quit", "/exit"):
            return 0
        if text == "/clear":
            conv.clear()
            continue
        if not text:
            continue
        conv.append({"role": "user", "content": text})
        try:
            tokens = reply(engine, conv, sys.stdout, temperature, top_k, max_new_tokens, seed=turn)
        except KeyboardInterrupt:
            conv.pop()
            print("(interrupted)", file=sys.stderr)
            continue
        except ChatError as e:
            conv.pop()
            print(f"rdn chat: {e}", file=sys.stderr)
            continue
        _remember(engine, conv, tokens)
        turn += 1
