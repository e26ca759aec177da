"""The task protocol shared by every family."""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

SPECIAL = re.compile(r"<\|[a-z_]+\|>")
TEST_BUCKETS = 10  # one key in ten belongs to the test split


def final_text(reply: str) -> str:
    """The model's own final answer text: after the last tool output, specials removed."""
    if "<|output_end|>" in reply:
        reply = reply.rsplit("<|output_end|>", 1)[1]
    return SPECIAL.sub("", reply).strip()


def split_of(key: str) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % TEST_BUCKETS == 0 else "train"


class Task:
    """A family of problems. Subclasses implement ``_problem(rng) -> (key, question, answer_content, truth)``."""

    name = "task"

    def _problem(self, rng: random.Random) -> tuple[str, str, Any, Any]:
        raise NotImplementedError

    def generate(self, n: int, seed: int, split: str = "train") -> list[list[dict]]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        rng = random.Random(f"{self.name}-{seed}-{split}")
        out, seen, tries = [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"{self.name}: cannot generate {n} distinct {split} problems")
            key, question, answer, truth = self._problem(rng)
            if split_of(f"{self.name}:{key}") != split or key in seen:
                continue
            seen.add(key)
            out.append([{"role": "user", "content": question},
                        {"role": "assistant", "content": answer, "truth": truth, "key": key}])
        return out

    def prompt(self, conversation: list[dict]) -> list[dict]:
        return conversation[:-1] if conversation and conversation[-1]["role"] == "assistant" else conversation

    def truth(self, conversation: list[dict]) -> Any:
        return conversation[-1]["truth"]

    def score(self, conversation: list[dict], reply: str) -> float:
        raise NotImplementedError
