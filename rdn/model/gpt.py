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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rdn.model.attention import KVCache, apply_rotary_emb, attention, rotary_tables

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

    def __post_init__(self):
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
    def from_params(cls, model, vocab_size: int, n_coord_dim: int) -> "GPTConfig":
        """From the validated ``model`` params section (:class:`rdn.config.ModelConfig`)."""
        return cls(
            sequence_len=model.sequence_len, vocab_size=vocab_size, n_layer=model.depth,
            n_head=model.n_head, n_kv_head=model.n_kv_head or model.n_head, n_embd=model.width,
            head_dim=model.head_dim, window_pattern=model.window_pattern, short_window=model.short_window,
            use_coordinates=model.use_coordinates, n_coord_dim=n_coord_dim,
            value_embeddings=model.value_embeddings, logit_softcap=model.logit_softcap,
            vocab_pad_multiple=model.vocab_pad_multiple,
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

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, q_dim, kv_dim = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(C, q_dim, bias=False)
        self.c_k = nn.Linear(C, kv_dim, bias=False)
        self.c_v = nn.Linear(C, kv_dim, bias=False)
        self.c_proj = nn.Linear(q_dim, C, bias=False)
        use_ve = config.value_embeddings and has_value_embedding(layer_idx, config.n_layer)
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
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


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
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.normal_(ve.weight, mean=0.0, std=1.0)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        if self.coord_embed is not None:
            nn.init.zeros_(self.coord_embed.weight)
            self.coord_offsets = torch.arange(self.config.n_coord_dim, device=self.wte.weight.device) \
                * self.config.sequence_len
        self.cos, self.sin = rotary_tables(self.rotary_len, self.config.head_dim, device=self.wte.weight.device)

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
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.layer_windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)

        V = self.config.vocab_size
        logits = self.lm_head(x)[..., :V].float()
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    # ----------------------------------------------------------------------- accounting

    def estimate_flops(self) -> int:
        """Training FLOPs per token (forward + backward), nanochat's MFU formula (PaLM, arXiv:2204.02311).

        ``6 * matmul_params`` -- 2 FLOPs per weight forward, 4 backward -- over every block matrix
        (c_q, c_k, c_v, c_proj, c_fc, mlp c_proj and the tiny ve_gate, which is a real matmul) and the
        padded lm_head (the rows actually multiplied). Lookups (wte, value embeddings, coordinate
        tables) and the per-layer scalars are not matmuls and are left out. Attention adds
        ``12 * n_head * head_dim * min(window, sequence_len)`` per layer (QK^T and AV, fwd + bwd)."""
        cfg = self.config
        assert all(p.dim() == 2 for p in self.blocks.parameters())
        matmul = sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in cfg.window_sizes())
        return 6 * matmul + attn

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group (scaling-law studies pick which to count)."""
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "coord_embeds": self.coord_embed.weight.numel() if self.coord_embed is not None else 0,
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.blocks.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "parameter groups miss a parameter"
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

        groups = [
            adamw(self.lm_head.parameters(), unembedding_lr * scale),
            adamw(self.wte.parameters(), embedding_lr * scale),
            adamw(self.value_embeds.parameters(), embedding_lr * scale),
            adamw(self.coord_embed.parameters() if self.coord_embed is not None else [], embedding_lr * scale),
            adamw([self.resid_lambdas], scalar_lr * 0.01),
            adamw([self.x0_lambdas], scalar_lr, betas=(0.96, 0.95)),
        ]
        matrices = list(self.blocks.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                               lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay,
                               ortho_dtype=ortho_dtype))
        groups = [g for g in groups if g["params"]]
        seen = [id(p) for g in groups for p in g["params"]]
        assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in self.parameters()}, \
            "every parameter must be in exactly one optimizer group"
        return groups

    def setup_optimizer(self, **kwargs):
        """``MuonAdamW`` over :meth:`optimizer_param_groups` (same keyword arguments)."""
        from rdn.optim import MuonAdamW
        return MuonAdamW(self.optimizer_param_groups(**kwargs))
