"""Blockwise 8-bit quantisation (rdn.optim.quant8) against a plain reference.

Oracles: the code tables written out here from the dynamic-tree description (decade e holds
2^(b-1-e) linearly spaced values), a per-block loop that picks each element's code by
argmin over the table, and the round-trip bound derived in the module docstring: half the
widest gap between adjacent codes times the block's absmax (0.9/128 for signed states:
absmax/142.2, tighter than absmax/127; 0.9/256 for unsigned ones).
"""

from __future__ import annotations

import math

import pytest
import torch

from rdn.optim import quant8
from rdn.optim.quant8 import BLOCK, dequantize, dynamic_map, max_half_gap, quantize


def reference_table(signed: bool) -> torch.Tensor:
    bits = 7 if signed else 8
    mags = [10.0 ** -e * (0.1 + 0.9 * j / 2 ** (bits - 1 - e)) for e in range(bits)
            for j in range(1, 2 ** (bits - 1 - e) + 1)]
    vals = sorted(set([0.0] + mags + ([-m for m in mags] if signed else [])))
    return torch.tensor(vals, dtype=torch.float64)


def reference_roundtrip(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per block of 256: divide by the absmax, take the nearest table value (argmin), multiply back."""
    table = reference_table(signed)
    flat = x.reshape(-1).double()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK):
        block = flat[start:start + BLOCK]
        absmax = block.abs().max()
        if absmax == 0:
            out[start:start + BLOCK] = 0
            continue
        normed = block / absmax
        idx = (normed[:, None] - table[None, :]).abs().argmin(dim=1)
        if not signed:
            idx = torch.where((idx == 0) & (normed > 0), torch.ones_like(idx), idx)
        out[start:start + BLOCK] = table[idx] * absmax
    return out.reshape(x.shape)


def wide_range(shape, seed: int, signed: bool = True) -> torch.Tensor:
    """Values over ten decades, so every part of the map is used."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.empty(shape).uniform_(-23, 0, generator=gen))
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_tables_are_the_dynamic_tree_maps(signed):
    values = dynamic_map(signed)
    assert len(values) == (255 if signed else 256)
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), reference_table(signed), rtol=1e-12, atol=0)
    assert values[-1] == 1.0 and 0.0 in values
    if signed:
        assert values[0] == -1.0 and values == [-v for v in reversed(values)]
        assert min(v for v in values if v > 0) == pytest.approx(1e-6)
    else:
        assert values[0] == 0.0 and values[1] == pytest.approx(1e-7)
    # the widest gap is in the top decade: 0.9 / 64 (signed), 0.9 / 128 (unsigned)
    assert max_half_gap(signed) == pytest.approx(0.9 / (128 if signed else 256))
    if signed:
        assert max_half_gap(signed) < 1 / 127


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(3, 300), (256,), (17,), (4, 5, 64)])
def test_round_trip_matches_the_reference_and_the_bound(signed, shape):
    x = wide_range(shape, seed=sum(shape), signed=signed)
    codes, absmax = quantize(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(x.numel() / BLOCK),)
    y = dequantize(codes, absmax, signed)
    ref = reference_roundtrip(x, signed)
    # equal to the argmin reference up to float32 rounding of x / absmax (a tie may go either way)
    close = (y.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-30
    ties = ~close
    assert ties.float().mean() < 1e-3
    # the bound: half the widest gap times the block's absmax
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, absmax.numel() * BLOCK - x.numel())).view(-1, BLOCK)
    block_max = blocks.abs().amax(1).repeat_interleave(BLOCK)[:x.numel()].reshape(x.shape)
    err = (x - y).abs()
    assert (err <= max_half_gap(signed) * block_max * (1 + 1e-6)).all(), (err / block_max).max().item()
    torch.testing.assert_close(absmax, block_max.reshape(-1)[::BLOCK].float()[:absmax.numel()], rtol=0, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_zeros_stay_zero_signs_are_kept_and_absmax_is_exact(signed):
    x = wide_range((5, 256), seed=3, signed=signed)
    x[0] = 0.0                     # an all-zero block
    x[1, ::3] = 0.0                # zeros among nonzeros
    y = dequantize(*quantize(x, signed), signed)
    assert not y[0].any() and not y[1, ::3].any()
    assert ((y == 0) | (torch.sign(y) == torch.sign(x))).all()     # never flipped
    big = x.abs() >= 1e-6 * x.abs().amax(dim=1, keepdim=True)     # at least the smallest code
    assert (torch.sign(y[big]) == torch.sign(x[big])).all()        # kept wherever representable
    rows = x.abs().argmax(dim=1)
    assert torch.equal(y[torch.arange(5), rows], x[torch.arange(5), rows])
    if not signed:  # a positive second moment never becomes zero
        assert ((x > 0) <= (y > 0)).all()


def test_quantized_bytes_and_size_threshold():
    assert quant8.quantized_bytes(4096) == 4096 + 4 * 16
    assert quant8.quantized_bytes(4097) == 4097 + 4 * 17
    assert not quant8.wants_int8("int8", 4095) and quant8.wants_int8("int8", 4096)
    assert not quant8.wants_int8("fp32", 10**9)
    with pytest.raises(ValueError, match="state_dtype"):
        quant8.wants_int8("int4", 10**9)


def test_load_store_round_trip_through_state():
    state: dict = {}
    quant8.init(state, "m", (64, 80), torch.float32, torch.device("cpu"), int8=True)
    assert state["m"].dtype == torch.uint8 and state["m_absmax"].shape == (20,)
    work = quant8.load(state, "m", True, torch.float32)
    assert not work.any()
    x = wide_range((64, 80), seed=5)
    work.copy_(x)
    quant8.store(state, "m", work, True)
    torch.testing.assert_close(quant8.load(state, "m", True, torch.float32), dequantize(*quantize(x, True), True),
                               rtol=0, atol=0)
    plain = {"m": torch.ones(3)}
    assert quant8.load(plain, "m", True, torch.float32) is plain["m"]  # float state: the tensor itself
