"""DeepSeek MoE feed-forward layer: shared experts, many small routed experts, loss-free balancing.

DeepSeekMoE as in DeepSeek-V3 (arXiv:2412.19437, section 2.1.2), in place of a block's dense
ReLU² MLP::

    s_i = sigmoid(x . r_i)                                    affinity of expert i (float32)
    chosen = top_k over i of (s_i + b_i)                      b: bias for *selection only*
    g_i = s_i / sum_{j in chosen} s_j  for i in chosen        gates sum to 1
    y = Shared(x) + sum_{i in chosen} g_i Expert_i(x)

* every expert, shared or routed, is a ReLU² MLP ``c_proj(relu(c_fc(x))**2)`` (Primer,
  arXiv:2109.08668) of hidden width ``expert_hidden``; the ``num_shared`` always-on experts
  are one MLP of hidden ``num_shared * expert_hidden`` (gate 1);
* the routed experts' weights are two 3-D tensors, ``w_fc [E, H, C]`` and ``w_proj [E, C, H]``:
  each expert's matrix is laid out like an ``nn.Linear`` weight, so Muon orthogonalises each
  one on its own (leading dims are a batch of matrices in :class:`rdn.optim.MuonAdamW`);
* no token is dropped (no capacity): tokens are sorted by expert and each expert multiplies
  its own contiguous slice (:attr:`MoE.dispatch`);
* **auxiliary-loss-free balancing** (Wang et al., arXiv:2408.15664): after every optimizer
  step ``b_i += bias_update_rate * sign(mean load - load_i)``, with the loads of that step
  summed over ranks, so every rank keeps the same bias;
* a small **sequence-wise balance loss** (DeepSeek-V3 eq. 17-20) guards against imbalance
  inside one sequence: ``L = weight * mean_seq sum_i f_i P_i`` with
  ``f_i = E / (k T) * #{t: i chosen for t}`` and ``P_i = mean_t s_i,t / sum_j s_j,t``.

The router runs in float32 outside autocast, so the choice of experts does not hinge on bf16
rounding (KV-cache decoding, T=1, routes each token as the full forward does). With
``top_k == 1`` every gate is exactly 1 and the router learns only from the balance loss (its
gradient from the main loss is zero), as the normalised gates imply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

EXPERT_OPTIMIZERS = ("muon", "adamw")
DISPATCHES = ("loop", "grouped_mm")


@dataclass
class MoEConfig:
    enabled: bool = False
    num_experts: int = 8                 # routed experts E
    num_shared: int = 1                  # always-on experts (one MLP of num_shared * expert_hidden)
    top_k: int = 2                       # routed experts per token
    expert_hidden: int | None = None     # None = 4 * n_embd / top_k rounded to a multiple of 64
    first_dense_layers: int = 1          # leading layers that keep the dense MLP
    bias_update_rate: float = 1e-3       # loss-free balancing step (0 = bias frozen)
    seq_aux_loss_weight: float = 1e-4    # sequence-wise balance loss (0 = not computed)
    expert_optimizer: str = "muon"       # "muon" | "adamw" for the routed experts' 3-D weights

    def __post_init__(self):
        problems = []
        if self.num_experts < 1:
            problems.append(f"moe.num_experts must be >= 1 (got {self.num_experts})")
        if not 1 <= self.top_k <= max(self.num_experts, 1):
            problems.append(f"moe.top_k must be in [1, num_experts={self.num_experts}] (got {self.top_k})")
        if self.num_shared < 0:
            problems.append(f"moe.num_shared must be >= 0 (got {self.num_shared})")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            problems.append(f"moe.expert_hidden must be >= 1 or null (got {self.expert_hidden})")
        if self.first_dense_layers < 0:
            problems.append(f"moe.first_dense_layers must be >= 0 (got {self.first_dense_layers})")
        if not self.bias_update_rate >= 0:
            problems.append(f"moe.bias_update_rate must be >= 0 (got {self.bias_update_rate})")
        if not self.seq_aux_loss_weight >= 0:
            problems.append(f"moe.seq_aux_loss_weight must be >= 0 (got {self.seq_aux_loss_weight})")
        if self.expert_optimizer not in EXPERT_OPTIMIZERS:
            problems.append(f"moe.expert_optimizer must be one of {list(EXPERT_OPTIMIZERS)} "
                            f"(got {self.expert_optimizer!r})")
        if problems:
            raise ValueError("; ".join(problems))

    def resolved_expert_hidden(self, n_embd: int) -> int:
        """``expert_hidden``, or the dense MLP's hidden ``4 * n_embd`` split over the ``top_k``
        active experts, rounded (half up) to a multiple of 64 and at least 64, so a token's
        routed compute matches the dense MLP's."""
        if self.expert_hidden is not None:
            return self.expert_hidden
        return max(64, int(4 * n_embd / self.top_k / 64 + 0.5) * 64)

    def applies_to(self, layer_idx: int) -> bool:
        """Does layer ``layer_idx`` (0-based) get an MoE feed-forward?"""
        return self.enabled and layer_idx >= self.first_dense_layers


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose construction draws no random numbers (its default init
    runs on the meta device); the weight is left empty for :meth:`MoE.init_weights`."""
    lin = nn.Linear(in_features, out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(torch.empty(out_features, in_features))
    return lin


class SharedExpert(nn.Module):
    """The always-on experts: one ReLU² MLP of hidden ``num_shared * expert_hidden``."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.c_fc = _linear(n_embd, hidden)
        self.c_proj = _linear(hidden, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class MoE(nn.Module):
    """DeepSeekMoE feed-forward ``[B, T, C] -> [B, T, C]`` (module docstring).

    Parameters (state-dict keys): ``router.weight [E, C]``, ``shared.c_fc.weight [S*H, C]`` and
    ``shared.c_proj.weight [C, S*H]`` (absent when ``num_shared == 0``), ``w_fc [E, H, C]``,
    ``w_proj [E, C, H]``; buffers: ``expert_bias [E]`` float32 (persistent: a resumed run keeps
    its balance), ``expert_counts [E]`` int64 (tokens routed per expert since the last
    :meth:`update_bias`; not saved).

    ``dispatch`` chooses how the routed experts run over the sorted tokens: ``"loop"`` (default)
    one matmul pair per expert over its slice (split sizes read on the host, excluded from
    ``torch.compile``); ``"grouped_mm"`` one ``F.grouped_mm`` pair for all experts, no host sync
    and static shapes, when the matmuls run in bf16 (autocast or bf16 weights; CUDA needs
    sm80+), the loop otherwise (the grouped kernels and their compile-time shape functions
    take bf16 only)."""

    dispatch: str = "loop"

    def __init__(self, n_embd: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.n_embd = n_embd
        E, H = cfg.num_experts, cfg.resolved_expert_hidden(n_embd)
        self.num_experts, self.top_k, self.expert_hidden = E, cfg.top_k, H
        self.router = _linear(n_embd, E)
        self.shared = SharedExpert(n_embd, cfg.num_shared * H) if cfg.num_shared > 0 else None
        self.w_fc = nn.Parameter(torch.empty(E, H, n_embd))
        self.w_proj = nn.Parameter(torch.empty(E, n_embd, H))
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("expert_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        self.aux_loss: Tensor | None = None
        self._counted = False           # did a training forward add counts since the last update?
        self._load: Tensor | None = None  # [load_cv, max_load] of the last update_bias
        self.init_weights(3 ** 0.5 * n_embd ** -0.5)

    @torch.no_grad()
    def init_weights(self, bound: float) -> None:
        """Initialise every parameter and buffer (also after ``to_empty`` from meta).

        Input projections uniform(-bound, bound), drawn in this order from the global
        generator: routed experts' ``w_fc``, shared ``c_fc``, ``router``. Output projections
        (``w_proj``, shared ``c_proj``) zero, like the dense MLP's ``c_proj``: the layer starts
        as the zero function. ``expert_bias`` and the counts zero."""
        nn.init.uniform_(self.w_fc, -bound, bound)
        if self.shared is not None:
            nn.init.uniform_(self.shared.c_fc.weight, -bound, bound)
        nn.init.uniform_(self.router.weight, -bound, bound)
        nn.init.zeros_(self.w_proj)
        if self.shared is not None:
            nn.init.zeros_(self.shared.c_proj.weight)
        self.expert_bias.zero_()
        self.expert_counts.zero_()
        self.aux_loss, self._counted, self._load = None, False, None

    # ----------------------------------------------------------------------- routing

    def _scores(self, xf: Tensor) -> Tensor:
        """Sigmoid affinities ``[N, E]`` in float32, outside autocast."""
        with torch.autocast(xf.device.type, enabled=False):
            return torch.sigmoid(F.linear(xf.float(), self.router.weight.float()))

    def _select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices [N, k], gates [N, k])``: top-k of ``scores + expert_bias``; the gates are
        the chosen affinities (without the bias) normalised to sum 1."""
        idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        chosen = scores.gather(-1, idx)
        return idx, chosen / chosen.sum(-1, keepdim=True)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices, gates)``, each ``[..., top_k]``, of the tokens ``x [..., C]``."""
        idx, gates = self._select(self._scores(x.reshape(-1, x.size(-1))))
        return idx.view(*x.shape[:-1], -1), gates.view(*x.shape[:-1], -1)

    # ----------------------------------------------------------------------- experts

    @torch.compiler.disable
    def _experts_loop(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Expert ``e`` on its slice of the expert-sorted rows ``xs``; one host sync for the sizes."""
        outs = []
        for chunk, w_fc, w_proj in zip(xs.split(counts.tolist()), self.w_fc.unbind(0), self.w_proj.unbind(0)):
            if chunk.size(0):
                outs.append(F.linear(F.relu(F.linear(chunk, w_fc)).square(), w_proj))
        return torch.cat(outs) if outs else xs.new_zeros(0, self.n_embd)

    def _experts_grouped(self, xs: Tensor, counts: Tensor, dtype: torch.dtype) -> Tensor:
        """The same with two grouped GEMMs in ``dtype`` (expert ``e`` ends at row ``cumsum(counts)[e]``)."""
        offs = counts.cumsum(0).to(torch.int32)
        h = F.grouped_mm(xs.to(dtype), self.w_fc.to(dtype).mT, offs=offs)
        return F.grouped_mm(F.relu(h).square(), self.w_proj.to(dtype).mT, offs=offs)

    def _routed(self, xf: Tensor, idx: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum_i g_i Expert_i(x) [N, C], tokens per expert [E])``. The ``N * k`` (token,
        expert) pairs are sorted by expert (stable), the experts run on contiguous slices, and
        the results are put back in pair order and summed per token with their gates (no
        scatter-add: each token owns exactly ``k`` consecutive rows)."""
        N, C = xf.shape
        k = self.top_k
        flat = idx.reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=xf.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        order = flat.argsort(stable=True)
        xs = xf[order // k]
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoE.dispatch must be one of {list(DISPATCHES)} (got {self.dispatch!r})")
        dev = xs.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.w_fc.dtype
        if self.dispatch == "grouped_mm" and dtype == torch.bfloat16:
            ys = self._experts_grouped(xs, counts, dtype)
        else:
            ys = self._experts_loop(xs, counts)
        ys = ys.new_empty(ys.shape).index_copy(0, order, ys)  # back to (token, slot) order
        return (ys.view(N, k, C) * gates.unsqueeze(-1)).sum(1), counts

    # ----------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, C] -> [B, T, C]``. A training forward with grad (``self.training`` and grad
        enabled) also adds its per-expert token counts for :meth:`update_bias` and sets
        :attr:`aux_loss` (the weighted sequence-wise balance loss, or None at weight 0);
        otherwise :attr:`aux_loss` is None and nothing is recorded. The gated sum is taken in
        float32 under bf16 autocast and returned in ``x``'s dtype."""
        B, T, C = x.shape
        xf = x.reshape(-1, C)
        scores = self._scores(xf)
        idx, gates = self._select(scores)
        y, counts = self._routed(xf, idx, gates)
        if self.shared is not None:
            y = y + self.shared(xf)
        self.aux_loss = None
        if self.training and torch.is_grad_enabled():
            self.expert_counts += counts
            self._counted = True
            if self.cfg.seq_aux_loss_weight > 0:
                self.aux_loss = self.cfg.seq_aux_loss_weight * self.sequence_balance_loss(
                    scores.view(B, T, -1), idx.view(B, T, -1))
        return y.view(B, T, C).to(x.dtype)

    def sequence_balance_loss(self, scores: Tensor, idx: Tensor) -> Tensor:
        """Unweighted DeepSeek-V3 sequence-wise balance loss (eq. 17-20) from the affinities
        ``scores [B, T, E]`` and the chosen experts ``idx [B, T, k]``: per sequence
        ``sum_i f_i P_i`` with ``f_i = E / (k T) * #{t: i in idx[t]}`` (no gradient) and
        ``P_i = mean_t s_i,t / sum_j s_j,t``; the mean over the ``B`` sequences."""
        B, T, E = scores.shape
        k = idx.size(-1)
        hits = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
        hits.scatter_add_(1, idx.reshape(B, T * k), torch.ones(B, T * k, device=scores.device, dtype=scores.dtype))
        f = hits * (E / (k * T))
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * P).sum(-1).mean()

    # ----------------------------------------------------------------------- balancing

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing after an optimizer step: sum the step's counts over ranks (when
        ``torch.distributed`` is initialised; every rank must call this together), record
        ``load_cv`` and ``max_load`` of them, move ``expert_bias`` by ``bias_update_rate *
        sign(mean - count)`` and zero the counts. A no-op when no training forward counted."""
        if not self._counted:
            return
        counts = self.expert_counts
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        c = counts.float()
        mean = c.mean()
        self._load = torch.stack([c.std(correction=0) / mean, c.max() / mean])
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(mean - c)
        counts.zero_()
        self._counted = False

    def stats(self) -> dict[str, float]:
        """``{"load_cv", "max_load"}`` of the last :meth:`update_bias`'s counts (std / mean,
        population std, and max / mean: 0 and 1 when perfectly balanced); empty before."""
        if self._load is None:
            return {}
        cv, mx = self._load.tolist()
        return {"load_cv": cv, "max_load": mx}

    # ----------------------------------------------------------------------- accounting

    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts' 3-D weights ``[w_fc, w_proj]``."""
        return [self.w_fc, self.w_proj]

    def matmul_params(self) -> tuple[int, int]:
        """(total, active per token) weights used as matmuls: router + shared + all routed
        experts, and router + shared + ``top_k`` routed experts."""
        router = self.router.weight.numel()
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        per_expert = self.w_fc[0].numel() + self.w_proj[0].numel()
        return router + shared + self.num_experts * per_expert, router + shared + self.top_k * per_expert
