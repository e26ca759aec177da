"""Optimizer memory from shapes alone: what each optimizer variant would allocate.

:func:`predicted_state_bytes` maps a model's param groups (anything with ``.shape`` and
``.dtype``: meta-device tensors will do, so nothing is allocated) and a variant's group keys
to the exact bytes of optimizer state that :class:`~rdn.optim.MuonAdamW` (``world=1``) or
one rank of :class:`~rdn.optim.dist.DistMuonAdamW` allocates by the end of its first step,
assuming every parameter gets a gradient. It follows the optimizers' layout rule by rule:

* AdamW: ``exp_avg`` and ``exp_avg_sq`` per parameter; Lion: ``exp_avg``; each the
  parameter's shape (or, sharded, ``1/W`` of its rows when it has ``>= shard_min_numel``
  elements and a first dim divisible by ``W``);
* Muon groups stack their N matrices ``[N, *shape]``, ``ceil(N / W)`` per rank: Muon keeps a
  momentum of that shape and a NorMuon statistic ``[.., m, 1]`` / ``[.., 1, n]``; Lion a
  momentum; AdamW two moments; GaLore, for matrices it projects, a float32 projector and two
  low-rank moments (:func:`rdn.optim.galore.low_rank_shape`), else AdamW's;
* a state is 8-bit (``numel + 4 ceil(numel / 256)`` bytes) when the group's ``state_dtype`` is
  ``int8`` and the whole state has >= 4096 elements, else the parameter's element size per
  element.

``tests/test_optim_variants.py`` checks it against :func:`rdn.optim.state_bytes` of real
optimizers after a step, for every option, on one process and per rank on two.
:func:`memory_table` is ``rdn memory``'s table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from rdn.optim.galore import low_rank_shape, projects
from rdn.optim.muon_adamw import algorithm
from rdn.optim.quant8 import STATE_DTYPES, quantized_bytes, wants_int8
from rdn.optim.variants import MATRIX_UPDATES, VECTOR_UPDATES, OptimVariant


def _bytes(held: int, full: int, state_dtype: str, element_size: int) -> int:
    return quantized_bytes(held) if wants_int8(state_dtype, full) else held * element_size


def predicted_state_bytes(groups: list[dict[str, Any]], world: int = 1, shard_min_numel: int = 1024) -> int:
    """Bytes of optimizer state one rank holds for ``groups`` (module docstring)."""
    total = 0
    for g in groups:
        params = list(g["params"])
        if not params:
            continue
        algo, sd = algorithm(g), g.get("state_dtype", "fp32")
        size = params[0].element_size()
        if g["kind"] == "adamw":
            for p in params:
                full = p.numel()
                sharded = world > 1 and p.ndim > 0 and full >= shard_min_numel and p.shape[0] % world == 0
                held = full // world if sharded else full
                total += (2 if algo == "adamw" else 1) * _bytes(held, full, sd, size)
            continue
        shape = tuple(params[0].shape)
        N, rows = len(params), -(-len(params) // world)
        numel = math.prod(shape)
        if algo == "muon":
            m, n = shape[-2], shape[-1]
            stat = math.prod(shape[:-1]) if m >= n else math.prod(shape[:-2]) * n
            total += _bytes(rows * numel, N * numel, sd, size) + _bytes(rows * stat, N * stat, sd, size)
        elif algo == "lion":
            total += _bytes(rows * numel, N * numel, sd, size)
        elif algo == "adamw" or not projects(shape, g["galore_rank"]):
            total += 2 * _bytes(rows * numel, N * numel, sd, size)
        else:
            proj, moment = (math.prod(s) for s in low_rank_shape(shape, g["galore_rank"]))
            total += rows * proj * 4 + 2 * _bytes(rows * moment, N * moment, sd, size)
    return total


@dataclass(frozen=True)
class MemoryRow:
    state_dtype: str
    matrix: str
    vector: str
    param_bytes: int
    grad_bytes: int
    state_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.state_bytes


def memory_rows(groups: list[dict[str, Any]], base: OptimVariant = OptimVariant(),
                adam_betas: tuple[float, float] = (0.8, 0.95), world: int = 1,
                shard_min_numel: int = 1024) -> list[MemoryRow]:
    """One row per ``state_dtype`` x ``matrix`` x ``vector``, the other settings (GaLore rank,
    Lion scale) from ``base``. ``groups``: the model's :meth:`optimizer_param_groups`.
    Parameters and gradients are counted whole on every rank (ZeRO-2 shards only the state)."""
    params = [p for g in groups for p in g["params"]]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    rows = []
    for sd, matrix, vector in itertools.product(STATE_DTYPES, MATRIX_UPDATES, VECTOR_UPDATES):
        variant = OptimVariant(state_dtype=sd, matrix=matrix, vector=vector, lion_lr_scale=base.lion_lr_scale,
                               galore_rank=base.galore_rank, galore_update_proj_gap=base.galore_update_proj_gap,
                               galore_scale=base.galore_scale)
        state = predicted_state_bytes(variant.param_groups(groups, adam_betas), world, shard_min_numel)
        rows.append(MemoryRow(sd, matrix, vector, param_bytes, param_bytes, state))
    return rows


def _fmt(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def memory_table(rows: list[MemoryRow], chosen: OptimVariant | None = None) -> str:
    """The rows as text: bytes, and the state's change against the baseline (fp32, Muon,
    AdamW) and against fp32 AdamW everywhere; ``*`` marks ``chosen``."""
    by = {(r.state_dtype, r.matrix, r.vector): r for r in rows}
    base, adamw = by["fp32", "muon", "adamw"].state_bytes, by["fp32", "adamw", "adamw"].state_bytes
    head = (f"  {'state':<5} {'matrix':<12} {'vector':<6} {'params':>12} {'grads':>12} {'optimizer state':>15} "
            f"{'vs base':>8} {'vs AdamW':>8} {'total':>12}")
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        mark = "*" if chosen is not None and (r.state_dtype, r.matrix, r.vector) == (
            chosen.state_dtype, chosen.matrix, chosen.vector) else " "
        lines.append(f"{mark} {r.state_dtype:<5} {r.matrix:<12} {r.vector:<6} {_fmt(r.param_bytes):>12} "
                     f"{_fmt(r.grad_bytes):>12} {_fmt(r.state_bytes):>15} {100 * (r.state_bytes / base - 1):>+7.1f}% "
                     f"{100 * (r.state_bytes / adamw - 1):>+7.1f}% {_fmt(r.total):>12}")
    return "\n".join(lines)
