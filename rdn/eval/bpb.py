"""Bits per byte: the tokenizer-independent validation loss of training and evaluation.

:func:`evaluate_bpb` is the figure over every target; :func:`evaluate_bpb_by_class` adds
the RDN-specific figures over two classes of targets, from the same pass:

* **closing** -- a target token whose bracket delta (``rdn.coords.bracket_deltas``, the
  token -> net openers-minus-closers table the coordinate calculator uses) is negative: it
  closes at least one bracket, net (``)``, ``})``; not ``)(`` or ``(x)``);
* **depth >= 2** -- a target token whose bracket depth is at least 2, where the depth of a
  token is the one :mod:`rdn.coords` assigns to it: the depth *after* the token's own delta
  (``depth := max(0, depth + delta[token])``, reset to 0 at every BOS), the depth whose
  dimension (``min(depth, n_dim - 1)``) carries that token's coordinate when the model reads
  it. So an opener entering level 2 counts, and a closer leaving level 2 for level 1 does
  not. The depth is computed on the loader row (the inputs plus the last target) from its
  start, exactly as the loader computes the coordinates the model sees -- also in GPT mode,
  where the batch carries no coordinates, so RDN and GPT runs are scored on the same targets.

Each figure is sum of nats / (ln 2 * sum of bytes) over its targets; special tokens
(0 bytes) and masked targets (-1) count in none.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from rdn.coords import _gather_at_last_bos
from rdn.dist import all_reduce_sum, dist_info

CLASSES = ("closing", "depth2")


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """A loader batch ``(x, y[, coords_x, coords_y], state)`` -> ``(x, y, coords_x or None, state)``."""
    *tensors, state = batch
    return tensors[0], tensors[1], (tensors[2] if len(tensors) > 2 else None), state


def bracket_depth(ids: torch.Tensor, deltas: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Depth ``LongTensor[B, T]`` of each token of rows ``[B, T]``, as :func:`rdn.coords.hierarchical_coordinates`
    walks it: after the token's own delta, floored at 0, reset at every BOS (0 at the BOS).
    The token's coordinate sits on dimension ``min(depth, n_dim - 1)``."""
    B, T = ids.shape
    ids = ids.long()
    deltas = deltas.to(device=ids.device, dtype=torch.long)
    is_bos = ids == bos_id
    step = torch.where(is_bos, 0, deltas[ids])
    pos = torch.arange(T, device=ids.device).expand(B, T)
    last_bos = torch.where(is_bos, pos, -1).cummax(dim=1).values
    seg = is_bos.long().cumsum(dim=1)
    csum = step.cumsum(dim=1)
    walk = csum - _gather_at_last_bos(csum, last_bos)
    big = T * deltas.abs().max().clamp(min=1) + 1
    run_min = (walk - seg * big).cummin(dim=1).values + seg * big
    return walk - run_min.clamp(max=0)


def target_classes(x: torch.Tensor, y: torch.Tensor, deltas: torch.Tensor,
                   bos_id: int) -> dict[str, torch.Tensor]:
    """Boolean masks ``[B, T]`` of the targets ``y`` of inputs ``x`` in each class (module docstring).

    The row the loader split into ``x`` and ``y`` is ``x`` plus the last target; depth is
    causal, so a masked (-1) last target, read as token 0, changes no other target's depth."""
    deltas = deltas.to(device=y.device, dtype=torch.long)
    row = torch.cat([x, y[:, -1:].clamp(min=0)], dim=1)
    depth = bracket_depth(row, deltas, bos_id)[:, 1:]
    valid = y >= 0
    return {"closing": valid & (deltas[y.clamp(min=0)] < 0), "depth2": valid & (depth >= 2)}


@torch.no_grad()
def _bpb_sums(model, batches: Iterator, max_tokens: int, token_bytes: torch.Tensor, autocast: Callable[[], Any],
              calc=None) -> list[float]:
    """``[nats, bytes]`` over all targets, then ``[nats, bytes]`` per class of :data:`CLASSES`
    when ``calc`` (a :class:`~rdn.coords.CoordinateCalculator`: its deltas and BOS id) is given;
    summed over ranks."""
    was_training = model.training
    model.eval()
    n_sums = 2 + (2 * len(CLASSES) if calc is not None else 0)
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(n_sums)]
    seen = 0
    world = dist_info().world_size
    for batch in batches:
        x, y, cx, _ = unpack_batch(batch)
        with autocast():
            loss = model(x, y, coords=cx, loss_reduction="none")
        tb = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)  # masked targets (-1) count nothing
        nats = loss.float() * (tb > 0)
        sums[0] += nats.sum().double().cpu()
        sums[1] += tb.sum().double().cpu()
        if calc is not None:
            masks = target_classes(x, y, calc.deltas, calc.bos_id)
            for i, name in enumerate(CLASSES):
                m = masks[name]
                sums[2 + 2 * i] += (nats * m).sum().double().cpu()
                sums[3 + 2 * i] += (tb * m).sum().double().cpu()
        seen += y.numel() * world
        if seen >= max_tokens:
            break
    model.train(was_training)
    values = [s.item() for s in sums]
    if world > 1:
        values = all_reduce_sum(values, next(model.parameters()).device)
    if values[1] == 0:
        raise ValueError("validation split produced no batch: make eval_tokens or the val split larger")
    return values


def _bpb(nats: float, nbytes: float) -> float:
    return float(torch.tensor(nats, dtype=torch.float64) / (math.log(2) * torch.tensor(nbytes, dtype=torch.float64)))


def evaluate_bpb(model, batches: Iterator, max_tokens: int, token_bytes: torch.Tensor,
                 autocast: Callable[[], Any]) -> float:
    """Bits per byte of the targets: sum of nats / (ln 2 * sum of target bytes). Special
    tokens (0 bytes) are excluded, so the figure is independent of the vocabulary.

    Under torchrun each rank evaluates its slice of the same batches and the sums are
    all-reduced, so every rank returns the same figure."""
    nats, nbytes = _bpb_sums(model, batches, max_tokens, token_bytes, autocast)
    return _bpb(nats, nbytes)


def evaluate_bpb_by_class(model, batches: Iterator, max_tokens: int, token_bytes: torch.Tensor,
                          autocast: Callable[[], Any], calc) -> dict[str, float | None]:
    """:func:`evaluate_bpb` plus the figures over closing-bracket targets and targets at depth
    >= 2 (module docstring), from one pass: ``{"bpb", "bpb_closing", "bpb_depth2"}`` and the
    byte counts behind them (``"bytes"``, ``"bytes_closing"``, ``"bytes_depth2"``). A class
    with no bytes gets None. ``calc``: the :class:`~rdn.coords.CoordinateCalculator` of the
    tokenizer and ``coords`` params (only its delta table and BOS id are used, so a GPT run
    passes one built for the metric and is scored on the same targets as an RDN run).
    ``"bpb"`` equals :func:`evaluate_bpb`'s figure exactly. Sums are all-reduced under torchrun."""
    values = _bpb_sums(model, batches, max_tokens, token_bytes, autocast, calc)
    out: dict[str, float | None] = {"bpb": _bpb(values[0], values[1]), "bytes": values[1]}
    for i, name in enumerate(CLASSES):
        nats, nbytes = values[2 + 2 * i], values[3 + 2 * i]
        out[f"bpb_{name}"] = _bpb(nats, nbytes) if nbytes > 0 else None
        out[f"bytes_{name}"] = nbytes
    return out
