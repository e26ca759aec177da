"""Schedules as pure functions of the step: each returns a multiplier (or a value) to apply.

Steps count from 0 to ``num_steps - 1``; the training loop sets, per group,
``group["lr"] = group["initial_lr"] * lr_multiplier(...)`` and, for Muon groups,
``group["momentum"] = muon_momentum(step)`` and
``group["weight_decay"] = base_wd * weight_decay_multiplier(step, num_steps)``.
The shapes follow nanochat: warmup / constant / linear warmdown for the learning rate
(a trapezoid, "WSD"), a short momentum ramp for Muon, and weight decay fading to zero.
"""

from __future__ import annotations

import math


def _check_steps(step: int, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1 (got {num_steps})")
    if not 0 <= step < num_steps:
        raise ValueError(f"step: must be in [0, num_steps) = [0, {num_steps}) (got {step})")


def _check_fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}: must be in [0, 1] (got {value})")


def lr_multiplier(step: int, num_steps: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup, constant 1, then linear warmdown to ``final_lr_frac`` at the last step.

    With ``W = round(warmup_ratio * num_steps)`` warmup steps the multiplier is
    ``(step + 1) / W`` for ``step < W`` (small but non-zero at step 0, exactly 1 at step
    ``W - 1``). The last ``D = round(warmdown_ratio * num_steps)`` steps fall linearly from 1
    (at step ``num_steps - 1 - D``) to ``final_lr_frac`` (at step ``num_steps - 1``). A
    positive ratio always gets at least one step; the two phases must not overlap.
    """
    _check_steps(step, num_steps)
    _check_fraction("warmup_ratio", warmup_ratio)
    _check_fraction("warmdown_ratio", warmdown_ratio)
    _check_fraction("final_lr_frac", final_lr_frac)
    if warmup_ratio + warmdown_ratio > 1.0:
        raise ValueError(f"warmup_ratio + warmdown_ratio: must be <= 1 (got {warmup_ratio} + {warmdown_ratio})")
    warmup = max(1, round(warmup_ratio * num_steps)) if warmup_ratio > 0 else 0
    warmdown = max(1, round(warmdown_ratio * num_steps)) if warmdown_ratio > 0 else 0
    warmdown = min(warmdown, num_steps - warmup)  # rounding both up may not fit otherwise
    if step < warmup:
        return (step + 1) / warmup
    steps_left = num_steps - 1 - step
    if steps_left < warmdown:
        progress = steps_left / warmdown  # 1 where the warmdown starts, 0 at the last step
        return final_lr_frac + (1.0 - final_lr_frac) * progress
    return 1.0


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """Muon momentum: linear from ``start`` at step 0 to ``end`` at ``ramp_steps``, then constant.

    Lower momentum early lets the first, large and noisy updates decay quickly (nanochat
    and modded-nanogpt ramp 0.85 -> 0.95 over the first 300 steps)."""
    if step < 0:
        raise ValueError(f"step: must be >= 0 (got {step})")
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps: must be >= 0 (got {ramp_steps})")
    for name, value in (("start", start), ("end", end)):
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise ValueError(f"{name}: must be in [0, 1) (got {value})")
    frac = 1.0 if ramp_steps == 0 else min(step / ramp_steps, 1.0)
    return start + (end - start) * frac


def weight_decay_multiplier(step: int, num_steps: int) -> float:
    """Weight-decay multiplier falling linearly from 1 at step 0 to 0 at the last step.

    (nanochat uses ``1 - step / num_steps``, which stops one step short of 0; here the
    last step ``num_steps - 1`` is exactly 0, like the end of :func:`lr_multiplier`.)"""
    _check_steps(step, num_steps)
    if num_steps == 1:
        return 1.0
    return 1.0 - step / (num_steps - 1)
