"""The GPT: nanochat's modern decoder plus RDN's hierarchical coordinate embeddings.

Architecture only (no training loop, data or checkpoint I/O). In the lineage of
karpathy/nanochat and modded-nanogpt:

- rotary position embeddings (RoFormer, arXiv:2104.09864), no learned positions;
- QK-norm and parameter-free RMSNorm (``F.rms_norm``) after the embedding, before every
  attention/MLP and before the head; no biases anywhere;
- grouped-query attention (GQA, arXiv:2305.13245) with per-layer sliding windows
  (``window_pattern`` tiled over depth, the last layer always full);
- ReLU² MLP (Primer, arXiv:2109.08668) with 4x hidden width;
- per-layer residual scalars ``x = resid_lambdas[i] * x + x0_lambdas[i] * x0`` (modded-nanogpt's
  x0 skip: every block sees the normalised embedding directly);
- value embeddings on alternating layers (ResFormer, arXiv:2410.17897), mixed into the values
  through a per-head input-dependent gate that is exactly 1 at init;
- untied ``wte``/``lm_head`` padded to ``vocab_pad_multiple`` rows; tanh logit soft cap (Gemma 2).

RDN mode (``use_coordinates=True``) adds one learned table per coordinate dimension to the token
embedding: ``x = wte(idx) + sum_d table_d(coords[..., d])`` with ``coords`` from
:mod:`rdn.coords`. ``use_coordinates=False`` is the plain GPT baseline: no coordinate
parameters at all. No activation is modified in place anywhere in the forward pass, so
autograd never finds a saved tensor changed under it (the seed's ``--gpt`` crash).

Variants, each a config section that is off by default (and then builds nothing: the model
is bitwise the plain one, same parameters, same random draws, same loss):

- ``moe`` -- DeepSeek MoE feed-forward layers after ``first_dense_layers`` (:mod:`rdn.model.moe`);
- ``mhc`` -- ``streams > 1`` residual streams mixed by manifold-constrained hyper-connections
  around each block's residual branch (:mod:`rdn.model.mhc`);
- ``mtp`` -- multi-token prediction heads trained with an extra loss (:mod:`rdn.model.mtp`);
- ``ternary`` -- BitNet b1.58 weights and 8-bit activations in the blocks' linear layers
  (:mod:`rdn.model.ternary`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from rdn.model.attention import KVCache, apply_rotary_emb, attention, rotary_tables
from rdn.model.mhc import HyperConnection, MHCConfig, collapse_streams, expand_streams
from rdn.model.moe import MoE, MoEConfig
from rdn.model.mtp import MTPConfig, MTPHead, shifted_targets
from rdn.model.ternary import TernaryConfig, TernaryLinear

ROTARY_HEADROOM = 4
"""Rotary tables cover ``ROTARY_HEADROOM * sequence_len`` positions, so KV-cache decoding may run
past the training length (coordinates there are clamped, see :meth:`GPT.coordinate_embedding`)."""
VE_GATE_CHANNELS = 32
"""The value-embedding gate reads only the first channels of its input (cheap, as in nanochat)."""


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, no learnable scale."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers carry a value embedding, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


# --------------------------------------------------------------------------- config

@dataclass
class GPTConfig:
    sequence_len: int = 512
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 2
    n_kv_head: int | None = None  # None = n_head (plain multi-head attention)
    n_embd: int = 256
    head_dim: int = 128
    window_pattern: str = "L"     # tiled over layers: L = full context, S = short window
    short_window: int | None = None  # None = sequence_len // 2
    use_coordinates: bool = True  # False = plain GPT baseline
    n_coord_dim: int = 8
    value_embeddings: bool = True
    logit_softcap: float = 15.0   # 0 disables
    vocab_pad_multiple: int = 64
    bos_token_id: int | None = None   # document boundary for the MTP targets (None = no boundaries)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    ternary: TernaryConfig = field(default_factory=TernaryConfig)

    VARIANTS = {"moe": MoEConfig, "mhc": MHCConfig, "mtp": MTPConfig, "ternary": TernaryConfig}

    def __post_init__(self):
        for name, cls in self.VARIANTS.items():  # dicts from a checkpoint's meta.json
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in fields(cls)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ValueError(f"invalid GPTConfig: unknown {name} keys {unknown}")
                setattr(self, name, cls(**value))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        problems = []
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                     "head_dim", "n_coord_dim", "vocab_pad_multiple"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings (got {self.head_dim})")
        if self.n_kv_head >= 1 and self.n_head % self.n_kv_head:
            problems.append(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            problems.append(f"window_pattern must be a non-empty string of 'S' and 'L' (got {self.window_pattern!r})")
        short = self.resolved_short_window
        if not 1 <= short <= self.sequence_len:
            problems.append(f"short_window must be in [1, sequence_len={self.sequence_len}] (got {short})")
        if self.logit_softcap < 0:
            problems.append(f"logit_softcap must be >= 0 (got {self.logit_softcap})")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    @classmethod
    def from_params(cls, model, vocab_size: int, n_coord_dim: int, bos_token_id: int | None = None) -> "GPTConfig":
        """From the validated ``model`` params section (:class:`rdn.config.ModelConfig`)."""
        variants = {name: kind(**getattr(model, name).model_dump()) for name, kind in cls.VARIANTS.items()}
        return cls(
            sequence_len=model.sequence_len, vocab_size=vocab_size, n_layer=model.depth,
            n_head=model.n_head, n_kv_head=model.n_kv_head or model.n_head, n_embd=model.width,
            head_dim=model.head_dim, window_pattern=model.window_pattern, short_window=model.short_window,
            use_coordinates=model.use_coordinates, n_coord_dim=n_coord_dim,
            value_embeddings=model.value_embeddings, logit_softcap=model.logit_softcap,
            vocab_pad_multiple=model.vocab_pad_multiple, bos_token_id=bos_token_id, **variants,
        )

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def resolved_short_window(self) -> int:
        return self.short_window if self.short_window is not None else self.sequence_len // 2

    def window_sizes(self) -> list[int]:
        """Keys each layer's query sees (itself included); ``sequence_len`` = full context.
        The pattern is tiled over the layers and the last layer is always full."""
        p = self.window_pattern
        sizes = [self.resolved_short_window if p[i % len(p)] == "S" else self.sequence_len
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return sizes


# --------------------------------------------------------------------------- blocks

def block_linear(config: GPTConfig):
    """The linear layer class of the transformer blocks: ``nn.Linear``, or
    :class:`~rdn.model.ternary.TernaryLinear` when ``ternary.enabled``."""
    if config.ternary.enabled:
        return functools.partial(TernaryLinear, activation_bits=config.ternary.activation_bits)
    return nn.Linear


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int, value_embedding: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, q_dim, kv_dim = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        linear = block_linear(config)
        self.c_q = linear(C, q_dim, bias=False)
        self.c_k = linear(C, kv_dim, bias=False)
        self.c_v = linear(C, kv_dim, bias=False)
        self.c_proj = linear(q_dim, C, bias=False)
        use_ve = (config.value_embeddings and has_value_embedding(layer_idx, config.n_layer)
                  if value_embedding is None else value_embedding)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, C), config.n_kv_head, bias=False) if use_ve else None

    def forward(self, x, ve, cos, sin, window, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual; gate in (0, 2), one per kv head, 1 at init (zero weights).
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q = norm(apply_rotary_emb(q, cos, sin)).to(v.dtype)
        k = norm(apply_rotary_emb(k, cos, sin)).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        key_mask = None
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            key_mask = kv_cache.key_mask(k.size(2))
        y = attention(q, k, v, window, key_mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        linear = block_linear(config)
        self.c_fc = linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Attention then feed-forward, each a pre-norm residual branch. The feed-forward is a
    :class:`~rdn.model.moe.MoE` on the layers ``moe.applies_to`` (never in an MTP head's
    block, ``dense=True``)."""

    def __init__(self, config: GPTConfig, layer_idx: int, value_embedding: bool | None = None, dense: bool = False):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, value_embedding)
        self.mlp = MoE(config.n_embd, config.moe) if config.moe.applies_to(layer_idx) and not dense else MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))

    def branch(self, x, ve, cos, sin, window, kv_cache):
        """``forward(x) - x`` as the sum of the two branch outputs (what a hyper-connection
        writes back to the streams)."""
        a = self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return a + self.mlp(norm(x + a))


# --------------------------------------------------------------------------- model

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V, C, L = config.padded_vocab_size, config.n_embd, config.n_layer
        # Per-layer attention window for the dispatch; full layers are None (unbounded) so
        # decoding past sequence_len with a KV cache still sees the whole context there.
        self.layer_windows = [None if w >= config.sequence_len else w for w in config.window_sizes()]
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(L)])
        self.lm_head = nn.Linear(C, V, bias=False)
        # Variants (None when off: nothing is built, so the plain model is unchanged).
        self.hyper = (nn.ModuleList([HyperConnection(C, config.mhc.streams, config.mhc.sinkhorn_iters)
                                     for _ in range(L)]) if config.mhc.enabled else None)
        self.mtp = (nn.ModuleList([MTPHead(C, Block(config, L + k, value_embedding=False, dense=True))
                                   for k in range(config.mtp.num_future)]) if config.mtp.enabled else None)
        self.mtp_losses: list[torch.Tensor] = []   # the last training forward's per-head losses (detached)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(V, kv_dim)
            for i in range(L) if config.value_embeddings and has_value_embedding(i, L)
        })
        if config.use_coordinates:
            # All n_coord_dim tables stacked: table d is rows d*sequence_len .. (d+1)*sequence_len-1.
            # Built from zeros so construction draws no random numbers (see init_weights).
            rows = config.n_coord_dim * config.sequence_len
            self.coord_embed = nn.Embedding(rows, C, _weight=torch.zeros(rows, C))
            self.register_buffer("coord_offsets", torch.arange(config.n_coord_dim) * config.sequence_len,
                                 persistent=False)
        else:
            self.coord_embed = None
        self.rotary_len = ROTARY_HEADROOM * config.sequence_len
        cos, sin = rotary_tables(self.rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._warned_coords = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer (also usable after ``to_empty`` from meta).

        wte, value embeddings  normal, std 1 (value embeddings match the unit scale of
                               ``c_v(norm(x))`` they are added to)
        lm_head                normal, std 0.001 (near-uniform prediction at init)
        c_q, c_k, c_v, c_fc    uniform, bound sqrt(3)/sqrt(n_embd) (std 1/sqrt(n_embd), no outliers)
        attn/mlp c_proj        zeros: every block starts as the identity
        ve_gate                zeros: gate = 2*sigmoid(0) = 1
        resid_lambdas          1.0 (plain residual)
        x0_lambdas             0.1 (a small direct path from the embedding, nanochat's current value)
        coordinate tables      zeros: an RDN model starts as exactly the GPT baseline with the same
                               seed (the tables draw no random numbers). Zero rows still learn at
                               once: their gradient is the embedding's gradient, distinct per row.
        Every random draw comes from the global generator in a fixed order, so
        ``torch.manual_seed(s); GPT(cfg)`` is reproducible.
        """
        s = 3**0.5 * self.config.n_embd**-0.5
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            self._init_block(block, s)
        for ve in self.value_embeds.values():
            nn.init.normal_(ve.weight, mean=0.0, std=1.0)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        if self.coord_embed is not None:
            nn.init.zeros_(self.coord_embed.weight)
            self.coord_offsets = torch.arange(self.config.n_coord_dim, device=self.wte.weight.device) \
                * self.config.sequence_len
        self.cos, self.sin = rotary_tables(self.rotary_len, self.config.head_dim, device=self.wte.weight.device)
        # Variant modules draw after everything above, so the shared parts start as the plain model's.
        if self.hyper is not None:
            for hc in self.hyper:
                hc.init_weights()
        if self.mtp is not None:
            for head in self.mtp:
                # proj: uniform with std 1/sqrt(fan_in) like the blocks' input matrices
                nn.init.uniform_(head.proj.weight, -(3 ** 0.5) * (2 * self.config.n_embd) ** -0.5,
                                 (3 ** 0.5) * (2 * self.config.n_embd) ** -0.5)
                self._init_block(head.block, s)

    @staticmethod
    def _init_block(block: Block, s: float) -> None:
        """c_q, c_k, c_v, c_fc uniform(-s, s) in this order; output projections and the
        value-embedding gate zero (the block starts as the identity); an MoE draws its own."""
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            nn.init.uniform_(lin.weight, -s, s)
        if isinstance(block.mlp, MoE):
            block.mlp.init_weights(s)
        else:
            nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(block.attn.c_proj.weight)
        if block.attn.ve_gate is not None:
            nn.init.zeros_(block.attn.ve_gate.weight)

    def get_device(self) -> torch.device:
        return self.wte.weight.device

    # ----------------------------------------------------------------------- forward

    def coordinate_embedding(self, coords: torch.Tensor) -> torch.Tensor:
        """``sum_d table_d[coords[..., d]]`` as ``[..., n_embd]`` for coords ``[..., n_coord_dim]``.

        The ``n_coord_dim`` tables of ``sequence_len`` rows are one stacked weight, table ``d``
        at rows ``d * sequence_len + c``; a single ``F.embedding_bag(mode="sum")`` over the rows
        ``d * sequence_len + coords[..., d]`` is therefore exactly the per-dimension-table sum,
        computed without materialising a ``[B, T, n_coord_dim, n_embd]`` tensor.
        Coordinates are clamped to ``[0, sequence_len - 1]`` instead of checked, which would cost
        a host sync per step; a per-depth counter only reaches ``sequence_len`` when decoding
        past the training length, and then shares the last row."""
        n = self.config.n_coord_dim
        rows = coords.long().clamp(0, self.config.sequence_len - 1) + self.coord_offsets
        out = F.embedding_bag(rows.reshape(-1, n), self.coord_embed.weight, mode="sum")
        return out.view(*coords.shape[:-1], out.size(-1))

    def _embed(self, idx: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        x = self.wte(idx)
        if self.coord_embed is None:
            if coords is not None and not self._warned_coords:
                warnings.warn("GPT mode (use_coordinates=False): the coords argument is ignored", stacklevel=3)
                self._warned_coords = True
            return x
        n = self.config.n_coord_dim
        if coords is None:
            raise ValueError(
                "RDN mode (use_coordinates=True): hierarchical coordinates are required, pass "
                f"coords=LongTensor[B, T, {n}] for these tokens, e.g. "
                "rdn.coords.CoordinateCalculator(deltas, bos_id, n_dim)(idx) or "
                "rdn.coords.hierarchical_coordinates(idx, deltas, bos_id, n_dim); "
                "with a KV cache pass the coordinates of the new tokens only")
        if coords.shape != (*idx.shape, n):
            raise ValueError(f"coords must have shape {(*idx.shape, n)} = idx shape + (n_coord_dim,) "
                             f"(got {tuple(coords.shape)})")
        return x + self.coordinate_embedding(coords)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean") -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` (float32) if ``targets`` is None, else the cross-entropy
        (``ignore_index=-1``): a scalar for ``"mean"``/``"sum"``, ``[B, T]`` for ``"none"``.

        With ``kv_cache``, ``idx`` are the tokens at positions ``kv_cache.pos ..`` (rotary offset
        accordingly; they attend to the cached prefix) and the cache advances by ``T``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T] token ids (got shape {tuple(idx.shape)})")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none' (got {loss_reduction!r})")
        B, T = idx.shape
        t0 = 0
        if kv_cache is not None:
            if kv_cache.batch_size != B or kv_cache.n_layer != self.config.n_layer:
                raise ValueError(f"KV cache holds batch {kv_cache.batch_size} x {kv_cache.n_layer} layers; "
                                 f"this call has batch {B} and the model {self.config.n_layer} layers")
            t0 = kv_cache.pos
        if t0 + T > self.rotary_len:
            raise ValueError(f"position {t0 + T} exceeds the rotary table ({self.rotary_len} = "
                             f"{ROTARY_HEADROOM} x sequence_len)")
        cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]

        x = norm(self._embed(idx, coords))
        x0 = x
        if self.hyper is None:
            for i, block in enumerate(self.blocks):
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
                x = block(x, ve, cos, sin, self.layer_windows[i], kv_cache)
        else:  # mHC: n residual streams, each block's branch read and written through its hyper-connection
            xs = expand_streams(x, self.config.mhc.streams)
            x0s = x0.unsqueeze(-2)
            for i, block in enumerate(self.blocks):
                xs = self.resid_lambdas[i] * xs + self.x0_lambdas[i] * x0s
                ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
                xs = self.hyper[i](xs, functools.partial(block.branch, ve=ve, cos=cos, sin=sin,
                                                         window=self.layer_windows[i], kv_cache=kv_cache))
            x = collapse_streams(xs)
        if kv_cache is not None:
            kv_cache.advance(T)
        hidden = x
        logits = self._logits(norm(x))
        if targets is None:
            return logits
        V = self.config.vocab_size
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            return loss.view(B, T)
        if self.training and loss_reduction == "mean":
            extra = self._extra_losses(idx, targets, coords, hidden, cos, sin)
            if isinstance(extra, torch.Tensor):
                loss = loss + extra
        return loss

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of the real vocabulary from normed hidden states, soft-capped."""
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _extra_losses(self, idx, targets, coords, hidden, cos, sin) -> torch.Tensor | float:
        """The variants' training-loss terms, added to a training forward's mean loss: MoE's
        sequence-wise balance loss and the weighted MTP loss. ``0.0`` (a float: the main loss
        stays bitwise untouched) when no variant adds one."""
        extra: torch.Tensor | float = 0.0
        for block in self.blocks:
            aux = getattr(block.mlp, "aux_loss", None)
            if aux is not None:
                extra = extra + aux
        if self.mtp is not None:
            extra = extra + self._mtp_loss(idx, targets, coords, hidden, cos, sin)
        return extra

    def _mtp_loss(self, idx, targets, coords, hidden, cos, sin) -> torch.Tensor | float:
        """``loss_weight * sum_k w_k L_k`` over the MTP heads (normalised weights); every
        ``L_k`` is kept detached in :attr:`mtp_losses`. With ``loss_weight == 0`` the heads run
        without a graph, for the record only, and ``0.0`` is returned."""
        cfg = self.config.mtp
        grad = cfg.loss_weight > 0 and torch.is_grad_enabled()
        V = self.config.vocab_size
        self.mtp_losses = []
        total: torch.Tensor | float = 0.0
        with torch.set_grad_enabled(grad):
            h = hidden if grad else hidden.detach()
            for k, (head, w) in enumerate(zip(self.mtp, cfg.normalised_weights()), start=1):
                inputs, tgt = shifted_targets(idx, targets, k, self.config.bos_token_id)
                coords_k = None
                if coords is not None and self.coord_embed is not None:
                    coords_k = torch.zeros_like(coords)
                    if k < coords.size(1):
                        coords_k[:, :coords.size(1) - k] = coords[:, k:]
                emb = self._embed(inputs, coords_k)
                h = head(h, emb, lambda blk, x: blk(x, None, cos, sin, None, None))
                logits = self._logits(norm(h))
                n = (tgt != -1).sum().clamp(min=1)
                loss_k = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-1, reduction="sum") / n
                self.mtp_losses.append(loss_k.detach())
                total = total + w * loss_k
        return cfg.loss_weight * total if grad else 0.0

    # ----------------------------------------------------------------------- variant hooks

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimizer step: MoE's bias-based load balancing."""
        for moe in self.moe_layers():
            moe.update_bias()

    def variant_metrics(self) -> dict[str, float]:
        """The variants' own metrics of the last step (MLflow and the step line): MoE's
        ``moe/load_cv`` (mean over MoE layers) and ``moe/max_load`` (max over them), and the
        MTP heads' ``train/mtp_loss_{k}``. Empty for the plain model."""
        out: dict[str, float] = {}
        stats = [m.stats() for m in self.moe_layers()]
        stats = [s for s in stats if s]
        if stats:
            out["moe/load_cv"] = sum(s["load_cv"] for s in stats) / len(stats)
            out["moe/max_load"] = max(s["max_load"] for s in stats)
        for k, loss in enumerate(self.mtp_losses, start=1):
            out[f"train/mtp_loss_{k}"] = float(loss)
        return out

    # ----------------------------------------------------------------------- accounting

    def _block_matmul_params(self, block: Block) -> tuple[int, int]:
        """(total, active per token) weights of a block used as matmuls."""
        if isinstance(block.mlp, MoE):
            total, active = block.mlp.matmul_params()
            attn = sum(p.numel() for p in block.attn.parameters())
            return attn + total, attn + active
        n = sum(p.numel() for p in block.parameters())
        return n, n

    def estimate_flops(self) -> int:
        """Training FLOPs per token (forward + backward), nanochat's MFU formula (PaLM, arXiv:2204.02311).

        ``6 * matmul_params`` -- 2 FLOPs per weight forward, 4 backward -- over every block matrix
        (c_q, c_k, c_v, c_proj, c_fc, mlp c_proj and the tiny ve_gate, which is a real matmul) and the
        padded lm_head (the rows actually multiplied). Lookups (wte, value embeddings, coordinate
        tables) and the per-layer scalars are not matmuls and are left out. Attention adds
        ``12 * n_head * head_dim * min(window, sequence_len)`` per layer (QK^T and AV, fwd + bwd).

        Variants: an MoE layer counts its router, shared expert and ``top_k`` routed experts
        (the weights one token is multiplied by); mHC adds its coefficient projections; each
        MTP head adds its projection, its block (with full-context attention) and one more
        pass through the lm_head."""
        cfg = self.config
        matmul = sum(self._block_matmul_params(b)[1] for b in self.blocks) + self.lm_head.weight.numel()
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in cfg.window_sizes())
        if self.hyper is not None:
            matmul += sum(hc.matmul_params() for hc in self.hyper)
        if self.mtp is not None:
            for head in self.mtp:
                matmul += head.proj.weight.numel() + self._block_matmul_params(head.block)[1]
                matmul += self.lm_head.weight.numel()
                attn += 12 * cfg.n_head * cfg.head_dim * cfg.sequence_len
        return 6 * matmul + attn

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group (scaling-law studies pick which to count). ``total`` is
        every parameter; ``active`` leaves out the routed experts a token does not use (equal
        to ``total`` without MoE)."""
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "coord_embeds": self.coord_embed.weight.numel() if self.coord_embed is not None else 0,
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.blocks.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        if self.hyper is not None:
            counts["hyper_connections"] = sum(p.numel() for p in self.hyper.parameters())
        if self.mtp is not None:
            counts["mtp_heads"] = sum(p.numel() for p in self.mtp.parameters())
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "parameter groups miss a parameter"
        inactive = sum(t - a for t, a in (self._block_matmul_params(b) for b in self.blocks))
        counts["active"] = counts["total"] - inactive
        return counts

    # ----------------------------------------------------------------------- optimizer

    def optimizer_param_groups(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.3,
                               matrix_lr: float = 0.02, scalar_lr: float = 0.5, weight_decay: float = 0.0,
                               adam_betas: tuple[float, float] = (0.8, 0.95),
                               ortho_dtype: str = "bfloat16") -> list[dict]:
        """Parameter groups for :class:`rdn.optim.MuonAdamW`.

        AdamW (eps 1e-10, no weight decay): lm_head at ``unembedding_lr * scale``; wte, value
        embeddings and coordinate tables at ``embedding_lr * scale`` with ``scale =
        (n_embd / 768) ** -0.5`` (LRs were tuned at width 768); ``resid_lambdas`` at
        ``scalar_lr * 0.01`` (as nanochat: they multiply the whole residual stream, so they move
        slowly); ``x0_lambdas`` at ``scalar_lr`` with betas (0.96, 0.95). Muon: every block matrix
        (ve_gate included), one group per shape in sorted shape order, since Muon orthogonalises
        same-shaped matrices as one stacked batch, orthogonalised in ``ortho_dtype``. Empty
        groups are left out."""
        scale = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas=tuple(adam_betas)):
            return dict(kind="adamw", params=list(params), lr=lr, betas=betas, eps=1e-10, weight_decay=0.0)

        experts = [p for m in self.moe_layers() for p in m.expert_parameters()]
        experts_adamw = self.config.moe.expert_optimizer == "adamw"
        hyper_matrices = [p for hc in self.hyper for p in hc.muon_parameters()] if self.hyper is not None else []
        hyper_ids = {id(p) for p in hyper_matrices}
        groups = [
            adamw(self.lm_head.parameters(), unembedding_lr * scale),
            adamw(self.wte.parameters(), embedding_lr * scale),
            adamw(self.value_embeds.parameters(), embedding_lr * scale),
            adamw(self.coord_embed.parameters() if self.coord_embed is not None else [], embedding_lr * scale),
            adamw([self.resid_lambdas], scalar_lr * 0.01),
            adamw([self.x0_lambdas], scalar_lr, betas=(0.96, 0.95)),
            # MoE with expert_optimizer: adamw -- the seed's choice, experts treated like embeddings
            adamw(experts if experts_adamw else [], embedding_lr * scale),
            # mHC's gating factors and static biases: logits of sigmoids and Sinkhorn, moved slowly
            # like the residual scalars
            adamw([p for p in self.hyper.parameters() if id(p) not in hyper_ids] if self.hyper is not None else [],
                  scalar_lr * 0.01),
        ]

        def muon(params):
            # One group per shape, in sorted shape order: Muon orthogonalises a group as one stacked
            # batch (a 3-D expert tensor: each expert's matrix on its own).
            for shape in sorted({tuple(p.shape) for p in params}):
                groups.append(dict(kind="muon", params=[p for p in params if tuple(p.shape) == shape],
                                   lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay,
                                   ortho_dtype=ortho_dtype))

        expert_ids = {id(p) for p in experts} if experts_adamw else set()
        muon([p for p in self.blocks.parameters() if id(p) not in expert_ids] + hyper_matrices)
        if self.mtp is not None:
            # The MTP heads in groups of their own: with mtp.loss_weight 0 they get no gradient,
            # and a Muon group steps all of its params or none.
            muon(list(self.mtp.parameters()))
        groups = [g for g in groups if g["params"]]
        seen = [id(p) for g in groups for p in g["params"]]
        assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in self.parameters()}, \
            "every parameter must be in exactly one optimizer group"
        return groups

    def setup_optimizer(self, **kwargs):
        """``MuonAdamW`` over :meth:`optimizer_param_groups` (same keyword arguments)."""
        from rdn.optim import MuonAdamW
        return MuonAdamW(self.optimizer_param_groups(**kwargs))
