"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675, Algorithm 2).

One momentum per parameter, and a step of the same size in every coordinate::

    c = beta1 * m + (1 - beta1) * g          # interpolation: the update direction
    p = p * (1 - lr * wd) - lr * sign(c)     # decoupled weight decay, sign step
    m = beta2 * m + (1 - beta2) * g          # momentum, with the slower beta2

with betas (0.9, 0.99) (:data:`LION_BETAS`, the paper's default). Because ``sign`` gives
every coordinate a step of exactly ``lr``, larger than a typical AdamW step, the paper
advises a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger, so
``lr * wd`` (the decay per step) stays the same; how rdn maps its learning rates is in
:mod:`rdn.optim.variants`. Half of AdamW's state: one momentum.

:func:`lion_step` is written out exactly as above, one float op per term (no lerp, no fused
multiply-add), so a reference doing the same float32 ops element by element equals it
bitwise (tests/test_optim_variants.py).
"""

from __future__ import annotations

from torch import Tensor

LION_BETAS = (0.9, 0.99)
# Default Lion learning rate as a fraction of the AdamW rate it replaces (rdn.optim.variants).
LION_LR_SCALE = 0.1


def lion_step(p: Tensor, grad: Tensor, exp_avg: Tensor, lr_t: Tensor, beta1_t: Tensor, beta2_t: Tensor,
              wd_t: Tensor) -> None:
    """One Lion update of ``p`` and its momentum ``exp_avg``, in place (module docstring).
    Hyperparameters are 0-D float32 tensors."""
    c = exp_avg * beta1_t
    c += grad * (1 - beta1_t)
    p.mul_(1 - lr_t * wd_t)
    p.sub_(c.sign_() * lr_t)
    exp_avg.mul_(beta2_t)
    exp_avg.add_(grad * (1 - beta2_t))
