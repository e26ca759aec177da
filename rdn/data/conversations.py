"""Rows of rendered conversations for mid-training and SFT, and the text/conversation mixture.

:class:`ConversationRows` packs rendered conversations -- ``(ids, mask)`` pairs, each
starting with BOS -- into rows of ``T + 1`` tokens with the same best-fit rule as the
text loader (largest buffered item that fits goes next):

* ``crop=False`` (SFT): an item never spans rows. When nothing fits, the row is
  **padded** (pad positions have mask 0, so they carry no loss). Items longer than a
  row are truncated once, up front, and counted in ``truncated``; those left without any
  supervised token are dropped and counted in ``unsupervised``.
* ``crop=True`` (mid-training): like pretraining, the row is filled by cropping an item
  and its remainder goes back into the buffer behind a fresh BOS -- no padding.

:class:`MixedRows` draws each row from the text loader with probability
``pretrain_fraction`` (decided by a hash of the row number, so resuming needs no RNG
state), otherwise from the conversations. Both yield ``(rows, mask, state)`` where
``mask[b, t] = 1`` means the token at ``t`` is a training target; the state resumes
exactly, as in :mod:`rdn.data.loader`.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any, Sequence

import torch

from rdn.data.loader import PackedRows

STATE_VERSION = 1


class ConversationRows:
    def __init__(self, items: Sequence[tuple[list[int], list[int]]], batch_size: int, seq_len: int, bos_id: int,
                 crop: bool, seed: int = 0, buffer_items: int = 64, loop: bool = True, state: dict | None = None):
        if not items:
            raise ValueError("no conversations to train on: check the task mixture and conversations_path")
        self.B, self.T, self.bos, self.crop, self.seed, self.loop = batch_size, seq_len, bos_id, crop, seed, loop
        self.buffer_items = buffer_items
        cap = seq_len + 1
        self.truncated = sum(len(ids) > cap for ids, _ in items)
        self.items = [(list(ids), list(mask)) if crop else (list(ids[:cap]), list(mask[:cap])) for ids, mask in items]
        # a conversation truncated before its first supervised token teaches nothing, and a
        # micro-batch of only such rows would have no target at all (a NaN mean loss)
        self.unsupervised = sum(not any(mask) for _, mask in self.items)
        if self.unsupervised:
            self.items = [item for item in self.items if any(item[1])]
            if not self.items:
                raise ValueError(f"none of the {len(items)} conversations has a supervised token within "
                                 f"seq_len + 1 = {cap} tokens: raise seq_len or shorten the prompts")
        for i, (ids, mask) in enumerate(self.items):
            if len(ids) != len(mask) or not ids or ids[0] != bos_id:
                raise ValueError(f"conversation {i}: ids and mask must have equal length and start with BOS")
        self.epoch, self.pos = 0, 0
        self._buffer: list[tuple[int, int, int, int, int]] = []  # (length, serial, item, start, end)
        self._serial = 0
        self.exhausted = False
        if state is not None:
            self._restore(state)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}-conv-{epoch}").shuffle(order)
        return order

    def _add(self, item: int, start: int, end: int) -> None:
        """A piece is tokens[start:end] of an item; start > 0 pieces get a fresh BOS in front."""
        self._serial += 1
        length = end - start + (1 if start > 0 else 0)
        bisect.insort(self._buffer, (length, self._serial, item, start, end))

    def _refill(self) -> None:
        while len(self._buffer) < self.buffer_items and not self.exhausted:
            if self.pos >= len(self.items):
                if not self.loop:
                    self.exhausted = True
                    return
                self.epoch, self.pos = self.epoch + 1, 0
            item = self._order(self.epoch)[self.pos]
            self.pos += 1
            self._add(item, 0, len(self.items[item][0]))

    def row(self) -> tuple[list[int], list[int]] | None:
        cap = self.T + 1
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < cap:
            self._refill()
            if not self._buffer:
                return None
            space = cap - len(ids)
            i = bisect.bisect_right(self._buffer, (space, float("inf"))) - 1
            if i < 0:
                if not self.crop:  # SFT: pad the rest of the row, no loss there
                    ids += [self.bos] * space
                    mask += [0] * space
                    break
                _, _, item, start, end = self._buffer.pop(0)
                head = 1 if start > 0 else 0
                cut = start + space - head
                self._add(item, cut, end)
                end = cut
            else:
                _, _, item, start, end = self._buffer.pop(i)
            src_ids, src_mask = self.items[item]
            if start > 0:
                ids.append(self.bos)
                mask.append(0)
            ids += src_ids[start:end]
            mask += src_mask[start:end]
        return ids, mask

    def __iter__(self):
        return self

    def __next__(self):
        rows = [self.row() for _ in range(self.B)]
        if any(r is None for r in rows):
            raise StopIteration
        return (torch.tensor([r[0] for r in rows], dtype=torch.long),
                torch.tensor([r[1] for r in rows], dtype=torch.bool), self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "n_items": len(self.items), "seq_len": self.T, "seed": self.seed,
                "crop": self.crop, "epoch": self.epoch, "pos": self.pos, "serial": self._serial,
                "buffer": [[s, it, a, b] for _, s, it, a, b in self._buffer]}

    def _restore(self, state: dict) -> None:
        expect = {"version": STATE_VERSION, "n_items": len(self.items), "seq_len": self.T, "seed": self.seed,
                  "crop": self.crop}
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expect.items() if state.get(k) != v]
        if wrong:
            raise ValueError("conversation loader state does not match this run (" + "; ".join(wrong) + ")")
        self.epoch, self.pos, self._serial = state["epoch"], state["pos"], state["serial"]
        self._buffer = sorted((b - a + (1 if a > 0 else 0), s, it, a, b) for s, it, a, b in state["buffer"])


def _from_text(row: list[int]) -> list[int]:
    return [1] * len(row)


class MixedRows:
    """Rows from pretraining text (all tokens supervised) or conversations, chosen per row."""

    def __init__(self, text: PackedRows | None, conversations: ConversationRows, pretrain_fraction: float,
                 seed: int = 0, state: dict | None = None):
        if text is None and pretrain_fraction > 0:
            raise ValueError("pretrain_fraction > 0 needs the text loader")
        self.text, self.conv, self.fraction, self.seed = text, conversations, pretrain_fraction, seed
        self.B = conversations.B
        self.rows_drawn = 0
        if state is not None:
            self.rows_drawn = state["rows_drawn"]

    def _is_text(self, k: int) -> bool:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}-mix-{k}".encode()).digest()[:8], "big")
        return h / 2**64 < self.fraction

    def __iter__(self):
        return self

    def __next__(self):
        ids, masks = [], []
        for _ in range(self.B):
            if self._is_text(self.rows_drawn):
                row = self.text._row()
                mask = None if row is None else _from_text(row)
            else:
                got = self.conv.row()
                row, mask = (None, None) if got is None else got
            if row is None:
                raise StopIteration
            self.rows_drawn += 1
            ids.append(row)
            masks.append(mask)
        return (torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.bool), self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"rows_drawn": self.rows_drawn, "text": self.text.state_dict() if self.text else None,
                "conversations": self.conv.state_dict()}
