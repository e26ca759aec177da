"""Multi-token prediction: the shifted targets against a per-position loop, the loss against
a hand assembly of the heads, and ``loss_weight: 0`` leaving the trunk bitwise untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdn.model import GPT, GPTConfig
from rdn.model.mtp import MTPConfig, shifted_targets

BOS = 0


def _naive_shift(idx, targets, k, bos_id):
    """The rule, one position at a time: target t+k unless past the row or a bos in x[t+1..t+k]."""
    B, T = idx.shape
    inputs = torch.zeros(B, T, dtype=torch.long)
    tgt = torch.full((B, T), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            if t + k >= T:
                continue
            inputs[b, t] = idx[b, t + k]
            crossed = bos_id is not None and any(int(idx[b, j]) == bos_id for j in range(t + 1, t + k + 1))
            tgt[b, t] = -1 if crossed else targets[b, t + k]
    return inputs, tgt


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_shifted_targets_follow_the_per_position_rule(k):
    g = torch.Generator().manual_seed(k)
    idx = torch.randint(0, 6, (3, 9), generator=g)           # id 0 = bos, frequent on purpose
    targets = torch.randint(0, 6, (3, 9), generator=g)
    targets[0, 2] = -1                                        # an unsupervised position (SFT) stays ignored
    for bos in (BOS, None):
        got = shifted_targets(idx, targets, k, bos)
        want = _naive_shift(idx, targets, k, bos)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _config(**mtp) -> GPTConfig:
    return GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, head_dim=16, n_coord_dim=2,
                     use_coordinates=True, bos_token_id=BOS, mtp=MTPConfig(**mtp))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (2, 16), generator=g)
    idx[:, 0] = BOS
    idx[1, 7] = BOS
    coords = torch.randint(0, 16, (2, 16, 2), generator=g)
    targets = torch.roll(idx, -1, dims=1)
    return idx, targets, coords


def _model(seed=0, **mtp) -> GPT:
    torch.manual_seed(seed)
    m = GPT(_config(**mtp))
    with torch.no_grad():  # coordinate tables and output projections start at zero; make them count
        for p in m.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    return m


def test_weight_zero_leaves_main_loss_and_trunk_gradients_bitwise_alone():
    idx, targets, coords = _batch()
    plain, heads = _model(num_future=0), _model(num_future=3, loss_weight=0.0)
    trunk = dict(plain.named_parameters())
    with torch.no_grad():   # the same trunk weights
        for name, p in heads.named_parameters():
            if name in trunk:
                p.copy_(trunk[name])
    a, b = plain(idx, targets, coords=coords), heads(idx, targets, coords=coords)
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    for name, p in heads.named_parameters():
        if name in trunk:
            assert torch.equal(p.grad, trunk[name].grad), name
        else:
            assert p.grad is None, f"{name} must not train at loss_weight 0"
    assert len(heads.mtp_losses) == 3 and all(torch.isfinite(x) for x in heads.mtp_losses)


def test_loss_is_main_plus_weighted_heads_assembled_by_hand():
    idx, targets, coords = _batch(1)
    m = _model(1, num_future=2, weights=[1.0, 0.5, 0.25, 0.125], loss_weight=0.3)
    total = m(idx, targets, coords=coords)

    # Hand assembly: trunk hidden state, then each head on the shifted tokens, loss over the
    # positions the per-position rule keeps, averaged by hand.
    m.eval()
    with torch.no_grad():
        cos, sin = m.cos[:, :16], m.sin[:, :16]
        x = F.rms_norm(m._embed(idx, coords), (32,))
        x0 = x
        for i, block in enumerate(m.blocks):
            x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
            ve = m.value_embeds[str(i)](idx) if str(i) in m.value_embeds else None
            x = block(x, ve, cos, sin, m.layer_windows[i], None)
        main = F.cross_entropy(m._logits(F.rms_norm(x, (32,))).reshape(-1, 64), targets.reshape(-1))
        h, heads = x, []
        for k, head in enumerate(m.mtp, start=1):
            inputs, tgt = _naive_shift(idx, targets, k, BOS)
            ck = torch.zeros_like(coords)
            ck[:, :16 - k] = coords[:, k:]
            e = m._embed(inputs, ck)
            h = head.block(head.proj(torch.cat([F.rms_norm(h, (32,)), F.rms_norm(e, (32,))], -1)),
                           None, cos, sin, None, None)
            logp = torch.log_softmax(m._logits(F.rms_norm(h, (32,))), -1)
            terms = [-logp[b, t, tgt[b, t]] for b in range(2) for t in range(16) if tgt[b, t] != -1]
            heads.append(sum(terms) / len(terms))
    want = main + 0.3 * (heads[0] * (1 / 1.5) + heads[1] * (0.5 / 1.5))
    torch.testing.assert_close(total.detach(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(m.mtp_losses, heads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_heads_train_and_plain_generation_ignores_them():
    idx, targets, coords = _batch(2)
    m = _model(2, num_future=2)
    m(idx, targets, coords=coords).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mtp.parameters())
    # logits (no targets) do not depend on the heads: scrambling them changes nothing
    m.eval()
    before = m(idx, coords=coords)
    with torch.no_grad():
        for p in m.mtp.parameters():
            p.mul_(-3.0)
    assert torch.equal(before, m(idx, coords=coords))
    # evaluation (no grad, per-token losses) adds no MTP term either
    assert torch.equal(m(idx, targets, coords=coords, loss_reduction="none").mean(),
                       F.cross_entropy(before.reshape(-1, 64), targets.reshape(-1), reduction="none").mean())


def test_flops_and_params_count_the_heads_by_hand():
    plain, heads = _model(num_future=0), _model(num_future=2)
    C, V, T = 32, 64, 16
    head_matmuls = 2 * C * C + (4 * C * C + 8 * C * C)     # proj 2C->C, block attn 4C^2 + MLP 8C^2
    attn = 12 * 2 * 16 * T                                 # full-context attention of the head's block
    want = plain.estimate_flops() + 2 * (6 * (head_matmuls + V * C) + attn)  # + one lm_head pass each
    assert heads.estimate_flops() == want
    counts = heads.num_scaling_params()
    assert counts["mtp_heads"] == 2 * head_matmuls
    assert counts["total"] == plain.num_scaling_params()["total"] + 2 * head_matmuls == counts["active"]


def test_bad_mtp_settings_name_the_key():
    with pytest.raises(ValueError, match="num_future"):
        MTPConfig(num_future=5)
    with pytest.raises(ValueError, match="weights"):
        MTPConfig(num_future=3, weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="loss_weight"):
        MTPConfig(num_future=1, loss_weight=-1)
