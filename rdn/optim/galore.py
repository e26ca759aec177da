"""GaLore: AdamW on a low-rank projection of each matrix gradient.

Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"
(arXiv:2403.03507); defaults (rank 128, projector refreshed every 200 steps, scale 0.25)
as in GaLore 2 (Su et al. 2025, arXiv:2504.20437). For a gradient ``G`` [m, n]:

* every ``update_proj_gap`` steps (the first step included) the projector is refreshed from
  an SVD of the current gradient, ``G = U S V^T``: for a tall or square matrix (m >= n) the
  right one, ``Q = V[:, :r]`` [n, r]; for a wide one the left one, ``P = U[:, :r]`` [m, r]
  (the smaller side is the one reduced, as in the paper's code);
* the gradient is projected, ``R = G Q`` [m, r] or ``R = P^T G`` [r, n], and AdamW's two
  moments live in that low-rank space (bias-corrected as usual); the moments are not
  rotated when the projector changes (as in GaLore);
* the normalised low-rank update ``N = m_hat / (sqrt(v_hat) + eps)`` is projected back,
  ``N Q^T`` or ``P N``, scaled by ``scale`` and applied with decoupled weight decay:
  ``p = p * (1 - lr * wd) - lr * scale * back(N)``.

State per matrix: the projector (n x r or m x r) and two r x n / m x r moments instead of
two m x n ones. A matrix whose smaller side is at most ``rank`` is not projected (a
projection to rank >= min(m, n) saves nothing): it gets plain AdamW, so GaLore at full rank
*is* AdamW (tests/test_optim_variants.py). Leading dims are a batch of matrices (a Muon
group's stack, MoE experts [E, m, n]): each matrix has its own projector, from one batched
SVD. The SVD runs in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

GALORE_DEFAULTS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25}


def projects(shape: tuple[int, ...], rank: int) -> bool:
    """Whether a matrix of ``shape`` [..., m, n] is projected (its smaller side exceeds ``rank``)."""
    return min(shape[-2], shape[-1]) > rank


def low_rank_shape(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(projector shape, moment shape) of a projected stack of matrices ``shape`` [..., m, n]."""
    *lead, m, n = shape
    if m >= n:
        return (*lead, n, rank), (*lead, m, rank)
    return (*lead, m, rank), (*lead, rank, n)


def refresh_projector(grad: Tensor, proj: Tensor) -> None:
    """Fill ``proj`` with the top-``r`` singular vectors of ``grad`` [..., m, n] (right ones
    for m >= n, left ones otherwise), from a float32 SVD."""
    m, n = grad.shape[-2], grad.shape[-1]
    r = proj.shape[-1]
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    proj.copy_(Vh[..., :r, :].mT if m >= n else U[..., :, :r])


def project(grad: Tensor, proj: Tensor) -> Tensor:
    """The low-rank gradient: ``G Q`` [..., m, r] (tall) or ``P^T G`` [..., r, n] (wide)."""
    if grad.shape[-2] >= grad.shape[-1]:
        return grad @ proj
    return proj.mT @ grad


def project_back(low: Tensor, proj: Tensor, tall: bool) -> Tensor:
    """A low-rank update back in the full space: ``N Q^T`` or ``P N``."""
    return low @ proj.mT if tall else proj @ low


def galore_adamw_step(p: Tensor, grad: Tensor, proj: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor,
                      lr_t: Tensor, beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor,
                      scale_t: Tensor) -> None:
    """One GaLore-AdamW update of a stack of projected matrices ``p`` [..., m, n] in place
    (module docstring); ``proj`` must already hold this step's projector."""
    tall = p.shape[-2] >= p.shape[-1]
    low = project(grad.float(), proj)
    exp_avg.lerp_(low.to(exp_avg.dtype), (1 - beta1_t).to(exp_avg.dtype))
    exp_avg_sq.lerp_(low.square().to(exp_avg_sq.dtype), (1 - beta2_t).to(exp_avg_sq.dtype))
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    normalised = exp_avg.float() / ((exp_avg_sq.float() / bias2).sqrt() + eps_t) / bias1
    p.mul_(1 - lr_t * wd_t)
    p.sub_((project_back(normalised, proj, tall) * (lr_t * scale_t)).to(p.dtype))
