"""Hierarchical coordinates: where each token sits in the bracket structure of its document.

Per row, left to right (the contract in docs/design.md):

* a BOS token starts a new document: depth := 0 and every per-depth counter := 0;
  its coordinate is all zeros;
* any other token: ``depth := max(0, depth + delta[token])``,
  ``d := min(depth, n_dim - 1)``; the coordinate is zero except ``coord[d] = counter[d]``;
  then ``counter[d] += 1``.

``delta[token]`` is the token's net bracket count (openers minus closers in its text),
so a token like ``((`` moves two levels at once. Resetting at every BOS keeps packed
documents from leaking depth into each other; flooring depth at zero keeps an early
unmatched closer from shifting every later depth.

:func:`hierarchical_coordinates` is fully vectorised -- prefix sums and prefix minima
over the time axis, no Python loop over batch, time or dimension, no host sync -- so
it runs on the training device from the token ids alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_BRACKET_PAIRS = ("()", "[]", "{}", "<>")


def bracket_deltas(tokenizer, pairs: Sequence[str] = DEFAULT_BRACKET_PAIRS) -> torch.Tensor:
    """Net (openers - closers) in each token's text, as ``LongTensor[vocab_size]``.

    Special tokens get 0 (``<|bos|>`` contains ``<`` and ``>`` but is not text). Bracket
    characters are counted in each token's own bytes decoded as UTF-8; a multi-byte
    bracket split across two tokens is counted by neither."""
    opens = {p[0] for p in pairs}
    closes = {p[1] for p in pairs}
    special = set(tokenizer.special_ids.values())
    out = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        text = tokenizer.id_bytes(i).decode("utf-8", errors="ignore")
        out[i] = sum(ch in opens for ch in text) - sum(ch in closes for ch in text)
    return out


def _gather_at_last_bos(values: torch.Tensor, last_bos: torch.Tensor) -> torch.Tensor:
    """``values[b, last_bos[b, t]]`` (0 where no BOS has been seen yet); values is [B, T] or [B, T, D]."""
    idx = last_bos.clamp(min=0)
    seen = last_bos >= 0
    if values.dim() == 3:
        got = values.gather(1, idx.unsqueeze(-1).expand(-1, -1, values.size(-1)))
        return got * seen.unsqueeze(-1)
    return values.gather(1, idx) * seen


def hierarchical_coordinates(ids: torch.Tensor, deltas: torch.Tensor, bos_id: int, n_dim: int) -> torch.Tensor:
    """Coordinates ``LongTensor[B, T, n_dim]`` of token ids ``[B, T]`` (or ``[T]`` -> ``[T, n_dim]``)."""
    if ids.dim() == 1:
        return hierarchical_coordinates(ids.unsqueeze(0), deltas, bos_id, n_dim).squeeze(0)
    if n_dim < 1:
        raise ValueError(f"n_dim must be >= 1 (got {n_dim})")
    B, T = ids.shape
    ids = ids.long()
    deltas = deltas.to(device=ids.device, dtype=torch.long)
    is_bos = ids == bos_id
    step = torch.where(is_bos, 0, deltas[ids])                       # BOS moves nothing
    pos = torch.arange(T, device=ids.device).expand(B, T)
    last_bos = torch.where(is_bos, pos, -1).cummax(dim=1).values     # start of the current document
    seg = is_bos.long().cumsum(dim=1)                                # document index within the row

    # Depth before flooring: prefix sum of deltas since the document start (0 at the BOS).
    csum = step.cumsum(dim=1)
    walk = csum - _gather_at_last_bos(csum, last_bos)
    # Flooring at zero is a reflected walk: depth = walk - min(0, running min of walk).
    # The running min must restart at every document; shifting each document down by
    # seg * big (big > any |walk|) makes earlier documents' values never the minimum.
    big = T * deltas.abs().max().clamp(min=1) + 1
    run_min = (walk - seg * big).cummin(dim=1).values + seg * big
    depth = walk - run_min.clamp(max=0)

    # Per-depth counters: for each token, how many earlier non-BOS tokens of the same
    # document landed on the same dimension.
    dim_idx = depth.clamp(max=n_dim - 1)
    onehot = torch.nn.functional.one_hot(dim_idx, n_dim) * (~is_bos).unsqueeze(-1)
    counts = onehot.cumsum(dim=1)
    before = counts - onehot - _gather_at_last_bos(counts, last_bos)
    return before * onehot


class CoordinateCalculator:
    """The token-id -> coordinate function a model, loader or engine is handed.

    ``calc = CoordinateCalculator.from_tokenizer(tok, n_dim=8)``; ``calc(ids)`` gives
    ``[B, T, n_dim]`` for ``[B, T]`` ids (``[T, n_dim]`` for ``[T]``) on the ids' device
    (the delta table moves there once; on CUDA the computation is compiled once)."""

    def __init__(self, deltas: torch.Tensor, bos_id: int, n_dim: int = 8):
        self.deltas, self.bos_id, self.n_dim = deltas.long(), int(bos_id), int(n_dim)
        self._compiled = None  # on CUDA the ~20 small scans/gathers fuse into a few kernels

    @classmethod
    def from_tokenizer(cls, tokenizer, n_dim: int = 8,
                       bracket_pairs: Sequence[str] = DEFAULT_BRACKET_PAIRS) -> "CoordinateCalculator":
        return cls(bracket_deltas(tokenizer, bracket_pairs), tokenizer.bos_id, n_dim)

    def _deltas_on(self, device: torch.device) -> torch.Tensor:
        if self.deltas.device != device:
            self.deltas = self.deltas.to(device)
        return self.deltas

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        fn = hierarchical_coordinates
        if token_ids.is_cuda:
            if self._compiled is None:
                self._compiled = torch.compile(hierarchical_coordinates, dynamic=False)
            fn = self._compiled
        return fn(token_ids, self._deltas_on(token_ids.device), self.bos_id, self.n_dim)
