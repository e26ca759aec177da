"""Collider: token filtering across all layers (Chai et al., "Enhancing LLM Training Efficiency
Through Token Filtering Across All Layers", arXiv:2502.00340).

Per micro-batch, each supervised token's importance is its loss in the forward pass. The
``filter_fraction`` least important tokens are *filtered*: their loss is dropped, and in the
backward pass the activation gradients of their rows are treated as zero at every layer, so
each :class:`ColliderLinear` computes

    dW = dY[kept]^T X[kept]        dX[kept] = dY[kept] W        dX[filtered] = 0

from the kept rows gathered into smaller dense matrices (not masked: the backward matmuls
shrink by the kept fraction). Loss filtering alone does not do this: the filtered tokens'
keys and values feed the kept tokens' attention, so their rows would still carry gradient
down every layer.

Attention. The attention core (``softmax(QK^T)V``) mixes rows; its backward runs at full
size, as autograd computes it. A filtered row's output gradient is exactly zero there (it
has no loss and, by induction from the top, no gradient from above), so its ``dq`` is zero
too; its ``dk`` and ``dv`` are not (kept queries attend to it). Those are the gradients the
paper drops: ``c_k``/``c_v`` backpropagate only the kept rows, so they reach neither the
weight gradients nor the residual stream. Running the core at full size keeps it one dense
kernel (FlashAttention / SDPA) whose cost does not depend on the filter; gathering it would
need a ragged varlen call per sequence for a part that is a small share of the tiny model's
backward FLOPs (``benchmarks/collider.py`` prints the share). Row-wise ops (RMSNorm, rotary,
QK-norm, ReLU², the residual scalars) keep zero rows zero.

What stays at full size, as autograd computes it: every layer not made a
:class:`ColliderLinear` -- the attention core, the lm_head (whose filtered rows have exactly
zero gradient already, so gathering it would change nothing but its speed), MoE experts (3-D
weights in :mod:`rdn.model.moe`) and the value-embedding gate. That gate reads the residual
stream, so with value embeddings on and ``ve_gate`` a plain ``nn.Linear``, filtered rows'
``dv`` leak into their residual rows through it (a 32 -> n_kv_head matmul: a small leak, but
not zero); making ``ve_gate`` a ColliderLinear too closes it (the value-embedding *tables*
still receive ``gate * dv`` of filtered rows). ``tests/test_collider.py`` checks both.

Token selection (:func:`kept_tokens`): over the whole micro-batch ``[B, T]``, of ``n``
supervised tokens (target != -1) ``n_drop = floor(f * n + 1/2)`` are filtered and the
``n - n_drop`` highest-loss ones kept (at least one when ``n > 0``); ties are broken by
position (the earlier flat index ``b * T + t`` is kept), so the choice is deterministic.

Use: build the blocks' linears as :class:`ColliderLinear` (:func:`collider_linears_` swaps
an existing model's in place, sharing the parameters) and compute each micro-batch's loss
with :func:`collider_loss`. Outside :func:`collider_backward` a ColliderLinear *is*
``nn.Linear`` (the same call, bitwise the same forward and backward), so ``filter_fraction: 0``
and the warm-up steps are bitwise the plain model. Under ``torch.compile`` the inactive path
traces as ``F.linear``; the active path is a graph break around each linear (its backward
has a data-dependent size). Not thread-safe: one collider forward at a time per process.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""The linears of every transformer block that ``block_linear`` builds (``blocks.<i>.<name>``)."""


@dataclass
class ColliderSettings:
    """``<stage>.collider``: filter the ``filter_fraction`` lowest-loss tokens out of the backward
    pass, after ``warmup_steps`` optimizer steps of full backward (seed 004: 0.35)."""

    filter_fraction: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self):
        f = self.filter_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ValueError(f"invalid collider settings: filter_fraction must be in [0, 1) (got {f!r})")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"invalid collider settings: warmup_steps must be an integer >= 0 (got {w!r})")

    @property
    def enabled(self) -> bool:
        """Whether filtering ever happens (else the model need not use ColliderLinear at all)."""
        return self.filter_fraction > 0

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) filters tokens."""
        return self.enabled and step >= self.warmup_steps


# --------------------------------------------------------------------------- token selection

def kept_count(n: int, filter_fraction: float) -> int:
    """Tokens kept of ``n`` supervised ones: ``n - floor(f * n + 1/2)``, at least 1 if ``n > 0``."""
    if n <= 0:
        return 0
    return max(1, n - math.floor(filter_fraction * n + 0.5))


@torch.no_grad()
def kept_tokens(token_losses: Tensor, filter_fraction: float, ignore: Tensor | None = None) -> Tensor:
    """Bool mask like ``token_losses`` ``[B, T]``: the :func:`kept_count` highest-loss tokens
    among those not ``ignore``-d, over the whole micro-batch. Ties go to the earlier flat
    position; ignored tokens are never kept. (NaN losses sort first, so they are kept and
    the trainer's NaN check still sees them.)"""
    flat = token_losses.detach().reshape(-1).float()
    supervised = torch.ones_like(flat, dtype=torch.bool) if ignore is None else ~ignore.reshape(-1)
    n = int(supervised.sum()) if ignore is not None else flat.numel()
    k = kept_count(n, filter_fraction)
    score = torch.where(supervised, flat, torch.full_like(flat, -math.inf))
    order = torch.sort(score, descending=True, stable=True).indices
    keep = torch.zeros_like(supervised)
    keep[order[:k]] = True
    return keep.view(token_losses.shape)


# --------------------------------------------------------------------------- the kept rows of one forward

class ColliderPlan:
    """The kept rows of one collider forward, read by the backward of every
    :class:`ColliderLinear` that ran in it. Set with :meth:`keep` once the losses are known
    (after the forward, before the backward)."""

    def __init__(self, keep: Tensor | None = None):
        self.rows: Tensor | None = None    # flat indices (ascending) of the kept rows of [B * T]
        self.n_rows: int | None = None     # B * T
        if keep is not None:
            self.keep(keep)

    def keep(self, mask: Tensor) -> None:
        if mask.dtype != torch.bool:
            raise TypeError(f"collider: the kept-token mask must be bool (got {mask.dtype})")
        self.rows = mask.reshape(-1).nonzero().squeeze(1)
        self.n_rows = mask.numel()

    @property
    def kept(self) -> int:
        return 0 if self.rows is None else self.rows.numel()

    def rows_for(self, x: Tensor) -> Tensor:
        if self.rows is None:
            raise RuntimeError("collider: a ColliderLinear's backward ran before the kept tokens were set "
                               "(call plan.keep(mask) between the forward and the backward)")
        n = x.numel() // x.size(-1)
        if n != self.n_rows:
            raise RuntimeError(f"collider: a ColliderLinear saw {n} rows but the kept-token mask covers "
                               f"{self.n_rows} (every ColliderLinear input must be [B, T, features])")
        return self.rows if self.rows.device == x.device else self.rows.to(x.device)


class _Active:
    plan: ColliderPlan | None = None
    on: bool = False      # a plain bool, so torch.compile guards on it (two graphs at most)


_ACTIVE = _Active()


@contextmanager
def collider_backward(keep: Tensor | None = None) -> Iterator[ColliderPlan]:
    """Within the block, :class:`ColliderLinear` layers record their inputs for a gathered
    backward against the yielded plan; set its kept rows (``plan.keep(mask)``, or ``keep``
    here when known up front) before calling backward. The backward itself may run after
    the block."""
    plan = ColliderPlan(keep)
    before = _ACTIVE.plan, _ACTIVE.on
    _ACTIVE.plan, _ACTIVE.on = plan, True
    try:
        yield plan
    finally:
        _ACTIVE.plan, _ACTIVE.on = before


class _GatheredLinear(torch.autograd.Function):
    """``F.linear`` forward; backward from the plan's kept rows only (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: ColliderPlan) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = ctx.plan.rows_for(x)
        g = grad.reshape(-1, grad.size(-1)).index_select(0, rows)          # [N, out], dense
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = x.new_zeros(x.numel() // x.size(-1), x.size(-1))
            dx.index_copy_(0, rows, (g @ weight).to(x.dtype))                 # [N, in] into the filtered zeros
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[1]:
            xk = x.reshape(-1, x.size(-1)).index_select(0, rows)             # [N, in]
            dw = (g.t() @ xk).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db, None


@torch.compiler.disable
def _collider_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Cast outside the Function (as autocast casts for nn.Linear), so the saved tensors and
        # the backward matmuls are in the autocast dtype and the casts' own backward returns
        # float32 gradients to the parameters.
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return _GatheredLinear.apply(x, weight, bias, _ACTIVE.plan)


class ColliderLinear(nn.Linear):
    """``nn.Linear`` whose backward, inside :func:`collider_backward`, uses only the kept rows
    (gathered, dense; module docstring). Elsewhere it is ``nn.Linear.forward`` itself: the
    same parameters, random draws, forward and backward, bit for bit."""

    def forward(self, x: Tensor) -> Tensor:
        if not _ACTIVE.on:
            return super().forward(x)
        return _collider_linear(x, self.weight, self.bias)


def collider_linears_(root: nn.Module, names: Sequence[str] = BLOCK_LINEARS) -> nn.Module:
    """Swap ``root``'s ``nn.Linear`` submodules whose dotted names end with one of ``names``
    for :class:`ColliderLinear` layers holding the *same* parameter objects (optimizer
    groups, state-dict keys and weights unchanged). Returns ``root``. For tests, benchmarks
    and models built without the factory."""
    targets = [(name, m) for name, m in root.named_modules()
               if type(m) is nn.Linear and any(name == n or name.endswith("." + n) for n in names)]
    for name, old in targets:
        new = ColliderLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
    return root


# --------------------------------------------------------------------------- one micro-batch

def collider_loss(model_forward: Callable[..., Tensor], x: Tensor, y: Tensor, coords: Tensor | None,
                  settings: ColliderSettings, step: int) -> tuple[Tensor, float]:
    """One micro-batch's loss to backpropagate, and the fraction of supervised tokens kept.

    Off (``filter_fraction == 0``) or in warm-up (``step < warmup_steps``):
    ``model_forward(x, y, coords=coords)`` unchanged, kept fraction 1.0 -- bitwise the plain
    step. Otherwise one forward with per-token losses under :func:`collider_backward`, the
    kept tokens chosen by :func:`kept_tokens`, and a loss whose *gradient* is that of the mean
    over the kept tokens and whose *value* is the mean over all supervised tokens (``kept +
    (full - kept).detach()``), so ``train/loss`` stays comparable with the unfiltered run.
    The variants' extra training losses (MoE sequence balance loss, MTP) are not added on
    filtering steps: ``GPT.forward`` returns per-token losses before them."""
    if not settings.active(step):
        return model_forward(x, y, coords=coords), 1.0
    with collider_backward() as plan:
        token_losses = model_forward(x, y, coords=coords, loss_reduction="none")    # [B, T] float32
    ignore = y == -1
    keep = kept_tokens(token_losses, settings.filter_fraction, ignore)
    plan.keep(keep)
    n_sup = y.numel() - int(ignore.sum())
    n_kept = plan.kept
    kept_mean = torch.where(keep, token_losses, torch.zeros_like(token_losses)).sum() / max(n_kept, 1)
    full_mean = token_losses.sum() / n_sup if n_sup else token_losses.sum() * math.nan
    loss = kept_mean + (full_mean - kept_mean).detach()
    return loss, (n_kept / n_sup if n_sup else 1.0)
