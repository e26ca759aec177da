"""Multi-token prediction (MTP): extra heads that predict tokens 2..D+1 steps ahead.

DeepSeek-V3's sequential design (arXiv:2412.19437, section 2.2): module ``k`` (1-based) at
position ``t`` reads the previous depth's hidden state ``h_{k-1}[t]`` (``h_0`` = the trunk's
final hidden state, before its final norm) and the embedding of token ``x[t+k]``::

    h_k[t] = Block_k( W_k [ RMSNorm(h_{k-1}[t]) ; RMSNorm(emb(x[t+k])) ] )      W_k: 2d -> d

and predicts ``x[t+k+1]`` with the shared ``lm_head`` (after the model's final RMSNorm). The
embedding (token table plus, in RDN mode, the coordinate tables) and the output head are
the trunk's own, so the heads add one ``2d x d`` projection and one transformer block each.

Targets are the trunk's targets shifted by ``k``: position ``t`` of module ``k`` trains on the
target at ``t + k``. It is ignored (-1) where ``t + k`` falls past the row's end, or where one
of the tokens ``x[t+1] .. x[t+k]`` is ``<|bos|>``: the target then lies in another document,
which ``x[t]`` says nothing about (see :func:`shifted_targets`).

The training loss is ``main + loss_weight * sum_k w_k L_k / sum_k w_k`` over the ``num_future``
heads (seed 004's defaults: 4 heads, weights 1, 0.5, 0.25, 0.125, total weight 0.2). With
``loss_weight == 0`` the heads' losses are still measured for logging, without a graph, so
the main loss and every trunk gradient are bitwise those of the model without MTP. Plain
generation never runs the heads; the engine's self-speculative decoding may use them as
drafters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_FUTURE = 4


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, no learnable scale (the same op as the trunk's)."""
    return F.rms_norm(x, (x.size(-1),))


@dataclass
class MTPConfig:
    num_future: int = 0                       # heads; 0 = off
    weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125])
    loss_weight: float = 0.2                  # lambda of the weighted MTP loss

    def __post_init__(self):
        self.weights = [float(w) for w in self.weights]
        problems = []
        if not 0 <= self.num_future <= MAX_FUTURE:
            problems.append(f"mtp.num_future must be in [0, {MAX_FUTURE}] (got {self.num_future})")
        if len(self.weights) < self.num_future:
            problems.append(f"mtp.weights needs one weight per head ({self.num_future}), got {len(self.weights)}")
        if any(w < 0 for w in self.weights) or (self.num_future and sum(self.weights[:self.num_future]) <= 0):
            problems.append(f"mtp.weights must be >= 0 with a positive sum (got {self.weights})")
        if self.loss_weight < 0:
            problems.append(f"mtp.loss_weight must be >= 0 (got {self.loss_weight})")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.num_future > 0

    def normalised_weights(self) -> list[float]:
        w = self.weights[:self.num_future]
        total = sum(w)
        return [x / total for x in w]


def shifted_targets(idx: torch.Tensor, targets: torch.Tensor, k: int, bos_id: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_k, targets_k)``, both ``[B, T]``, for MTP module ``k`` (1-based).

    ``inputs_k[:, t] = idx[:, t + k]`` (the token whose embedding module ``k`` reads) and
    ``targets_k[:, t] = targets[:, t + k]``; both are padded past the row's end (input 0,
    target -1). A target is also -1 when ``bos_id`` occurs in ``idx[:, t+1 .. t+k]`` (the
    chain from ``t`` to the target crosses a document boundary)."""
    B, T = idx.shape
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    inputs = idx.new_zeros(B, T)
    tgt = targets.new_full((B, T), -1)
    if k >= T:
        return inputs, tgt
    inputs[:, :T - k] = idx[:, k:]
    tgt[:, :T - k] = targets[:, k:]
    if bos_id is not None:
        is_bos = (idx == bos_id).to(torch.int32)
        # crossed[t] = any bos in idx[t+1 .. t+k]: a window sum over the next k positions.
        csum = torch.cat([is_bos.new_zeros(B, 1), is_bos.cumsum(1)], dim=1)   # csum[:, j] = sum idx[:, :j]
        t = torch.arange(T - k, device=idx.device)
        crossed = (csum[:, t + k + 1] - csum[:, t + 1]) > 0
        tgt[:, :T - k] = tgt[:, :T - k].masked_fill(crossed, -1)
    return inputs, tgt


class MTPHead(nn.Module):
    """One MTP module: ``block(proj([norm(h); norm(e)]))``. The block is built by the model
    (a full-attention transformer block without a value embedding)."""

    def __init__(self, n_embd: int, block: nn.Module, linear=nn.Linear):
        super().__init__()
        self.proj = linear(2 * n_embd, n_embd, bias=False)
        self.block = block

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, run_block) -> torch.Tensor:
        """``run_block(block, x)`` applies the block with the trunk's rotary tables."""
        x = self.proj(torch.cat([norm(h_prev), norm(emb_next)], dim=-1))
        return run_block(self.block, x)
