"""rdn.model.ternary and ``rdn export --format ternary``: BitNet b1.58 quantisers checked against
hand computations, straight-through gradients against a plain linear layer at the quantised
point, 2-bit packing round trips, and a packed export that reloads to bitwise-equal logits."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from rdn.model.ternary import (TernaryConfig, TernaryLinear, activation_quantize, pack_ternary, ternary_quantize,
                               unpack_ternary)
from tests.conftest import torch_threads

# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("bits", [1, 17, 0, True, 8.0])
def test_config_refuses_bad_activation_bits(bits):
    with pytest.raises(ValueError, match="activation_bits"):
        TernaryConfig(enabled=True, activation_bits=bits)
    with pytest.raises(ValueError, match="activation_bits"):
        TernaryLinear(4, 4, activation_bits=bits)


def test_config_defaults_and_range():
    assert TernaryConfig() == TernaryConfig(enabled=False, activation_bits=8)
    for bits in (2, 16):
        assert TernaryConfig(enabled=True, activation_bits=bits).activation_bits == bits
    with pytest.raises(ValueError, match="enabled"):
        TernaryConfig(enabled="yes")


# --------------------------------------------------------------------------- quantisers

def test_weight_quantization_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.1],
                      [2.0, 0.0, -0.3]])
    # mean|W| = (0.5 + 1 + 0.1 + 2 + 0 + 0.3) / 6 = 0.65
    # W / 0.65 = [[0.77, -1.54, 0.15], [3.08, 0, -0.46]] -> round, clamp to [-1, 1]
    codes, scale = ternary_quantize(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert codes.tolist() == [[1, -1, 0], [1, 0, 0]]
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == pytest.approx(0.65, rel=1e-6)
    # the layer multiplies by exactly codes * scale: every weight is one of {-s, 0, +s}
    lin = TernaryLinear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(w)
    wq = lin.quantized_weight()
    assert torch.equal(wq, codes.float() * scale)
    assert set(wq.flatten().tolist()) <= {-scale.item(), 0.0, scale.item()}
    # an all-zero matrix: scale clamped at eps, all codes 0; bf16 weights are quantised in fp32
    z_codes, z_scale = ternary_quantize(torch.zeros(3, 4))
    assert z_scale.item() == pytest.approx(1e-5) and not z_codes.any()
    b_codes, b_scale = ternary_quantize(w.bfloat16())
    assert b_codes.tolist() == codes.tolist() and b_scale.dtype == torch.float32


def test_activation_quantization_by_hand():
    x = torch.tensor([[1.0, -0.4, 0.25, 0.1],
                      [0.0, 0.0, 0.0, 0.0],
                      [-2.0, 0.9, 0.3, 0.0]])
    # 4 bits: Q = 7; per row a = max|x|; x_q = round(x * 7 / a) / 7 * a
    #   row 0: a = 1, x * 7 = [7, -2.8, 1.75, 0.7]  -> [7, -3, 2, 1] / 7
    #   row 1: all zero stays zero (a clamped at eps)
    #   row 2: a = 2, x * 3.5 = [-7, 3.15, 1.05, 0] -> [-7, 3, 1, 0] * 2 / 7
    want = torch.tensor([[7, -3, 2, 1], [0, 0, 0, 0], [-14, 6, 2, 0]]) / 7
    xq = activation_quantize(x, 4)
    torch.testing.assert_close(xq, want, rtol=1e-6, atol=0)
    # values on the per-token grid: x_q * Q / a is an integer in [-Q-1, Q]
    for bits in (2, 3, 8, 16):
        Q = 2 ** (bits - 1) - 1
        y = torch.randn(5, 3, 24) * torch.rand(5, 3, 1) * 10
        a = y.abs().amax(-1, keepdim=True)
        steps = activation_quantize(y, bits) * Q / a
        torch.testing.assert_close(steps, steps.round(), rtol=1e-6, atol=1e-4)
        assert steps.abs().max() <= Q + 1e-3
        assert (activation_quantize(y, bits) - y).abs().max() <= (a / Q / 2 * (1 + 1e-5)).max()
    # same dtype out; the per-token max itself is exact
    xb = x.bfloat16()
    assert activation_quantize(xb, 8).dtype == torch.bfloat16
    assert activation_quantize(x, 8)[:, 0].tolist() == x[:, 0].tolist()


# --------------------------------------------------------------------------- straight-through gradients

def test_straight_through_gradient_is_plain_linear_at_the_quantised_point():
    """With STE, y = W_q x_q and dL/dW := dL/dW_q = g^T x_q, dL/dx := dL/dx_q = g W_q; so both
    gradients equal a plain nn.Linear's evaluated with weight W_q * s on input x_q."""
    torch.manual_seed(0)
    lin = TernaryLinear(6, 5, activation_bits=8)
    x = torch.randn(2, 3, 6, requires_grad=True)
    g = torch.randn(2, 3, 5)
    (lin(x) * g).sum().backward()

    codes, scale = ternary_quantize(lin.weight)
    plain = nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        plain.weight.copy_(codes.float() * scale)
    xq = activation_quantize(x.detach(), 8).requires_grad_(True)
    (plain(xq) * g).sum().backward()

    torch.testing.assert_close(lin.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xq.grad, rtol=1e-6, atol=1e-6)
    # and by hand: g^T x_q summed over tokens
    torch.testing.assert_close(lin.weight.grad, g.reshape(-1, 5).T @ xq.detach().reshape(-1, 6),
                               rtol=1e-6, atol=1e-6)
    # the forward is exactly the quantised product (x + (q - x).detach() would be off by ulps)
    assert torch.equal(lin(x), F.linear(activation_quantize(x, 8), codes.float() * scale))


def test_bf16_autocast_and_compile_without_graph_breaks():
    torch.manual_seed(0)
    lin = TernaryLinear(16, 8, activation_bits=8)
    x = torch.randn(2, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and torch.isfinite(lin.weight.grad).all()
    # fullgraph=True fails on any graph break (data-dependent Python control flow)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    x2 = x.detach().requires_grad_(True)
    compiled(x2).sum().backward()
    assert torch.equal(compiled(x2), lin(x2))


def test_construction_draws_like_nn_linear():
    torch.manual_seed(3)
    a, after_a = nn.Linear(7, 5, bias=False), torch.rand(1)
    torch.manual_seed(3)
    b, after_b = TernaryLinear(7, 5), torch.rand(1)
    assert torch.equal(a.weight, b.weight) and torch.equal(after_a, after_b)
    assert list(b.state_dict()) == ["weight"]


def test_frozen_layer_uses_stored_scale_not_absmean_of_dequantised():
    torch.manual_seed(0)
    lin = TernaryLinear(9, 4)
    codes, scale = ternary_quantize(lin.weight)
    # absmean of W_q * s is s * (fraction of non-zero codes), not s
    assert ternary_quantize(codes.float() * scale)[1] != scale
    frozen = TernaryLinear(9, 4, device="meta").freeze_(codes, scale)
    assert frozen.frozen and frozen.weight is None and sorted(frozen.state_dict()) == ["weight_codes", "weight_scale"]
    x = torch.randn(3, 9)
    assert torch.equal(frozen(x), lin(x))
    with pytest.raises(ValueError, match="shape"):
        TernaryLinear(9, 4, device="meta").freeze_(codes.T.contiguous(), scale)


# --------------------------------------------------------------------------- packing

def test_pack_by_hand():
    # codes w + 1: [-1, 0, 1, 1] -> [0, 1, 2, 2] -> 0 | 1<<2 | 2<<4 | 2<<6 = 164; a lone 1 -> 2
    assert pack_ternary(torch.tensor([-1, 0, 1, 1, 1], dtype=torch.int8)).tolist() == [164, 2]


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (5,), (13,), (3, 5), (7, 11), (2, 3, 5), (4, 8)])
def test_pack_unpack_round_trip(shape):
    torch.manual_seed(sum(shape))
    q = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(q.numel() / 4)
    out = unpack_ternary(packed, shape)
    assert out.dtype == torch.int8 and torch.equal(out, q)


def test_pack_unpack_refuse_bad_input():
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        pack_ternary(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="0b11"):
        unpack_ternary(torch.tensor([0b11], dtype=torch.uint8), (1,))
    with pytest.raises(ValueError, match="2 uint8 bytes"):
        unpack_ternary(torch.zeros(3, dtype=torch.uint8), (5,))


# --------------------------------------------------------------------------- export

def _tiny_ternary_checkpoint(directory, step=5, enabled=True):
    """A tiny GPT (ternary blocks when ``enabled``) with every parameter perturbed (init leaves
    c_proj and ve_gate at zero), saved with the project's checkpoint code."""
    from rdn.checkpoint import save_checkpoint
    from rdn.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, head_dim=32,
                       n_coord_dim=2, vocab_pad_multiple=16,
                       ternary=TernaryConfig(enabled=enabled, activation_bits=8))
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_sha256": None,
            "coords": {"n_dim": 2, "bracket_pairs": ["()", "[]"]}}
    return save_checkpoint(directory, step, model, None, {}, None, meta), config


def test_export_round_trip_bitwise_logits_and_size(tmp_path, monkeypatch, capsys):
    """Pinned to one intra-op thread: bitwise equality needs both models' reductions (matmuls,
    absmean) split the same way, and one thread makes that independent of the machine."""
    from rdn.checkpoint import latest_checkpoint, model_from_checkpoint
    from rdn.cli.export import load_ternary_export
    from rdn.cli.main import main
    from rdn.model import GPT

    ckpt_dir = tmp_path / "artifacts" / "checkpoints" / "sft"
    path, config = _tiny_ternary_checkpoint(ckpt_dir)
    ref, _ = model_from_checkpoint(latest_checkpoint(ckpt_dir), torch.device("cpu"))
    ref.eval()
    block_linears = [m for n, m in ref.blocks.named_modules() if n.endswith(("c_q", "c_k", "c_v", "c_proj", "c_fc"))]
    assert len(block_linears) == 12 and all(isinstance(m, TernaryLinear) and not m.frozen for m in block_linears)
    out = tmp_path / "export"
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--stage", "sft", "--format", "ternary", str(out)]) == 0
    said = capsys.readouterr().out
    assert str(path) in said and "12 ternary matrices" in said and "no tokenizer copied" in said

    # the packed file: 2 bits per ternary weight + an fp32 scale each; nothing else quantised
    tensors = load_file(str(out / "model.safetensors"))
    state = load_file(str(path / "model.safetensors"))
    ternary = sorted(k for k in state if k.startswith("blocks.") and ".ve_gate." not in k)
    assert len(ternary) == 12
    n = sum(state[k].numel() for k in ternary)
    packed = sum(tensors[f"{k}.codes"].numel() + 4 for k in ternary)
    assert all(tensors[f"{k}.codes"].dtype == torch.uint8 and k not in tensors for k in ternary)
    assert all(tensors[f"{k}.scale"].dtype == torch.float32 for k in ternary)
    for k in set(state) - set(ternary):
        assert torch.equal(tensors[k], state[k]) and tensors[k].dtype == torch.float32
    ratio = packed / (4 * n)
    assert ratio == pytest.approx(1 / 16, rel=0.01)
    info = json.loads((out / "export.json").read_text())
    assert info["sizes"]["ternary_packed_bytes"] == packed and info["sizes"]["ternary_fp32_bytes"] == 4 * n
    assert info["coords"] == {"n_dim": 2, "bracket_pairs": ["()", "[]"]} and info["source"]["step"] == 5

    # reload without the checkpoint: same logits as the quantised forward, bit for bit in fp32
    (path / "model.safetensors").rename(tmp_path / "moved.safetensors")
    reloaded = load_ternary_export(out, "cpu")
    (tmp_path / "moved.safetensors").rename(path / "model.safetensors")
    assert sum(isinstance(m, TernaryLinear) and m.frozen for m in reloaded.modules()) == 12
    torch.manual_seed(1)
    idx = torch.randint(0, 50, (2, 24))
    coords = torch.randint(0, 32, (2, 24, 2))
    with torch_threads(1), torch.no_grad():
        a, b = ref(idx, coords=coords), reloaded(idx, coords=coords)
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ref(idx, coords=coords), reloaded(idx, coords=coords))
        # the quantisation is active: the same master weights through plain linears differ
        plain = GPT(dataclasses.replace(config, ternary=TernaryConfig()))
        plain.load_state_dict(ref.state_dict())
        assert not torch.allclose(plain.eval()(idx, coords=coords), a, atol=1e-3)


def test_export_from_checkpoint_path(tmp_path, capsys):
    from rdn.cli.export import export_main, load_ternary_export

    path, _ = _tiny_ternary_checkpoint(tmp_path / "ckpts", step=9)
    assert export_main(tmp_path / "a", "ternary", checkpoint=path, root=tmp_path) == 0
    assert export_main(tmp_path / "b", "ternary", checkpoint=tmp_path / "ckpts", root=tmp_path) == 0
    assert "(step 9)" in capsys.readouterr().out
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_ternary_export(tmp_path / "a").config.ternary.enabled


def test_export_refuses_non_ternary_checkpoint(tmp_path, capsys):
    from rdn.checkpoint import latest_checkpoint
    from rdn.cli.export import ExportError, export_ternary
    from rdn.cli.main import main

    path, _ = _tiny_ternary_checkpoint(tmp_path / "ckpts", enabled=False)
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(path), "--format", "ternary", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "model.ternary.enabled" in err
    assert not out.exists()
    with pytest.raises(ExportError, match="model.ternary.enabled"):
        export_ternary(latest_checkpoint(tmp_path / "ckpts"), out)
    # no checkpoint at all: one line naming the folder
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--format", "ternary", str(out)]) == 1
    assert str(tmp_path / "none") in capsys.readouterr().err
