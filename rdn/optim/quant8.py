"""8-bit optimizer states: blockwise absmax quantisation with a dynamic (non-linear) code map.

After Dettmers, Lewis, Shleifer, Zettlemoyer 2022, "8-bit Optimizers via Block-wise
Quantization" (arXiv:2110.02861), written here from the paper's description (no
bitsandbytes: it is CUDA-centric, this runs wherever torch does).

**Blocks.** A state tensor is flattened and cut into blocks of :data:`BLOCK` = 256
consecutive elements (the last one shorter). Each block keeps its absolute maximum
(float32) and one uint8 code per element: the index of the code value nearest to
``x / absmax`` in a sorted table. An outlier therefore only coarsens its own 256
neighbours. A sharded state (:class:`~rdn.optim.dist.DistMuonAdamW`) is quantised per
shard, its blocks starting at the shard's first element.

**The maps** (:func:`dynamic_map`) are dynamic-tree maps: a code's leading zero bits
choose a decade ``10^-e`` and the bits after the first one choose a linear fraction in it.
Decade ``e`` holds ``2^(b-1-e)`` values ``10^-e * (0.1 + 0.9 j / 2^(b-1-e))``,
``j = 1 .. 2^(b-1-e)``, for ``b`` magnitude bits:

* **signed** (momenta; ``b = 7`` plus a sign): 127 magnitudes in decades 0..6, from 1e-6
  to 1, mirrored, and 0: 255 values, symmetric, with 0 and +-1 exact;
* **unsigned** (second moments; ``b = 8``): 255 magnitudes in decades 0..7, from 1e-7 to 1,
  and 0: 256 values.

Values are spaced linearly inside each decade, so the gaps grow with the value: the widest
is the top decade's, ``0.9 / 64 = 0.0140625`` (signed) and ``0.9 / 128 = 0.00703125``
(unsigned). Rounding to the nearest code, the **round-trip error** of an element is at most
half the widest gap times its block's absmax::

    |x - dequantize(quantize(x))| <= absmax / 142.2   (signed:   0.00703125 absmax)
    |x - dequantize(quantize(x))| <= absmax / 284.4   (unsigned: 0.003515625 absmax)

(up to float32 rounding of ``x / absmax``), tighter than a linear int8 map's absmax / 127
gap near the top and far finer near zero, where a linear map's smallest step (1/127 of
the absmax) would flush most of a block's second moments to zero. Zero maps to zero, a
block's absmax element is exact, and a sign is never flipped (a signed value smaller than
half the smallest code, 5e-7 absmax, becomes 0).

One exception keeps AdamW and NorMuon safe: an unsigned (second-moment) value that is
positive is never rounded to 0 but at least to the smallest code, 1e-7 absmax (an error of
at most 1e-7 absmax, inside the bound). A second moment flushed to zero under a nonzero
first moment would divide it by ``eps`` (1e-10 here) and blow that weight up.

:func:`load` / :func:`store` run an optimizer's float step on 8-bit state: dequantise
into a float32 work tensor, update it, quantise it back; a float state passes straight
through (the fp32 path is unchanged bit for bit). State ``name`` of an 8-bit tensor is
stored as ``state[name]`` (uint8 codes, the tensor's shape) and ``state[name +
"_absmax"]`` (float32, one per block): ``numel + 4 * ceil(numel / 256)`` bytes instead of
``4 * numel``, i.e. 74.6 % less. Tensors under :data:`MIN_NUMEL` = 4096 elements stay
float32 (their share of the memory is negligible and they include the most sensitive
scalars); the size that decides is the whole state's, unsharded, so every rank and a
single process decide alike.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 256
MIN_NUMEL = 4096
ABSMAX_SUFFIX = "_absmax"
STATE_DTYPES = ("fp32", "int8")


def dynamic_map(signed: bool) -> list[float]:
    """The sorted code values (module docstring): 255 for ``signed``, 256 otherwise."""
    bits = 7 if signed else 8
    mags = []
    for e in range(bits):
        n = 2 ** (bits - 1 - e)
        mags += [10.0 ** -e * (0.1 + 0.9 * j / n) for j in range(1, n + 1)]
    mags = sorted(mags)
    values = ([-m for m in reversed(mags)] if signed else []) + [0.0] + mags
    assert len(values) == (255 if signed else 256) and values == sorted(values)
    return values


def max_half_gap(signed: bool) -> float:
    """Half the widest gap between adjacent code values: the round-trip error bound per unit absmax."""
    v = dynamic_map(signed)
    return max(b - a for a, b in zip(v, v[1:])) / 2


@functools.cache
def _table(signed: bool, device: torch.device) -> Tensor:
    """The code values as a float32 tensor on ``device``."""
    return torch.tensor(dynamic_map(signed), dtype=torch.float64).float().to(device)


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def quantized_bytes(numel: int) -> int:
    """Bytes of an 8-bit state of ``numel`` elements: codes plus one float32 absmax per block."""
    return numel + 4 * num_blocks(numel)


def quantize(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``x`` -> (uint8 codes shaped like ``x``, float32 absmax [ceil(numel / 256)])."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    nb = num_blocks(n)
    pad = nb * BLOCK - n
    blocks = (F.pad(flat, (0, pad)) if pad else flat).view(nb, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / scale[:, None]).clamp_(-1.0, 1.0)
    k = _nearest_magnitude(normed.abs(), signed)
    idx = (127 + torch.where(normed < 0, -k, k)) if signed else k
    codes = idx.to(torch.uint8).reshape(-1)[:n].reshape(x.shape)
    return codes, absmax


_LUT_SHIFT = 12  # float32 bits kept: sign, 8 exponent, 11 mantissa (buckets 2^-11 = 0.05 % wide)


@functools.cache
def _nearest_tables(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Look-up tables for :func:`_nearest_magnitude`: per float32 bucket of [0, 1] (the top 20
    bits of the float), how many midpoints between adjacent magnitudes lie below the bucket's
    first value; and the midpoints themselves (with a sentinel). An unsigned map's first
    midpoint is 0, so every positive value takes at least the smallest code."""
    mags = torch.tensor([v for v in dynamic_map(signed) if v >= 0], dtype=torch.float64)  # 0 first
    mids = ((mags[1:] + mags[:-1]) / 2).float()
    if not signed:
        mids[0] = 0.0
    edges = (torch.arange((0x3F800000 >> _LUT_SHIFT) + 2, dtype=torch.int32) << _LUT_SHIFT).view(torch.float32)
    below = torch.searchsorted(mids, edges)  # midpoints < each bucket's first value
    # the buckets (relative width 2^-11) are far narrower than the gaps (>= 0.7 % relative):
    # at most one midpoint per bucket, so one comparison finishes the search
    assert int((below[1:] - below[:-1]).max()) <= 1
    return below[:-1].to(torch.int32).to(device), torch.cat([mids, torch.tensor([2.0])]).to(device)


def _nearest_magnitude(y: Tensor, signed: bool) -> Tensor:
    """Index k of the nearest code to each ``y`` in [0, 1] among 0 (k = 0) and the sorted
    positive magnitudes (k >= 1); ties go to the smaller. A table look-up on the float's top
    bits and one comparison with the next midpoint (:func:`_nearest_tables`), about three
    times faster than a binary search (``torch.bucketize``) on CPU, with the same result."""
    lut, mids = _nearest_tables(signed, y.device)
    k = lut[y.view(torch.int32) >> _LUT_SHIFT]
    return k + (y > mids[k]).to(k.dtype)


def dequantize(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Codes and block absmaxes -> the values (shape of ``codes``) in ``dtype``."""
    values = _table(signed, codes.device)
    n = codes.numel()
    nb = absmax.numel()
    flat = values[codes.reshape(-1).long()]
    pad = nb * BLOCK - n
    flat = (F.pad(flat, (0, pad)) if pad else flat).view(nb, BLOCK) * absmax[:, None]
    return flat.reshape(-1)[:n].reshape(codes.shape).to(dtype)


# --------------------------------------------------------------------------- optimizer state helpers

def wants_int8(state_dtype: str, full_numel: int) -> bool:
    """Whether a state of ``full_numel`` elements (the whole state, unsharded and unpadded) is 8-bit."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES} (got {state_dtype!r})")
    return state_dtype == "int8" and full_numel >= MIN_NUMEL


def init(state: dict[str, Any], name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
         int8: bool) -> None:
    """A zero state ``name``: float (``dtype``) or 8-bit (zero codes and absmaxes)."""
    if int8:
        numel = math.prod(shape)
        state[name] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state[name + ABSMAX_SUFFIX] = torch.zeros(num_blocks(numel), dtype=torch.float32, device=device)
    else:
        state[name] = torch.zeros(shape, dtype=dtype, device=device)


def is_int8(state: dict[str, Any], name: str) -> bool:
    return name + ABSMAX_SUFFIX in state


def load(state: dict[str, Any], name: str, signed: bool, dtype: torch.dtype) -> Tensor:
    """The state as a float tensor to update in place: the stored tensor itself when float,
    a dequantised float32 (``dtype``) work copy when 8-bit (write it back with :func:`store`)."""
    if not is_int8(state, name):
        return state[name]
    return dequantize(state[name], state[name + ABSMAX_SUFFIX], signed, dtype)


def store(state: dict[str, Any], name: str, value: Tensor, signed: bool) -> None:
    """Write an updated work tensor back (a no-op for a float state, updated in place)."""
    if not is_int8(state, name):
        return
    codes, absmax = quantize(value, signed)
    state[name].copy_(codes)
    state[name + ABSMAX_SUFFIX].copy_(absmax)
