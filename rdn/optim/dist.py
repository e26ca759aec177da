"""DistMuonAdamW: MuonAdamW for several ranks, ZeRO-2 style (sharded gradients and state).

No DDP wrapper: every rank runs forward/backward on its own micro-batches and keeps its
local gradients; :meth:`DistMuonAdamW.step` averages them and updates the weights, with
each rank doing (and storing state for) only its share of the work (ZeRO stage 2:
Rajbhandari et al. 2020, arXiv:1910.02054; the Muon layout follows nanochat's and
modded-nanogpt's distributed Muon):

* **Muon groups.** The group's N same-shape matrices are stacked and padded with zero
  matrices to ``N_pad``, a multiple of the world size W; a reduce-scatter hands rank r
  the averaged gradients of matrices ``[r * N_pad/W, (r+1) * N_pad/W)``. Rank r
  orthogonalises those *whole* matrices (Polar Express needs a whole matrix), keeps
  their momentum and NorMuon statistics, and an all-gather returns the updated stack.
  A zero pad matrix stays zero (zero momentum, zero update), so padding only costs the
  bytes of the pad.
* **Large AdamW params** (at least ``shard_min_numel`` elements, first dim divisible by
  W) are sharded along dim 0: reduce-scatter of the gradient, AdamW on the owned rows
  with row-shard moments, all-gather of the rows. A first dim not divisible by W falls
  back to the replicated path (logged once), which gives the same result at more memory.
* **Small AdamW params** (gains, lambdas) are all-reduced and updated on every rank.

Every collective is launched asynchronously up front, smallest first; each unit's update
runs as soon as its own reduction is in and its all-gather is launched right away, so
communication overlaps the orthogonalisation of the other units. Gradients are summed,
then divided by W on the reduced shard only, so the result is the mean gradient a single
process with the same global batch (gradient accumulation) would see.

Only per-element and per-matrix maths runs on the shards, so a step equals
:class:`~rdn.optim.muon_adamw.MuonAdamW`'s on the averaged gradients up to the order of
floating-point summation in the reduction (see tests/test_dist.py). ``max_grad_norm``
clips the global norm of the averaged gradient, as ``clip_grad_norm_`` would on one
process (it needs every reduction in before any update, so it costs the overlap).

The optimizer state of each rank is its own shard: save ``state_dict()`` per rank and
load it into the same rank of a run with the same world size (anything else raises).
Leading dims of a Muon shape are a batch of matrices, so 3-D (e.g. expert) weights stack
the same way.

Variants (:mod:`rdn.optim.variants`) shard the same way: Lion on an AdamW param works on the
owned rows like AdamW; Lion, AdamW and GaLore on a Muon group work on the owned whole
matrices of the padded stack (GaLore's SVD needs whole matrices, as Polar Express does, so
each rank keeps the projectors and low-rank moments of its own matrices; a zero pad matrix
stays zero under every update). 8-bit states are quantised per shard: a rank's blocks of
256 start at its own first element, so they coincide with a single process's blocks when
the shard starts at a multiple of 256 elements of the whole state (then a 2-rank step equals
the one-process step bitwise, as for fp32 states).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rdn.optim.muon_adamw import MuonAdamW

log = logging.getLogger(__name__)

# torch >= 2.10 names; older releases call them reduce_scatter_tensor / all_gather_into_tensor.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

LAYOUT_VERSION = 1


@dataclass
class _Unit:
    """One reduction and its update: a replicated param, a sharded param, or a Muon group."""

    kind: str                # "replicated" | "sharded" | "muon"
    group: dict[str, Any]
    params: list[Tensor]
    grad: Tensor             # reduction output: the full grad (replicated, in place) or this rank's shard
    full: Tensor | None = None  # reduce-scatter input (the whole, padded gradient), alive until the wait
    work: Any = None         # pending reduction
    gather: Any = None       # pending all-gather
    out: Tensor | None = None  # all-gather output (muon)


class DistMuonAdamW(MuonAdamW):
    """:class:`MuonAdamW` over a process group, gradients and state sharded (module docstring).

    Same ``param_groups`` as MuonAdamW. ``process_group``: default group when None.
    ``shard_min_numel``: AdamW params smaller than this are replicated. ``max_grad_norm``:
    clip the global gradient norm (0 = off); set it here instead of calling
    ``clip_grad_norm_`` on the (local, unreduced) gradients. After each step
    ``last_grad_norm`` holds the global norm of the averaged gradient before clipping (a
    0-dim tensor, the same on every rank), whether or not it clips."""

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, compile: bool | None = None,
                 process_group: dist.ProcessGroup | None = None, shard_min_numel: int = 1024,
                 max_grad_norm: float = 0.0):
        if not dist.is_initialized():
            raise RuntimeError("DistMuonAdamW needs an initialised process group (torchrun + init_process_group); "
                               "use MuonAdamW in a single process")
        self._pg = process_group
        self.rank, self.world = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.shard_min_numel, self.max_grad_norm = shard_min_numel, max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self._fallback_logged: set[tuple] = set()
        super().__init__(param_groups, compile=compile)

    # -- layout
    def _is_sharded(self, p: Tensor) -> bool:
        if p.ndim == 0 or p.numel() < self.shard_min_numel:
            return False
        if p.shape[0] % self.world:
            key = tuple(p.shape)
            if key not in self._fallback_logged and self.rank == 0:
                log.info("DistMuonAdamW: shape %s has a first dim not divisible by %d ranks: replicated",
                         key, self.world)
            self._fallback_logged.add(key)
            return False
        return True

    def _muon_chunk(self, n: int) -> int:
        return -(-n // self.world)  # matrices per rank after padding n to a multiple of W

    def layout(self) -> dict[str, Any]:
        """What a saved state depends on: loading into another layout is refused."""
        return {"version": LAYOUT_VERSION, "world_size": self.world, "rank": self.rank,
                "shard_min_numel": self.shard_min_numel}

    # -- state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dist_layout"] = self.layout()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("dist_layout", None)
        want = self.layout()
        if saved != want:
            got = saved or {"world_size": 1, "note": "single-process MuonAdamW state"}
            raise ValueError(f"optimizer state was saved with layout {got}, this run has {want}: a sharded "
                             f"optimizer state resumes only at the same world size and rank; resume with "
                             f"{got.get('world_size')} processes, or start fresh (resume: never)")
        super().load_state_dict(state_dict)

    # -- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = self._launch_reductions()
        if self.max_grad_norm > 0:
            for u in units:
                u.work.wait()
                u.grad.div_(self.world)
                u.work = None
            self._clip(units)
        # without clipping the norm is summed as each reduction comes in (overlap kept)
        device = units[0].grad.device if units else torch.device("cpu")
        sq = None if self.max_grad_norm > 0 else torch.zeros((), dtype=torch.float32, device=device)
        for u in units:
            if u.work is not None:
                u.work.wait()
                u.grad.div_(self.world)
                if sq is not None and (u.kind != "replicated" or self.rank == 0):  # replicated: counted once
                    sq += torch.linalg.vector_norm(u.grad, dtype=torch.float32).square()
            if u.kind == "replicated":
                self._update_adamw(u.group, u.params[0], u.params[0], u.grad)
            elif u.kind == "sharded":
                p = u.params[0]
                rows = p.shape[0] // self.world
                own = p[self.rank * rows:(self.rank + 1) * rows]
                self._update_adamw(u.group, p, own, u.grad)
                u.gather = _all_gather(p, own.clone(), group=self._pg, async_op=True)
            else:
                self._update_muon(u)
        if sq is not None:
            dist.all_reduce(sq, group=self._pg)
            self.last_grad_norm = sq.sqrt()
        for u in units:
            if u.gather is not None:
                u.gather.wait()
            if u.kind == "muon":
                torch._foreach_copy_(u.params, list(u.out[:len(u.params)].unbind(0)))
        return loss

    def _present(self) -> list[bool]:
        """Per param: does any rank have a gradient? (A param unused by one rank's micro-batches
        still gets the others' gradients, as with gradient accumulation on one process.)"""
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            return []
        flags = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._pg)
        return [bool(f) for f in flags.tolist()]

    def _launch_reductions(self) -> list[_Unit]:
        """Plan one unit per replicated param, sharded param and Muon group, then, smallest
        first, fill each one's buffer and launch its reduction at once: small reductions
        finish first so their updates start while the big ones are in flight, and the
        stacking copies of later units overlap the earlier units' communication."""
        present = iter(self._present())
        planned: list[tuple[int, str, dict[str, Any], list[Tensor]]] = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    if next(present):
                        kind = "sharded" if self._is_sharded(p) else "replicated"
                        planned.append(({"replicated": 0, "sharded": 1}[kind], kind, group, [p]))
            else:
                params = group["params"]
                flags = [next(present) for _ in params]
                if not any(flags):
                    continue
                if not all(flags):
                    raise RuntimeError("DistMuonAdamW: a muon group is updated as one stack, so either every param "
                                       "in it has a gradient (on some rank) or none does")
                planned.append((2, "muon", group, params))
        planned.sort(key=lambda t: (t[0], sum(p.numel() for p in t[3])))  # stable: ties keep group order
        units = []
        for _, kind, group, params in planned:
            first = params[0]
            if kind == "replicated":
                g = first.grad.contiguous() if first.grad is not None else torch.zeros_like(first)
                u = _Unit(kind, group, params, g)  # all-reduced in place
                u.work = dist.all_reduce(u.grad, group=self._pg, async_op=True)
            else:
                if kind == "sharded":
                    full = first.grad.contiguous() if first.grad is not None else torch.zeros_like(first)
                    rows = first.shape[0] // self.world
                else:  # the group's matrices stacked, zero-padded to a multiple of the world size
                    rows = self._muon_chunk(len(params))
                    full = torch.zeros((rows * self.world, *first.shape), dtype=first.dtype, device=first.device)
                    for i, p in enumerate(params):
                        if p.grad is not None:
                            full[i].copy_(p.grad)
                shard = torch.empty((rows, *full.shape[1:]), dtype=full.dtype, device=full.device)
                u = _Unit(kind, group, params, shard, full=full)
                u.work = _reduce_scatter(shard, full, group=self._pg, async_op=True)
            units.append(u)
        return units

    def _clip(self, units: list[_Unit]) -> None:
        """Scale the reduced gradients so the global norm is at most ``max_grad_norm``."""
        device = units[0].grad.device if units else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for u in units:
            if u.kind != "replicated" or self.rank == 0:  # replicated grads are counted once
                sq += u.grad.float().square().sum()
        dist.all_reduce(sq, group=self._pg)
        self.last_grad_norm = sq.sqrt()
        coef = (self.max_grad_norm / (self.last_grad_norm + 1e-6)).clamp(max=1.0)
        for u in units:
            u.grad.mul_(coef.to(u.grad.dtype))

    def _update_adamw(self, group: dict[str, Any], p: Tensor, target: Tensor, grad: Tensor) -> None:
        self._load_adamw_hparams(group)
        self._adamw_update(group, p, target, grad)

    def _update_muon(self, u: _Unit) -> None:
        group, params = u.group, u.params
        first = params[0]
        chunk = u.grad.shape[0]
        lo = self.rank * chunk
        own = max(0, min(len(params) - lo, chunk))  # real (unpadded) matrices this rank owns
        stacked_params = torch.zeros_like(u.grad)
        if own:
            torch.stack(params[lo:lo + own], out=stacked_params[:own])
        self._matrix_update(group, u.grad, stacked_params)
        u.out = torch.empty((chunk * self.world, *first.shape), dtype=first.dtype, device=first.device)
        u.gather = _all_gather(u.out, stacked_params, group=self._pg, async_op=True)


def communication_bytes(param_groups: list[dict[str, Any]], world_size: int, shard_min_numel: int = 1024,
                        element_size: int | None = None) -> dict[str, int]:
    """Bytes each rank sends per :class:`DistMuonAdamW` step with ring collectives.

    A ring reduce-scatter or all-gather of a tensor of S bytes sends ``S (W-1)/W`` per rank;
    a ring all-reduce is both, ``2 S (W-1)/W``. Padded Muon stacks count their padding.
    Returns the per-kind split and the total (0 for one rank)."""
    W = world_size
    frac = (W - 1) / W if W > 1 else 0.0
    out = {"muon": 0, "adamw_sharded": 0, "adamw_replicated": 0}
    for g in param_groups:
        params = list(g["params"])
        if not params:
            continue
        size = element_size or params[0].element_size()
        if g["kind"] == "muon":
            n_pad = -(-len(params) // W) * W
            out["muon"] += int(2 * n_pad * params[0].numel() * size * frac)
        else:
            for p in params:
                sharded = p.ndim > 0 and p.numel() >= shard_min_numel and p.shape[0] % W == 0
                out["adamw_sharded" if sharded else "adamw_replicated"] += int(2 * p.numel() * size * frac)
    out["total"] = sum(out.values())
    return out
