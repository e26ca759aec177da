"""CUDA paths (bf16 autocast, torch.compile, compiled coordinates, FA3 dispatch); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from rdn.coords import CoordinateCalculator, hierarchical_coordinates
from rdn.model import GPT, GPTConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _config(**kw) -> GPTConfig:
    base = dict(sequence_len=256, vocab_size=1000, n_layer=2, n_head=2, n_kv_head=2, n_embd=256, head_dim=128,
                window_pattern="SL", short_window=64, use_coordinates=True, n_coord_dim=4, value_embeddings=True,
                logit_softcap=15.0, vocab_pad_multiple=64)
    base.update(kw)
    return GPTConfig(**base)


def test_compiled_coordinates_on_cuda_match_cpu():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randint(-2, 3, (500,), generator=g)
    ids = torch.randint(0, 500, (8, 1024), generator=g)
    calc = CoordinateCalculator(deltas, bos_id=0, n_dim=8)
    assert torch.equal(calc(ids.cuda()).cpu(), hierarchical_coordinates(ids, deltas, 0, 8))


def test_bf16_cuda_forward_matches_fp32_cpu_and_trains_compiled():
    torch.manual_seed(0)
    model = GPT(_config())
    model.init_weights()
    ids = torch.randint(1, 1000, (2, 257))
    coords = hierarchical_coordinates(ids, torch.zeros(1000, dtype=torch.long), 0, 4)
    x, y, c = ids[:, :-1], ids[:, 1:], coords[:, :-1]
    with torch.no_grad():
        ref = model(x, y, coords=c).item()
    model.cuda()
    compiled = torch.compile(model, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(x.cuda(), y.cuda(), coords=c.cuda())
    assert abs(loss.item() - ref) < 0.05
    opt = model.setup_optimizer()
    first = None
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x.cuda(), y.cuda(), coords=c.cuda())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.5
