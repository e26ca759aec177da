"""Optimizer variants: which update each kind of parameter gets, and in which state dtype.

:class:`OptimVariant` is the ``optim`` section's choice (``state_dtype``, ``matrix``,
``vector``, ``lion_lr_scale``, ``galore``); :meth:`OptimVariant.param_groups` writes it into
the model's param groups (:meth:`rdn.model.GPT.optimizer_param_groups`), which
:class:`~rdn.optim.MuonAdamW` and :class:`~rdn.optim.dist.DistMuonAdamW` then follow:

* ``kind="muon"`` groups (the transformer matrices, MoE expert stacks, mHC matrices) are
  updated by ``matrix``: ``muon`` (default), ``lion``, ``adamw`` or ``galore_adamw``;
* ``kind="adamw"`` groups (embeddings, lm_head, scalars) by ``vector``: ``adamw`` (default)
  or ``lion``;
* ``state_dtype: int8`` keeps every moment of 4096 elements or more 8-bit
  (:mod:`rdn.optim.quant8`).

The default variant adds nothing to the groups: the optimizer is today's, bit for bit.
The group keys a variant writes (``algorithm``, ``state_dtype``, ``lion_*``, ``galore_*``,
and ``betas``/``eps`` for AdamW on matrices) are saved with the optimizer state, and a state
saved under another variant is refused on load.

Learning rates keep their meaning per kind of parameter; how each update uses them is in
:class:`~rdn.optim.MuonAdamW` (in short: matrix groups carry Muon's ``matrix_lr`` and the other
updates convert it to the same per-element step size; Lion takes ``lion_lr_scale`` times the
AdamW rate it replaces and divides the weight decay by it).

:func:`state_bytes` counts a built optimizer's state exactly; :mod:`rdn.optim.memory`
predicts it from shapes alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from rdn.optim.galore import GALORE_DEFAULTS
from rdn.optim.lion import LION_BETAS, LION_LR_SCALE
from rdn.optim.quant8 import STATE_DTYPES

MATRIX_UPDATES = ("muon", "lion", "adamw", "galore_adamw")
VECTOR_UPDATES = ("adamw", "lion")
MATRIX_ADAMW_EPS = 1e-10  # as the model's AdamW groups


@dataclass(frozen=True)
class OptimVariant:
    """The optimizer variant of a run (``params.optim``, module docstring)."""

    state_dtype: str = "fp32"
    matrix: str = "muon"
    vector: str = "adamw"
    lion_lr_scale: float = LION_LR_SCALE
    galore_rank: int = GALORE_DEFAULTS["rank"]
    galore_update_proj_gap: int = GALORE_DEFAULTS["update_proj_gap"]
    galore_scale: float = GALORE_DEFAULTS["scale"]

    def __post_init__(self):
        for key, value, options in (("state_dtype", self.state_dtype, STATE_DTYPES),
                                    ("matrix", self.matrix, MATRIX_UPDATES), ("vector", self.vector, VECTOR_UPDATES)):
            if value not in options:
                raise ValueError(f"optim.{key} must be one of {options} (got {value!r})")

    @classmethod
    def from_config(cls, optim: Any) -> "OptimVariant":
        """From an :class:`rdn.config.OptimConfig` (read by attribute)."""
        return cls(state_dtype=optim.state_dtype, matrix=optim.matrix, vector=optim.vector,
                   lion_lr_scale=optim.lion_lr_scale, galore_rank=optim.galore.rank,
                   galore_update_proj_gap=optim.galore.update_proj_gap, galore_scale=optim.galore.scale)

    @property
    def uses_lion(self) -> bool:
        return "lion" in (self.matrix, self.vector)

    def compat(self) -> dict[str, Any]:
        """What a resumed checkpoint must match: the choices, and the settings of the updates in use."""
        out: dict[str, Any] = {"state_dtype": self.state_dtype, "matrix": self.matrix, "vector": self.vector}
        if self.uses_lion:
            out["lion_lr_scale"] = self.lion_lr_scale
        if self.matrix == "galore_adamw":
            out["galore"] = {"rank": self.galore_rank, "update_proj_gap": self.galore_update_proj_gap,
                             "scale": self.galore_scale}
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def param_groups(self, groups: list[dict[str, Any]], adam_betas: tuple[float, float]) -> list[dict[str, Any]]:
        """``groups`` with this variant's keys added (new dicts; the default variant adds none).
        ``adam_betas``: the betas of AdamW on matrices (the stage's AdamW betas)."""
        out = []
        for group in groups:
            g = dict(group)
            if self.state_dtype != "fp32":
                g["state_dtype"] = self.state_dtype
            algorithm = self.matrix if g["kind"] == "muon" else self.vector
            if algorithm != ("muon" if g["kind"] == "muon" else "adamw"):
                g["algorithm"] = algorithm
            if algorithm == "lion":
                g.update(lion_betas=LION_BETAS, lion_lr_scale=self.lion_lr_scale)
            if g["kind"] == "muon" and algorithm in ("adamw", "galore_adamw"):
                g.update(betas=tuple(adam_betas), eps=MATRIX_ADAMW_EPS)
            if algorithm == "galore_adamw":
                g.update(galore_rank=self.galore_rank, galore_update_proj_gap=self.galore_update_proj_gap,
                         galore_scale=self.galore_scale)
            out.append(g)
        return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in ``optimizer.state`` (8-bit codes and their block
    absmaxes, moments, projectors); for a sharded optimizer, the shards this rank holds.
    Python numbers in the state (step counts) are not tensors and are not counted."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
