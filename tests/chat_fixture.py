"""A tiny chat model that really answers 16 calculator prompts, for the serving tests.

A 2-layer RDN model is trained (a few seconds on one thread) until it has memorised 16
short calculator conversations: question -> ``<|python_start|>EXPR<|python_end|>`` -> the
tool's output -> ``The answer is N.``. Loss is on the assistant's own tokens only, as in SFT;
the tool's output is never supervised, so a correct final number needs the server to run the
calculator and feed its result back. Saved as the ``rl`` and ``sft`` checkpoints of a project
folder laid out as ``make run`` leaves it (``artifacts/tokenizer``, ``artifacts/checkpoints/<stage>``),
next to an untrained ``base`` checkpoint of the same shape.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import torch

from rdn.inference.tools import calculator
from rdn.tasks.calculator import ANSWER_PHRASE

BRACKETS = ["()", "[]", "{}", "<>"]


def calculator_conversations(n: int = 16, seed: int = 0) -> list[list[dict]]:
    """``n`` short question/answer pairs with one calculator call each (distinct questions)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        a, b = rng.randint(10, 999), rng.randint(2, 99)
        op, word = rng.choice([("+", "plus"), ("-", "minus"), ("*", "times")])
        question = f"What is {a} {word} {b}?"
        if question in seen:
            continue
        seen.add(question)
        expr = f"{a}{op}{b}"
        value = calculator(expr)
        out.append([{"role": "user", "content": question},
                    {"role": "assistant", "content": [{"type": "python", "text": expr},
                                                      {"type": "python_output", "text": value},
                                                      {"type": "text", "text": ANSWER_PHRASE.format(value)}]}])
    return out


def build_chat_project(root: Path, tokenizer_dir: Path, steps: int = 400) -> tuple[Path, list[list[dict]]]:
    """``root`` with ``artifacts/tokenizer``, trained ``rl`` and ``sft`` and untrained ``base`` checkpoints; returns
    (root, the conversations it learned)."""
    from rdn.checkpoint import save_checkpoint
    from rdn.coords import CoordinateCalculator
    from rdn.model import GPT, GPTConfig
    from rdn.tokenizer import Tokenizer
    from rdn.tokenizer.chat import render_conversation

    tok = Tokenizer.load(tokenizer_dir)
    convs = calculator_conversations()
    rows = [render_conversation(tok, c) for c in convs]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), tok.bos_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        y = [t if keep else -1 for t, keep in zip(x[1:], m[1:])]
        targets[i, :len(y)] = torch.tensor(y)

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, head_dim=32,
                       use_coordinates=True, n_coord_dim=4)
    model = GPT(config)
    model.init_weights()
    calc = CoordinateCalculator.from_tokenizer(tok, n_dim=4, bracket_pairs=BRACKETS)
    coords = calc(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        loss = model(ids, targets=targets, coords=coords)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 2e-3:
            break
    model.eval()
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_sha256": tok.hash,
            "coords": {"n_dim": 4, "bracket_pairs": BRACKETS}}
    art = root / "artifacts"
    shutil.copytree(tokenizer_dir, art / "tokenizer", dirs_exist_ok=True)
    for stage in ("rl", "sft"):
        save_checkpoint(art / "checkpoints" / stage, step + 1, model, None, {}, None, meta)
    # "base": the same architecture untrained -- it rambles on without a stop token, which the
    # tests of limits and cancellation need
    torch.manual_seed(1)
    untrained = GPT(config)
    untrained.init_weights()
    save_checkpoint(art / "checkpoints" / "base", 1, untrained, None, {}, None, meta)
    return root, convs
