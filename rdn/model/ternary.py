"""Ternary weights: BitNet b1.58 (Ma et al., "The Era of 1-bit LLMs", arXiv:2402.17764).

A :class:`TernaryLinear` keeps a full-precision master weight ``W`` (what the optimizer updates)
and multiplies with its quantised version in the forward pass:

- weights, one absmean scale per matrix: ``s = max(mean|W|, eps)``,
  ``W_q = clamp(round(W / s), -1, 1)``; the matmul sees ``W_q * s``, so every weight is one of
  ``{-s, 0, +s}`` (log2(3) = 1.58 bits of information);
- activations, absmax per token (per row of the last dimension) to ``b`` bits, as in BitNet
  (Wang et al., arXiv:2310.11453): ``Q = 2^(b-1) - 1``, ``a = max(max|x|, eps)``,
  ``x_q = clamp(round(x * Q / a), -Q-1, Q) / Q * a``.

Both use the straight-through estimator (Bengio et al., arXiv:1308.3432): the backward pass
treats quantisation as the identity, so the gradient w.r.t. ``W`` (or ``x``) is that of a plain
linear layer evaluated at ``W_q * s`` (or ``x_q``). It is written ``q.detach() + (v - v.detach())``
rather than the usual ``v + (q - v).detach()``: same gradient, but the forward value is exactly
``q`` (``v - v`` is exactly 0 for finite ``v``, while ``v + (q - v)`` may round away from ``q``
by an ulp), which is what lets a packed export reproduce the training-time forward bit for bit.
Quantisation runs in float32 whatever the input dtype (bf16 autocast included) and has no
data-dependent Python control flow, so it traces under ``torch.compile``.

:func:`pack_ternary` / :func:`unpack_ternary` store ternary codes at 2 bits per weight, four to
a byte; a frozen :class:`TernaryLinear` (:meth:`TernaryLinear.freeze_`) computes from such codes
and their float32 scale directly (never re-deriving the scale from ``W_q * s``, whose absmean
differs from ``s``). ``rdn export --format ternary`` (:mod:`rdn.cli.export`) writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_EPS = 1e-5
"""Lower bound of the weight scale ``mean|W|`` (an all-zero matrix quantises to zeros)."""
ACTIVATION_EPS = 1e-5
"""Lower bound of a token's ``max|x|`` (an all-zero row stays zero)."""
TERNARY_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
"""The linears of every transformer block that are ternary when ``model.ternary.enabled``
(``blocks.<i>.<name>``); the value-embedding gate, embeddings and lm_head stay full precision."""


def _check_bits(bits, name: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{name} must be an integer in [2, 16] (got {bits!r})")


@dataclass
class TernaryConfig:
    """``model.ternary``: BitNet b1.58 weights in the transformer blocks."""

    enabled: bool = False
    activation_bits: int = 8     # per-token absmax activation quantisation, 2..16 bits

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"invalid TernaryConfig: enabled must be a bool (got {self.enabled!r})")
        try:
            _check_bits(self.activation_bits, "activation_bits")
        except ValueError as e:
            raise ValueError(f"invalid TernaryConfig: {e}") from None


# --------------------------------------------------------------------------- quantisers

def ternary_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean quantisation: ``(codes, scale)`` with ``scale = max(mean|w|, eps)``
    (float32, 0-D) and ``codes = clamp(round(w / scale), -1, 1)`` (int8, ``w``'s shape), so
    ``codes * scale`` is the quantised weight. Computed in float32; nothing carries a gradient."""
    wf = w.detach().float()
    scale = wf.abs().mean().clamp(min=WEIGHT_EPS)
    codes = (wf / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale


def activation_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token absmax fake quantisation to ``bits`` bits (BitNet): each row of the last
    dimension becomes ``clamp(round(x * Q / a), -Q-1, Q) / Q * a`` with ``Q = 2^(bits-1) - 1``,
    ``a = max(max|row|, eps)``. Computed in float32, returned in ``x``'s dtype, with a
    straight-through (identity) gradient."""
    _check_bits(bits, "bits")
    Q = 2 ** (bits - 1) - 1
    xf = x.detach().float()
    a = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ACTIVATION_EPS)
    xq = ((xf * Q / a).round().clamp(-Q - 1, Q) / Q * a).to(x.dtype)
    return xq + (x - x.detach())


# --------------------------------------------------------------------------- the layer

class TernaryLinear(nn.Linear):
    """``nn.Linear`` whose forward multiplies ``activation_quantize(x)`` by the ternary weight
    ``W_q * s`` (module docstring); the master ``weight`` stays full precision and receives the
    straight-through gradient. Constructed exactly like ``nn.Linear`` (same parameters, same
    random draws in ``reset_parameters``), so a model may initialise ``.weight`` as usual.

    :meth:`freeze_` swaps the master weight for fixed codes and scale (an exported model): the
    state dict then holds ``weight_codes`` (int8) and ``weight_scale`` (float32, 0-D) instead of
    ``weight``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, activation_bits: int = 8,
                 device=None, dtype=None):
        _check_bits(activation_bits, "activation_bits")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation_bits = activation_bits
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_scale", None)

    @property
    def frozen(self) -> bool:
        return self.weight is None

    @torch.no_grad()
    def freeze_(self, codes: torch.Tensor, scale: torch.Tensor) -> "TernaryLinear":
        """Drop the master weight; compute from ``codes`` (int8 in {-1, 0, 1}, shape
        ``[out, in]``) and ``scale`` (float32 scalar) from now on, on ``codes``' device."""
        shape = (self.out_features, self.in_features)
        if tuple(codes.shape) != shape:
            raise ValueError(f"ternary codes must have shape {shape} (got {tuple(codes.shape)})")
        if codes.dtype != torch.int8 or not ((codes >= -1) & (codes <= 1)).all():
            raise ValueError(f"ternary codes must be int8 in {{-1, 0, 1}} (got {codes.dtype})")
        if scale.numel() != 1 or scale.dtype != torch.float32:
            raise ValueError(f"ternary scale must be one float32 (got {scale.dtype} of shape {tuple(scale.shape)})")
        self.weight = None
        self.weight_codes = codes.clone()
        self.weight_scale = scale.detach().reshape(()).to(codes.device).clone()
        return self

    def quantized_weight(self) -> torch.Tensor:
        """``W_q * s`` (exactly; float32, or the master weight's dtype) with the straight-through
        gradient to the master weight; for a frozen layer, ``codes * scale``."""
        if self.weight is None:
            return self.weight_codes.float() * self.weight_scale
        codes, scale = ternary_quantize(self.weight)
        wq = (codes.float() * scale).to(self.weight.dtype)
        return wq + (self.weight - self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(activation_quantize(x, self.activation_bits), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation_bits={self.activation_bits}{', frozen' if self.frozen else ''}"


# --------------------------------------------------------------------------- 2-bit packing

_SHIFTS = (0, 2, 4, 6)


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Ternary values (any shape, any integer or float dtype holding exactly -1, 0, 1) as a 1-D
    uint8 tensor of ``ceil(numel / 4)`` bytes: flattened row-major, weight ``i`` is the code
    ``q + 1`` in bits ``2 * (i % 4)`` of byte ``i // 4``; the unused bits of the last byte are 0."""
    flat = q.reshape(-1)
    if not ((flat == -1) | (flat == 0) | (flat == 1)).all():
        raise ValueError("pack_ternary: values must be -1, 0 or 1")
    n = flat.numel()
    codes = torch.zeros(4 * math.ceil(n / 4), dtype=torch.int32, device=flat.device)
    codes[:n] = flat.to(torch.int32) + 1
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=flat.device)
    return (codes.view(-1, 4) << shifts).sum(dim=1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 in {-1, 0, 1} of ``shape``."""
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(n / 4):
        raise ValueError(f"unpack_ternary: expected {math.ceil(n / 4)} uint8 bytes (1-D) for shape "
                         f"{tuple(shape)}, got {packed.dtype} of shape {tuple(packed.shape)}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    codes = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 3).reshape(-1)[:n]
    if (codes == 3).any():
        raise ValueError("unpack_ternary: code 0b11 is not a ternary value (corrupt data)")
    return (codes - 1).to(torch.int8).reshape(shape)
