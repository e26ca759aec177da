"""Bits per byte: the tokenizer-independent validation loss of training and evaluation."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from rdn.dist import all_reduce_sum, dist_info


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """A loader batch ``(x, y[, coords_x, coords_y], state)`` -> ``(x, y, coords_x or None, state)``."""
    *tensors, state = batch
    return tensors[0], tensors[1], (tensors[2] if len(tensors) > 2 else None), state


@torch.no_grad()
def evaluate_bpb(model, batches: Iterator, max_tokens: int, token_bytes: torch.Tensor,
                 autocast: Callable[[], Any]) -> float:
    """Bits per byte of the targets: sum of nats / (ln 2 * sum of target bytes). Special
    tokens (0 bytes) are excluded, so the figure is independent of the vocabulary.

    Under torchrun each rank evaluates its slice of the same batches and the sums are
    all-reduced, so every rank returns the same figure."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64)
    nbytes = torch.zeros((), dtype=torch.float64)
    seen = 0
    world = dist_info().world_size
    for batch in batches:
        x, y, cx, _ = unpack_batch(batch)
        with autocast():
            loss = model(x, y, coords=cx, loss_reduction="none")
        tb = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)  # masked targets (-1) count nothing
        nats += (loss.float() * (tb > 0)).sum().double().cpu()
        nbytes += tb.sum().double().cpu()
        seen += y.numel() * world
        if seen >= max_tokens:
            break
    model.train(was_training)
    if world > 1:
        total = all_reduce_sum([nats.item(), nbytes.item()], next(model.parameters()).device)
        nats, nbytes = (torch.tensor(v, dtype=torch.float64) for v in total)
    if nbytes.item() == 0:
        raise ValueError("validation split produced no batch: make eval_tokens or the val split larger")
    return float(nats / (math.log(2) * nbytes))
