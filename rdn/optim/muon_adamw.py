"""MuonAdamW: one optimizer for the whole model, Muon for matrices and AdamW for the rest.

Each param group is tagged ``kind="muon"`` or ``kind="adamw"``:

* **Muon** (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) takes
  SGD-Nesterov momentum and replaces each matrix's update with (an approximation of) its
  polar factor ``U V^T``, so every direction of the matrix moves by the same amount instead
  of the few dominant singular directions taking the whole step. The polar factor comes from
  :func:`polar_express` (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932), a sequence of
  five odd quintic polynomials tuned per step, which gets closer to ``U V^T`` in the same
  five bf16 steps than the fixed Newton-Schulz quintic Muon started with.
* **NorMuon** (Li et al. 2025, arXiv:2510.05491) then evens out the per-neuron scale that
  orthogonalisation leaves behind: an Adafactor-style factored second moment (one number per
  row, or per column) is tracked with an EMA and divides the update, after which the
  update is rescaled back to its original Frobenius norm, so the step size is Muon's.
* **Cautious weight decay** (Liang et al. 2024, "Cautious Optimizers", arXiv:2411.16085;
  applied to decay in arXiv:2510.12402) decays only the coordinates where the update and the
  parameter have the same sign, i.e. where the update is already pulling the weight towards
  zero, so decay never fights the gradient.
* **AdamW** (Loshchilov & Hutter 2019) with decoupled weight decay for embeddings, the
  output head, gains and biases, which Muon is not meant for.

The update math lives in two plain functions of tensors (:func:`adamw_step`,
:func:`muon_step`) whose hyperparameters are 0-D CPU float tensors filled in place every
step: a schedule changing lr, momentum or weight decay never triggers a recompile. On CUDA
those functions run under ``torch.compile(dynamic=False, fullgraph=True)``; on CPU they run
eager (see :data:`COMPILE_ON_CUDA` and the ``compile`` argument to change either).

The implementation follows the shape of nanochat's ``MuonAdamW`` and modded-nanogpt's
``NorMuon``, rewritten here; the coefficient table is the one both use.

**Variants** (:mod:`rdn.optim.variants`): a group's ``algorithm`` key swaps the update
(``kind="muon"`` groups: ``muon``, ``lion``, ``adamw``, ``galore_adamw``; ``kind="adamw"``
groups: ``adamw``, ``lion``) and ``state_dtype: "int8"`` keeps its moments 8-bit
(:mod:`rdn.optim.quant8`). A group without these keys is updated as described above. The
learning rate of a group keeps its meaning, and each update converts it:

* a matrix group's ``lr`` is Muon's, whose step has a per-element RMS of
  ``lr / sqrt(n)`` (n = fan-in, the last dim; the polar factor's RMS is
  ``1 / sqrt(max(m, n))``, times the shape scale). AdamW's step has an RMS of about 0.2 lr
  (:data:`ADAMW_UPDATE_RMS`; Liu et al. 2025, "Muon is Scalable for LLM Training",
  arXiv:2502.16982, Sec. 2.2, who match the two the same way), so AdamW and GaLore on
  matrices run at ``lr / (0.2 sqrt(n))``, the same per-element step as Muon's;
* Lion replaces AdamW at ``lion_lr_scale`` times AdamW's rate (default 0.1, Chen et al.'s
  "3-10x smaller"; 0.2 would match the step sizes, a sign step having RMS 1, but trained
  worse at the tiny model), i.e. ``lr *
  lion_lr_scale`` in a vector group and ``lr * lion_lr_scale / (0.2 sqrt(n))`` in a matrix
  group;
* decay per step (``lr * wd``) is kept: Lion's weight decay is the AdamW one divided by
  ``lion_lr_scale`` (3-10x larger, as the paper advises), and AdamW, GaLore and Lion on
  matrices decay by Muon's ``lr * max(1, m / n) ** 0.5 * wd`` a step (not cautiously).

AdamW and Lion on a matrix group update the stack elementwise, with the state under the
group's first parameter ([N, *shape], like Muon's); GaLore projects each matrix of the
stack on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from rdn.optim import quant8
from rdn.optim.galore import GALORE_DEFAULTS, galore_adamw_step, low_rank_shape, projects, refresh_projector
from rdn.optim.lion import LION_BETAS, LION_LR_SCALE, lion_step

# ---------------------------------------------------------------------------------------
# Polar Express
# ---------------------------------------------------------------------------------------

# (a, b, c) of the odd quintic p(x) = a x + b x^3 + c x^5 applied at each step, in order.
# Computed by Amsel et al. for 5 iterations, safety factor 2e-2 and cushion 2 (the variant
# modded-nanogpt and nanochat use); on a bf16 768x3072 Gaussian they land the singular
# values in about [0.86, 1.14] (see benchmarks/polar_express.py).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G: Tensor, steps: int = 5, *, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate polar factor ``U V^T`` of ``G`` ([..., m, n]; leading dims are a batch).

    ``G`` is first divided by ``1.02 * ||G||_F + 1e-6`` (per matrix): the Frobenius norm
    bounds the spectral norm, so every singular value starts in (0, 1) where the
    polynomials are designed to work; the 1.02 absorbs bf16 rounding of the norm, the
    1e-6 keeps a zero matrix at zero. Each step then applies an odd polynomial to the
    singular values without an SVD::

        A = X X^T;  B = b A + c A^2;  X = a X + B X

    working on whichever Gram matrix is smaller (``X^T X`` with ``X B`` for tall inputs),
    which is the same polynomial at a fraction of the cost.

    The iteration runs in ``dtype`` (bf16 by default, as in modded-nanogpt and nanochat:
    the polynomials are built with enough slack for bf16 error) and the result is returned
    in ``dtype``; cast it yourself. ``dtype=torch.float32`` gives a reference path for tests.
    """
    if G.ndim < 2:
        raise ValueError(f"polar_express needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps: must be in [1, {len(POLAR_EXPRESS_COEFFS)}] (got {steps})")
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if G.size(-2) > G.size(-1):
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


# ---------------------------------------------------------------------------------------
# Step kernels: plain tensor math, hyperparameters as 0-D tensors
# ---------------------------------------------------------------------------------------


def adamw_step(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, lr_t: Tensor,
               beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor) -> None:
    """One AdamW update of ``p`` in place: decoupled decay, moment EMAs, bias correction."""
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, (1 - beta1_t).to(exp_avg.dtype))
    exp_avg_sq.lerp_(grad.square(), (1 - beta2_t).to(exp_avg_sq.dtype))
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.sub_(exp_avg / denom * (lr_t / bias1))


def normuon_variance_reduction(update: Tensor, second_moment: Tensor, beta2_t: Tensor, red_dim: int) -> Tensor:
    """NorMuon variance reduction of a float32 ``update`` [..., m, n]; updates ``second_moment``.

    ``second_moment`` holds one EMA of mean squares per row ([..., m, 1], ``red_dim=-1``)
    or per column ([..., 1, n], ``red_dim=-2``). The caller picks the rows of a tall or
    square matrix and the columns of a wide one, i.e. it averages over the *smaller*
    dimension: after orthogonalisation the vectors along the smaller dimension (the
    columns of a tall ``U V^T``) already have unit norm, so their statistics would all be
    equal and the division would do nothing; the vectors along the larger dimension are
    the ones whose norms vary. The result has the same Frobenius norm as ``update``.
    """
    v = update.square().mean(dim=red_dim, keepdim=True)
    second_moment.lerp_(v.to(second_moment.dtype), (1 - beta2_t).to(second_moment.dtype))
    scale = second_moment.float().clamp_min(1e-10).rsqrt()
    # The scale is constant along red_dim, so both norms follow from v alone:
    # ||update||^2 = n_red * sum(v) and ||update * scale||^2 = n_red * sum(v * scale^2);
    # the common factor n_red cancels in their ratio.
    norm_before = v.sum(dim=(-2, -1), keepdim=True).sqrt()
    norm_after = (v * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return update * (scale * (norm_before / norm_after.clamp_min(1e-10)))


def muon_step(stacked_grads: Tensor, stacked_params: Tensor, momentum_buffer: Tensor, second_moment: Tensor,
              momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor, ns_steps: int, red_dim: int,
              ortho_dtype: torch.dtype = torch.bfloat16) -> None:
    """One Muon update of a stack of same-shape matrices [N, ..., m, n], all in place.

    Nesterov momentum -> Polar Express -> NorMuon variance reduction -> cautious weight
    decay and the step. ``stacked_grads`` is used as scratch. ``lr_t`` already includes the
    shape scale. The orthogonalisation runs in ``ortho_dtype`` (bf16 on GPUs; float32 on
    CPUs without native bf16 matmul, see :func:`rdn.device.orthogonalization_dtype`);
    everything after it in float32.
    """
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)  # Nesterov: look ahead along the buffer
    update = normuon_variance_reduction(polar_express(g, ns_steps, dtype=ortho_dtype).float(), second_moment, beta2_t,
                                        red_dim)
    p = stacked_params.float()
    mask = (update * p) >= 0  # cautious: decay only where the update already shrinks |p|
    stacked_params.sub_((lr_t * update + lr_t * wd_t * p * mask).to(stacked_params.dtype))


# ---------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------

# Default for MuonAdamW(compile=None): compile the step kernels for CUDA parameters, run them
# eager elsewhere. Set False to debug eagerly everywhere.
COMPILE_ON_CUDA = True

# RMS of an AdamW step per unit learning rate (Liu et al. 2025, arXiv:2502.16982, Sec. 2.2):
# the learning-rate conversions between updates follow from it (module docstring).
ADAMW_UPDATE_RMS = 0.2

# The updates each kind of group may take (its ``algorithm``; the first is the default) and
# the keys each needs.
ALGORITHMS = {"adamw": ("adamw", "lion"), "muon": ("muon", "lion", "adamw", "galore_adamw")}
_REQUIRED_KEYS = {
    ("adamw", "adamw"): ("lr", "betas", "eps", "weight_decay"),
    ("adamw", "lion"): ("lr", "weight_decay"),
    ("muon", "muon"): ("lr", "momentum", "ns_steps", "beta2", "weight_decay"),
    ("muon", "lion"): ("lr", "weight_decay"),
    ("muon", "adamw"): ("lr", "betas", "eps", "weight_decay"),
    ("muon", "galore_adamw"): ("lr", "betas", "eps", "weight_decay"),
}

# dtype names a muon group's ``ortho_dtype`` may take (a string, so it survives the
# optimizer's state_dict through ``torch.load(weights_only=True)``).
ORTHO_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, fullgraph=True)


def algorithm(group: dict[str, Any]) -> str:
    """The update a group takes: its ``algorithm`` key, else its kind's default."""
    return group.get("algorithm") or ALGORITHMS[group["kind"]][0]


def group_variant(group: dict[str, Any]) -> dict[str, Any]:
    """What decides the layout and meaning of a group's saved state: its update, state dtype
    and GaLore rank (defaults filled in). A state saved under others is refused on load."""
    return {"algorithm": algorithm(group), "state_dtype": group.get("state_dtype", "fp32"),
            "galore_rank": group.get("galore_rank") if algorithm(group) == "galore_adamw" else None}


def matrix_lr_wd(group: dict[str, Any], shape: tuple[int, ...]) -> tuple[float, float]:
    """(lr, weight decay) of a matrix group of ``shape`` [..., m, n] under its algorithm
    (module docstring): Muon's ``lr * max(1, m/n)^0.5``; AdamW/GaLore's ``lr / (0.2 sqrt(n))``,
    Lion's that times ``lion_lr_scale``, both with the weight decay that keeps Muon's ``lr * wd``."""
    m, n = shape[-2], shape[-1]
    muon_lr = group["lr"] * max(1.0, m / n) ** 0.5
    algo = algorithm(group)
    if algo == "muon":
        return muon_lr, group["weight_decay"]
    lr = group["lr"] / (ADAMW_UPDATE_RMS * n**0.5)
    if algo == "lion":
        lr *= group["lion_lr_scale"]
    return lr, (muon_lr * group["weight_decay"] / lr if lr > 0 else 0.0)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (with Polar Express, NorMuon and cautious weight decay) and AdamW in one optimizer.

    ``param_groups`` is a list of dicts, each with ``kind`` and ``params`` plus:

    * ``kind="adamw"``: ``lr``, ``betas`` (beta1, beta2), ``eps``, ``weight_decay``.
      State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq``.
    * ``kind="muon"``: ``lr``, ``momentum``, ``ns_steps`` (1-5), ``beta2`` (NorMuon EMA),
      ``weight_decay``, optionally ``ortho_dtype`` ("bfloat16", the default, or "float32":
      the dtype of the Polar Express iteration). All params of the group must share one shape with at least two
      dims (the last two are the matrix, any leading dims a batch of matrices), dtype and
      device: the group is updated as one stacked tensor. Its state lives with the group's
      first parameter: ``momentum_buffer`` [N, *shape] and ``second_momentum_buffer``
      [N, ..., m, 1] (tall/square) or [N, ..., 1, n] (wide). The effective learning rate is
      ``lr * max(1, m / n) ** 0.5``, so tall matrices (fan-out > fan-in) take the larger
      step that keeps their per-element update RMS comparable (Keller Jordan's scaling);
      the cautious weight decay uses the same effective rate:
      ``p -= lr_eff * update + lr_eff * weight_decay * p * [update * p >= 0]``.

    Variants (module docstring, :mod:`rdn.optim.variants`), all optional:

    * ``algorithm``: ``"lion"`` for either kind (needs ``lr``, ``weight_decay``; takes
      ``lion_betas``, default (0.9, 0.99), and ``lion_lr_scale``, default 0.1; state
      ``exp_avg``); ``"adamw"`` or ``"galore_adamw"`` for a muon-kind group (needs ``betas``,
      ``eps``; GaLore takes ``galore_rank``, ``galore_update_proj_gap``, ``galore_scale``,
      defaults 128, 200, 0.25; state ``step``, ``exp_avg``, ``exp_avg_sq`` and, for matrices
      it projects, ``projector``: low-rank moments [N, ..., m, r] / [N, ..., r, n] and
      projector [N, ..., n, r] / [N, ..., m, r]).
    * ``state_dtype``: ``"fp32"`` (default: the parameters' dtype) or ``"int8"``: every
      moment of at least 4096 elements (counted over the whole group stack) 8-bit, as codes
      plus ``<name>_absmax`` (:mod:`rdn.optim.quant8`; signed map for momenta, unsigned for
      second moments). Projectors stay float32.

    Every group gets ``initial_lr`` (= ``lr``) unless it has one, so a schedule can set
    ``group["lr"] = group["initial_lr"] * multiplier``. Any other keys are kept untouched.
    Muon is for hidden matrices only; embeddings, the output head and 0/1-D params go in
    AdamW groups.

    ``compile``: ``None`` (default) compiles the step kernels for CUDA params when
    :data:`COMPILE_ON_CUDA` is true and runs them eager otherwise; ``True`` compiles on any
    device (CPU needs a C++ compiler; each distinct param shape costs one compilation);
    ``False`` never compiles.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], *, compile: bool | None = None):
        self._compile = compile
        super().__init__(list(param_groups), defaults={})
        # 0-D CPU float32 hyperparameters, filled in place before each kernel call.
        self._adamw_t = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd", "scale")}
        self._muon_t = {k: torch.tensor(0.0) for k in ("momentum", "lr", "wd", "beta2")}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        index = len(self.param_groups)
        kind = group.get("kind")
        if kind not in ALGORITHMS:
            raise ValueError(f"param group {index}: kind must be 'muon' or 'adamw' (got {kind!r})")
        algo = algorithm(group)
        if algo not in ALGORITHMS[kind]:
            raise ValueError(f"param group {index} ({kind}): algorithm must be one of {ALGORITHMS[kind]} "
                             f"(got {algo!r})")
        if group.get("state_dtype", "fp32") not in quant8.STATE_DTYPES:
            raise ValueError(f"param group {index} ({kind}): state_dtype must be one of {quant8.STATE_DTYPES} "
                             f"(got {group['state_dtype']!r})")
        missing = [k for k in ("params", *_REQUIRED_KEYS[kind, algo]) if k not in group]
        if missing:
            raise ValueError(f"param group {index} ({kind}): missing keys {missing}")
        if algo == "lion":
            group.setdefault("lion_betas", LION_BETAS)
            group.setdefault("lion_lr_scale", LION_LR_SCALE)
        if algo == "galore_adamw":
            for key, value in GALORE_DEFAULTS.items():
                group.setdefault(f"galore_{key}", value)
            if group["galore_rank"] < 1 or group["galore_update_proj_gap"] < 1:
                raise ValueError(f"param group {index} ({kind}): galore_rank and galore_update_proj_gap must be >= 1")
        if isinstance(group["params"], Tensor):
            group["params"] = [group["params"]]
        if kind == "muon":
            group["params"] = list(group["params"])
            group.setdefault("ortho_dtype", "bfloat16")
            self._check_muon_group(group, index)
        group.setdefault("initial_lr", group["lr"])
        super().add_param_group(group)

    @staticmethod
    def _check_muon_group(group: dict[str, Any], index: int) -> None:
        params = group["params"]
        if group["ortho_dtype"] not in ORTHO_DTYPES:
            raise ValueError(f"param group {index} (muon): ortho_dtype must be one of {sorted(ORTHO_DTYPES)} "
                             f"(got {group['ortho_dtype']!r})")
        if not 1 <= group.get("ns_steps", 5) <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"param group {index} (muon): ns_steps must be in [1, {len(POLAR_EXPRESS_COEFFS)}] "
                             f"(got {group['ns_steps']})")
        if not params:
            return
        first = params[0]
        if first.ndim < 2:
            raise ValueError(f"param group {index} (muon): params need >= 2 dims, got shape {tuple(first.shape)}; "
                             "put 0/1-D params in an adamw group")
        for p in params[1:]:
            if p.shape != first.shape or p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"param group {index} (muon): all params must share one shape, dtype and device "
                                 f"to be stacked; got {tuple(first.shape)}/{first.dtype}/{first.device} and "
                                 f"{tuple(p.shape)}/{p.dtype}/{p.device}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that:

        * every muon group keeps the ``ortho_dtype`` this optimizer was built with (torch
          would restore the saved one). The dtype is decided by whoever builds the optimizer:
          the trainer builds a resumed run's optimizer with the dtype recorded in its
          checkpoint, so the continuation is bit-identical; a bare state (or one saved before
          the option) simply takes the configured dtype;
        * a state saved under another variant (:func:`group_variant`: update, state dtype,
          GaLore rank) is refused, naming the group and key;
        * state tensors keep their saved dtype (torch casts every state tensor of a floating
          parameter to the parameter's dtype, which would turn 8-bit codes into floats)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            for i, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
                ours, theirs = group_variant(mine), group_variant(saved)
                for key, want in ours.items():
                    got = theirs[key]
                    if want != got:
                        raise ValueError(f"optimizer state of param group {i} ({mine['kind']}) was saved with "
                                         f"{key} {got!r}, this optimizer has {want!r}: a state resumes only under "
                                         "the optimizer variant it was trained with (params optim section)")
        own = [group.get("ortho_dtype") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, dtype in zip(self.param_groups, own):
            if group["kind"] == "muon":
                group["ortho_dtype"] = dtype
        for group, saved in zip(self.param_groups, saved_groups):
            for p, pid in zip(group["params"], saved["params"]):
                for key, value in state_dict["state"].get(pid, {}).items():
                    if isinstance(value, Tensor) and value.dtype != self.state[p][key].dtype:
                        self.state[p][key] = value.to(device=p.device, copy=True)

    def _kernel(self, fn: Callable, device: torch.device) -> Callable:
        if self._compile is None:
            compile = COMPILE_ON_CUDA and device.type == "cuda"
        else:
            compile = self._compile
        return _compiled(fn) if compile else fn

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)
        return loss

    # -- elementwise groups (kind="adamw": AdamW or Lion, one parameter at a time)
    def _step_adamw(self, group: dict[str, Any]) -> None:
        self._load_adamw_hparams(group)
        for p in group["params"]:
            if p.grad is not None:
                self._adamw_update(group, p, p, p.grad)

    def _load_adamw_hparams(self, group: dict[str, Any]) -> None:
        """Copy a kind="adamw" group's hyperparameters into the 0-D tensors the step kernel
        reads (Lion: its converted lr and weight decay, and its betas)."""
        t = self._adamw_t
        if algorithm(group) == "lion":
            scale = group["lion_lr_scale"]
            t["lr"].fill_(group["lr"] * scale)
            t["beta1"].fill_(group["lion_betas"][0])
            t["beta2"].fill_(group["lion_betas"][1])
            t["wd"].fill_(group["weight_decay"] / scale)
            return
        t["lr"].fill_(group["lr"])
        t["beta1"].fill_(group["betas"][0])
        t["beta2"].fill_(group["betas"][1])
        t["eps"].fill_(group["eps"])
        t["wd"].fill_(group["weight_decay"])

    def _adamw_update(self, group: dict[str, Any], p: Tensor, target: Tensor, grad: Tensor) -> None:
        """One step of ``target`` (``p`` itself, or the shard of it this rank owns), with the
        state kept under ``p``; hyperparameters from :meth:`_load_adamw_hparams`."""
        t = self._adamw_t
        state = self.state[p]
        int8 = quant8.wants_int8(group.get("state_dtype", "fp32"), p.numel())
        if algorithm(group) == "lion":
            if not state:
                self._init_state(state, "exp_avg", target, int8)
            m = quant8.load(state, "exp_avg", True, target.dtype)
            self._kernel(lion_step, p.device)(target, grad, m, t["lr"], t["beta1"], t["beta2"], t["wd"])
            quant8.store(state, "exp_avg", m, True)
            return
        if not state:
            state["step"] = 0
            self._init_state(state, "exp_avg", target, int8)
            self._init_state(state, "exp_avg_sq", target, int8)
        state["step"] += 1
        t["step"].fill_(state["step"])
        m = quant8.load(state, "exp_avg", True, target.dtype)
        v = quant8.load(state, "exp_avg_sq", False, target.dtype)
        self._kernel(adamw_step, p.device)(target, grad, m, v, t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"],
                                           t["wd"])
        quant8.store(state, "exp_avg", m, True)
        quant8.store(state, "exp_avg_sq", v, False)

    @staticmethod
    def _init_state(state: dict[str, Any], name: str, like: Tensor, int8: bool) -> None:
        if int8:
            quant8.init(state, name, tuple(like.shape), like.dtype, like.device, int8=True)
        else:
            state[name] = torch.zeros_like(like)

    # -- matrix groups (kind="muon": one stacked update per group)
    def _step_muon(self, group: dict[str, Any]) -> None:
        params: list[Tensor] = group["params"]
        with_grad = [p.grad is not None for p in params]
        if not any(with_grad):
            return
        if not all(with_grad):
            raise RuntimeError("MuonAdamW: a muon group is updated as one stack, so either every param in it "
                               "has a .grad or none does; move params that may lack gradients to their own group")
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        self._matrix_update(group, stacked_grads, stacked_params)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    def _matrix_update(self, group: dict[str, Any], grads: Tensor, stack: Tensor) -> None:
        """Update ``stack`` [rows, *shape] in place from ``grads`` (same shape, used as
        scratch): the group's whole stack, or the rows of it this rank owns (padded with zero
        matrices). State lives under the group's first parameter, ``rows`` deep; whether a
        state is 8-bit depends on its size over the group's N real matrices."""
        first = group["params"][0]
        shape = tuple(first.shape)
        rows, N = grads.shape[0], len(group["params"])
        state = self.state[first]
        sd = group.get("state_dtype", "fp32")
        algo = algorithm(group)
        lr, wd = matrix_lr_wd(group, shape)
        if algo == "muon":
            m, n = shape[-2], shape[-1]
            red_dim = -1 if m >= n else -2
            stat_shape = (*shape[:-1], 1) if red_dim == -1 else (*shape[:-2], 1, n)
            if not state:
                for name, s in (("momentum_buffer", shape), ("second_momentum_buffer", stat_shape)):
                    if quant8.wants_int8(sd, N * math.prod(s)):
                        quant8.init(state, name, (rows, *s), first.dtype, first.device, int8=True)
                    else:
                        state[name] = torch.zeros(rows, *s, dtype=first.dtype, device=first.device)
            t = self._muon_t
            t["momentum"].fill_(group["momentum"])
            t["lr"].fill_(lr)
            t["wd"].fill_(wd)
            t["beta2"].fill_(group["beta2"])
            mom = quant8.load(state, "momentum_buffer", True, first.dtype)
            sec = quant8.load(state, "second_momentum_buffer", False, first.dtype)
            self._kernel(muon_step, first.device)(grads, stack, mom, sec, t["momentum"], t["lr"], t["wd"],
                                                  t["beta2"], group["ns_steps"], red_dim,
                                                  ORTHO_DTYPES[group.get("ortho_dtype", "bfloat16")])
            quant8.store(state, "momentum_buffer", mom, True)
            quant8.store(state, "second_momentum_buffer", sec, False)
            return
        t = self._adamw_t
        t["lr"].fill_(lr)
        t["wd"].fill_(wd)
        if algo == "lion":
            t["beta1"].fill_(group["lion_betas"][0])
            t["beta2"].fill_(group["lion_betas"][1])
            if not state:
                self._init_matrix_state(state, "exp_avg", (rows, *shape), N, first, sd)
            mom = quant8.load(state, "exp_avg", True, first.dtype)
            self._kernel(lion_step, first.device)(stack, grads, mom, t["lr"], t["beta1"], t["beta2"], t["wd"])
            quant8.store(state, "exp_avg", mom, True)
            return
        t["beta1"].fill_(group["betas"][0])
        t["beta2"].fill_(group["betas"][1])
        t["eps"].fill_(group["eps"])
        low_rank = algo == "galore_adamw" and projects(shape, group["galore_rank"])
        moment_shape = low_rank_shape(shape, group["galore_rank"])[1] if low_rank else shape
        if not state:
            state["step"] = 0
            self._init_matrix_state(state, "exp_avg", (rows, *moment_shape), N, first, sd)
            self._init_matrix_state(state, "exp_avg_sq", (rows, *moment_shape), N, first, sd)
            if low_rank:
                proj_shape = low_rank_shape(shape, group["galore_rank"])[0]
                state["projector"] = torch.zeros(rows, *proj_shape, dtype=torch.float32, device=first.device)
        state["step"] += 1
        t["step"].fill_(state["step"])
        exp_avg = quant8.load(state, "exp_avg", True, first.dtype)
        exp_avg_sq = quant8.load(state, "exp_avg_sq", False, first.dtype)
        if low_rank:
            if (state["step"] - 1) % group["galore_update_proj_gap"] == 0:
                refresh_projector(grads, state["projector"])
            t["scale"].fill_(group["galore_scale"])
            self._kernel(galore_adamw_step, first.device)(stack, grads, state["projector"], exp_avg, exp_avg_sq,
                                                          t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"],
                                                          t["wd"], t["scale"])
        else:
            self._kernel(adamw_step, first.device)(stack, grads, exp_avg, exp_avg_sq, t["step"], t["lr"], t["beta1"],
                                                   t["beta2"], t["eps"], t["wd"])
        quant8.store(state, "exp_avg", exp_avg, True)
        quant8.store(state, "exp_avg_sq", exp_avg_sq, False)

    @staticmethod
    def _init_matrix_state(state: dict[str, Any], name: str, shape: tuple[int, ...], n_real: int, first: Tensor,
                           state_dtype: str) -> None:
        if quant8.wants_int8(state_dtype, n_real * math.prod(shape[1:])):
            quant8.init(state, name, shape, first.dtype, first.device, int8=True)
        else:
            state[name] = torch.zeros(shape, dtype=first.dtype, device=first.device)
