"""RL math: group-relative advantages, the token-level policy-gradient loss, one real step."""

from __future__ import annotations

import torch

from rdn.model import GPT, GPTConfig
from rdn.train.rl import group_advantages, policy_gradient_loss


def test_advantages_sum_to_zero_per_group_and_normalise():
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(6, 8, generator=g) > 0.5).float()
    for normalize in (False, True):
        adv = group_advantages(rewards, normalize)
        assert torch.allclose(adv.sum(dim=1), torch.zeros(6), atol=1e-5)
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(r, False), torch.tensor([[0.75, -0.25, -0.25, -0.25]]))
    # std of [1,0,0,0] is sqrt(3)/4 -> 0.75 / 0.4330 = 1.732
    assert torch.allclose(group_advantages(r, True), torch.tensor([[3 ** 0.5, -(3 ** -0.5)] + [-(3 ** -0.5)] * 2]),
                          atol=1e-3)


def test_equal_rewards_give_exactly_zero_gradient():
    logits = torch.randn(4, 5, 10, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[..., 0]
    adv = group_advantages(torch.ones(1, 4), normalize=True).flatten()
    loss = policy_gradient_loss(logp, adv, torch.ones(4, 5))
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_clipped_ratio_and_kl_terms():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 0.25]]))  # ratio 2 on the first token
    adv = torch.tensor([1.0])
    loss = policy_gradient_loss(logp, adv, torch.ones(1, 2), old_logp=old, clip_eps=0.2)
    # per token: -min(r*A, clip(r)*A) = -[1.2, 1.0] -> mean -1.1
    assert torch.isclose(loss, torch.tensor(-1.1))
    same = policy_gradient_loss(logp, torch.zeros(1), torch.ones(1, 2), ref_logp=logp, kl_coef=1.0)
    assert torch.isclose(same, torch.tensor(0.0))  # KL to itself is zero


def test_one_rl_step_raises_the_rewarded_samples_log_probability():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, head_dim=64,
                    window_pattern="L", short_window=None, use_coordinates=False, n_coord_dim=4,
                    value_embeddings=True, logit_softcap=15.0, vocab_pad_multiple=64)
    model = GPT(cfg)
    model.init_weights()
    opt = model.setup_optimizer(matrix_lr=0.01, unembedding_lr=0.01, embedding_lr=0.05)
    prompt = [1, 2, 3]
    samples = [[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    ids = torch.tensor([prompt + s for s in samples])
    x, y = ids[:, :-1], ids[:, 1:].clone()
    mask = torch.zeros_like(y, dtype=torch.float)
    mask[:, len(prompt) - 1:] = 1  # the sampled tokens are the targets after the prompt

    def seq_logp():
        with torch.no_grad():
            return (-(model(x, y, loss_reduction="none")) * mask).sum(1)

    before = seq_logp()
    logp = -model(x, y, loss_reduction="none")
    policy_gradient_loss(logp, group_advantages(rewards, False).flatten(), mask).backward()
    opt.step()
    after = seq_logp()
    assert after[0] > before[0]                     # the rewarded sample became more likely
    assert (after[1:] < before[1:]).all()           # the others less likely
