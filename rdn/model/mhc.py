"""mHC: manifold-constrained hyper-connections around a residual branch.

DeepSeek's mHC (arXiv:2512.24880), built on Hyper-Connections (HC, arXiv:2409.19606): the
residual stream widens to ``n`` streams, ``x_l`` is ``[n, C]`` per token, and each layer updates

    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

with ``F`` the layer's residual branch, ``H_pre`` ``[n]`` reading the block input out of the
streams, ``H_post`` ``[n]`` writing the block output back to them, and ``H_res`` ``[n, n]``
mixing the streams. All three are computed per token, in float32, from the RMS-normalised
flattened streams ``x' = x_l.flatten() / rms(x_l.flatten())`` (paper eqs. 14-19)::

    H_pre  = sigmoid(alpha_pre  * (phi_pre  x') + b_pre)             in (0, 1)^n
    H_post = 2 sigmoid(alpha_post * (phi_post x') + b_post)          in (0, 2)^n
    H_res  = Sinkhorn(alpha_res * mat(phi_res x') + b_res)           doubly stochastic

``phi = [phi_pre; phi_post; phi_res]`` is one ``[n^2 + 2n, n C]`` matrix (one matmul), the
gating factors ``alpha`` are three learnable scalars initialised at 0.01 (the paper's value),
the ``b`` are static learnable biases. The RMSNorm has no scale of its own (as everywhere in
:mod:`rdn.model.gpt`; a scale would fold into ``phi``). Sinkhorn-Knopp projects ``exp`` of its
logits onto the Birkhoff polytope (to within its 20 iterations: see :func:`sinkhorn`), so
products of ``H_res`` over depth stay doubly stochastic, spectral norm <= 1: unlike HC's free
``H_res``, the composite residual map can neither blow up nor vanish (the paper's fix for HC's
instability at scale).

Initialisation (:meth:`HyperConnection.init_weights`) makes the layer the plain residual
``x + F(x)`` when the streams are equal, which :func:`expand_streams` makes them:
``H_pre = 1/n`` (the block reads the stream mean), ``H_post = 1`` (every stream gets
``F``) and ``H_res`` = ``0.95 I + 0.05 / (n - 1) (J - I)`` exactly (near the identity HC starts
from, which the doubly-stochastic constraint cannot reach). The dynamic part adds
``alpha * phi x'`` ~ 1e-2 to the logits; it is what breaks the symmetry between streams
(with ``phi = 0`` and stream-symmetric biases the streams would stay equal forever).

No tensor is modified in place anywhere (the seed's mHC crashed in backward: "one of the
variables needed for gradient computation has been modified by an inplace operation").
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

MAX_STREAMS = 16
ALPHA_INIT = 0.01
"""Gating factor init of the dynamic coefficients (the paper's value)."""
RES_INIT_DIAG = 0.95
"""Diagonal of ``H_res`` at init (off-diagonal ``(1 - RES_INIT_DIAG) / (n - 1)``)."""


@dataclass
class MHCConfig:
    """``model.mhc``: ``streams`` = n (1 = off: the plain residual, no mHC module built)."""
    streams: int = 1
    sinkhorn_iters: int = 20

    def __post_init__(self):
        problems = []
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) \
                or not 1 <= self.streams <= MAX_STREAMS:
            problems.append(f"streams must be an integer in [1, {MAX_STREAMS}] (got {self.streams!r})")
        if isinstance(self.sinkhorn_iters, bool) or not isinstance(self.sinkhorn_iters, int) \
                or self.sinkhorn_iters < 1:
            problems.append(f"sinkhorn_iters must be an integer >= 1 (got {self.sinkhorn_iters!r})")
        if problems:
            raise ValueError("invalid MHCConfig: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.streams > 1


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp (arXiv:2512.24880 eq. 19): ``[..., n, n]`` logits -> near-doubly-stochastic.

    ``M = exp(logits - max)`` (the shift cancels in the normalisation and keeps ``exp`` finite),
    then ``iters`` times: divide every row by its sum, then every column by its sum. Ending on
    the column step makes the column sums 1 to rounding; the row sums converge linearly, fast
    for well-spread logits, slowly for peaked or nearly diagonal ones (standard normal * 3
    logits, n = 4: median row error 2e-4, worst ~5e-2 after 20 iterations; the spectral norm
    is at most sqrt(max row sum), Schur's test). Exact column sums are the marginal that
    matters here: ``mean_i (H_res x)_i = mean_j x_j`` exactly, so the stream mean that
    :func:`collapse_streams` reads keeps an exact identity path, and the backward map
    ``H_res^T`` is row-stochastic (convex combinations: gradients cannot grow through it).
    Half-precision input is computed (and returned) in float32; no in-place ops."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1 (got {iters})")
    if logits.dim() < 2 or logits.size(-1) != logits.size(-2):
        raise ValueError(f"logits must be [..., n, n] (got shape {tuple(logits.shape)})")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    tiny = torch.finfo(logits.dtype).tiny  # a row or column underflowing to 0 stays 0, not NaN
    m = (logits - logits.detach().amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(tiny)
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(tiny)
    return m


def expand_streams(x: Tensor, n: int) -> Tensor:
    """``[..., C]`` -> ``[..., n, C]``: ``n`` equal copies (a real tensor, not an expand view)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.size(-1)).contiguous()


def collapse_streams(xs: Tensor) -> Tensor:
    """``[..., n, C]`` -> ``[..., C]``: the mean over streams.

    The mean, not HC's sum: on equal streams (:func:`expand_streams`, the init) it is exactly
    the plain residual stream, so the model reads out ``x + sum_l F_l`` at its usual scale, and
    it is the quantity the column-exact ``H_res`` conserves. The final RMSNorm is
    scale-invariant, so the logits are those of the sum either way."""
    return xs.mean(dim=-2)


def _float32_context(device: torch.device):
    """Autocast off (when on) so that the coefficients and the stream mixing keep their dtype."""
    on = torch.is_autocast_enabled(device.type)
    return torch.autocast(device_type=device.type, enabled=False) if on else nullcontext()


def hyper_update(xs: Tensor, branch: Callable[[Tensor], Tensor], h_pre: Tensor, h_post: Tensor,
                 h_res: Tensor) -> Tensor:
    """``x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)`` for given coefficients.

    ``xs`` ``[..., n, C]``; ``h_pre``, ``h_post`` ``[..., n]``; ``h_res`` ``[..., n, n]`` with
    ``(H_res x)_i = sum_j H_res[i, j] x_j``. The coefficients are cast to the stream dtype and
    the mixing runs with autocast off (a bf16 matmul would round the residual stream every
    layer); ``branch`` runs under the caller's autocast."""
    dt = xs.dtype
    with _float32_context(xs.device):
        x_in = (h_pre.to(dt).unsqueeze(-2) @ xs).squeeze(-2)                    # [..., C]
    y = branch(x_in)
    with _float32_context(xs.device):
        return h_res.to(dt) @ xs + h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)


class HyperConnection(nn.Module):
    """One mHC layer around a residual branch (the lead wraps a whole transformer block).

    Parameters: ``phi`` ``[n^2 + 2n, n * n_embd]`` (rows: pre, post, res row-major), ``alpha``
    ``[3]`` (pre, post, res), ``bias_pre`` ``[n]``, ``bias_post`` ``[n]``, ``bias_res``
    ``[n, n]``. ``streams == 1`` is refused: that is the plain residual, build no module."""

    def __init__(self, n_embd: int, streams: int, sinkhorn_iters: int):
        super().__init__()
        if not 2 <= streams <= MAX_STREAMS:
            raise ValueError(f"streams must be in [2, {MAX_STREAMS}] (got {streams}); "
                             "streams == 1 is the plain residual: build no HyperConnection")
        if n_embd < 1 or sinkhorn_iters < 1:
            raise ValueError(f"n_embd and sinkhorn_iters must be >= 1 (got {n_embd}, {sinkhorn_iters})")
        self.n_embd, self.streams, self.sinkhorn_iters = n_embd, streams, sinkhorn_iters
        n = streams
        # Empty, then init_weights: construction draws exactly what init_weights draws.
        self.phi = nn.Parameter(torch.empty(n * n + 2 * n, n * n_embd))
        self.alpha = nn.Parameter(torch.empty(3))
        self.bias_pre = nn.Parameter(torch.empty(n))
        self.bias_post = nn.Parameter(torch.empty(n))
        self.bias_res = nn.Parameter(torch.empty(n, n))
        self.init_weights()

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, streams={self.streams}, sinkhorn_iters={self.sinkhorn_iters}"

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (also after ``to_empty`` from meta); one random draw.

        phi        uniform, bound sqrt(3 / (n * n_embd)): std 1/sqrt(nC), so ``phi x'`` has unit
                   scale and ``alpha`` alone sets the dynamic part's size. The only random
                   draw, from the global generator, so ``torch.manual_seed`` reproduces it.
        alpha      0.01 (arXiv:2512.24880): coefficients start near their static values.
        bias_pre   -log(n - 1): H_pre = sigmoid = 1/n, the block reads the mean of the streams
                   (on equal streams: x itself). HC picks one stream per layer instead, which a
                   sigmoid cannot reach exactly and which needs the layer index.
        bias_post  0: H_post = 2 sigmoid(0) = 1, every stream receives F(x).
        bias_res   0 on the diagonal, log(0.05 / (0.95 (n - 1))) off it: exp of it has equal row
                   and column sums, so Sinkhorn returns exactly 0.95 I + 0.05/(n-1) (J - I).
                   Near HC's identity, yet not saturated: the off-diagonal entries still get
                   gradient, and the 2nd eigenvalue (0.95 n - 1)/(n - 1) keeps Sinkhorn's
                   convergence at 20 iterations usable (it slows as H_res nears I).
        With equal streams (:func:`expand_streams`) and alpha = 0 the layer is exactly
        ``x + F(x)`` per stream (to float rounding); alpha = 0.01 perturbs it by ~1%."""
        n, C = self.streams, self.n_embd
        bound = math.sqrt(3.0 / (n * C))
        nn.init.uniform_(self.phi, -bound, bound)
        self.alpha.fill_(ALPHA_INIT)
        self.bias_pre.fill_(-math.log(n - 1))
        self.bias_post.zero_()
        off = math.log((1.0 - RES_INIT_DIAG) / (RES_INIT_DIAG * (n - 1)))
        eye = torch.eye(n, dtype=torch.bool, device=self.bias_res.device)
        self.bias_res.copy_(torch.where(eye, 0.0, off))

    def coefficients(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``xs`` ``[..., n, C]`` -> ``H_pre`` ``[..., n]``, ``H_post`` ``[..., n]``, ``H_res``
        ``[..., n, n]``, per token, all in float32 with autocast off (float64 for float64
        streams, so tests can compare against exact references)."""
        n, C = self.streams, self.n_embd
        if xs.shape[-2:] != (n, C):
            raise ValueError(f"xs must be [..., {n}, {C}] (got shape {tuple(xs.shape)})")
        ct = torch.promote_types(xs.dtype, torch.float32)
        with _float32_context(xs.device):
            flat = F.rms_norm(xs.reshape(*xs.shape[:-2], n * C).to(ct), (n * C,))
            h = F.linear(flat, self.phi.to(ct))                                  # [..., n^2 + 2n]
            a = self.alpha.to(ct)
            pre, post, res = h.split([n, n, n * n], dim=-1)
            h_pre = torch.sigmoid(a[0] * pre + self.bias_pre.to(ct))
            h_post = 2 * torch.sigmoid(a[1] * post + self.bias_post.to(ct))
            res = a[2] * res.unflatten(-1, (n, n)) + self.bias_res.to(ct)
            h_res = sinkhorn(res, self.sinkhorn_iters)
        return h_pre, h_post, h_res

    def forward(self, xs: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """``xs`` ``[..., n, C]`` -> ``[..., n, C]``; ``branch`` maps ``[..., C]`` -> ``[..., C]``."""
        return hyper_update(xs, branch, *self.coefficients(xs))

    def muon_parameters(self) -> list[nn.Parameter]:
        """``phi``: a 2-D projection like any block matrix. ``alpha`` and the biases are not."""
        return [self.phi]

    def matmul_params(self) -> int:
        """Weights multiplied per token: ``phi``, ``(n^2 + 2n) n C``. The stream mixing itself
        (``H_pre x``, ``H_res x``, ``H_post^T y``: ``(n^2 + 2n) C`` multiply-adds per token,
        1/n of ``phi``'s) multiplies activations, not weights, and is not counted here."""
        return self.phi.numel()
