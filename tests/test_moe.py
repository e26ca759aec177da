"""rdn.model.moe: the DeepSeek MoE layer against hand computations and slow, obvious references.

Oracles: the routing recomputed here from the router weight (sigmoid, a Python sort per
token), a per-token Python loop over the chosen experts (output and gradients through
autograd of that loop), a hand-written dense ReLU² MLP, the balance loss and the bias step
written out per sequence and per expert, counts taken from the routing itself, and two gloo
ranks whose bias must equal the one computed from their pooled counts.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from rdn.model.moe import MoE, MoEConfig

C = 32


def make(seed: int = 0, out_std: float = 0.2, n_embd: int = C, **cfg) -> MoE:
    """An MoE with random (non-zero) output projections, so every path carries signal."""
    kw = dict(enabled=True, num_experts=6, num_shared=1, top_k=2, expert_hidden=16)
    kw.update(cfg)
    torch.manual_seed(seed)
    m = MoE(n_embd, MoEConfig(**kw))
    with torch.no_grad():
        m.w_proj.normal_(0, out_std)
        if m.shared is not None:
            m.shared.c_proj.weight.normal_(0, out_std)
    return m


def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    return F.relu(x @ w_fc.T).square() @ w_proj.T


def hand_routing(m: MoE, x: torch.Tensor) -> tuple[list[list[int]], list[list[float]], torch.Tensor]:
    """Per token (rows of x [N, C]): the chosen experts (by a Python sort of s + b), their
    gates s_e / sum of chosen s, and the affinities s [N, E]."""
    s = torch.sigmoid(x.double() @ m.router.weight.detach().double().T)
    b = m.expert_bias.double()
    experts, gates = [], []
    for row in s:
        chosen = sorted(range(m.num_experts), key=lambda e: -(row[e] + b[e]).item())[:m.top_k]
        total = sum(row[e].item() for e in chosen)
        experts.append(chosen)
        gates.append([row[e].item() / total for e in chosen])
    return experts, gates, s


def naive_forward(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The slow obvious MoE: a Python loop over tokens and their chosen experts."""
    xf = x.reshape(-1, x.size(-1))
    experts, gates, _ = hand_routing(m, xf.detach())
    rows = []
    for t in range(xf.size(0)):
        y = torch.zeros(xf.size(1))
        if m.shared is not None:
            y = y + relu2_mlp(xf[t], m.shared.c_fc.weight, m.shared.c_proj.weight)
        s = torch.sigmoid(xf[t] @ m.router.weight.T)  # gates with their gradient path
        chosen = experts[t]
        for e in chosen:
            y = y + s[e] / s[chosen].sum() * relu2_mlp(xf[t], m.w_fc[e], m.w_proj[e])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


# --------------------------------------------------------------------------- config


def test_config_defaults_hidden_and_layers():
    cfg = MoEConfig()
    assert not cfg.enabled and not cfg.applies_to(5)
    cfg = MoEConfig(enabled=True, first_dense_layers=2)
    assert [cfg.applies_to(i) for i in range(4)] == [False, False, True, True]
    assert MoEConfig(top_k=2).resolved_expert_hidden(256) == 512      # 4*256/2
    assert MoEConfig(top_k=8).resolved_expert_hidden(768) == 384      # 4*768/8
    assert MoEConfig(top_k=3).resolved_expert_hidden(256) == 320      # 341.3 -> 320
    assert MoEConfig(top_k=5).resolved_expert_hidden(200) == 192      # 160 = 2.5*64 -> half up: 192
    assert MoEConfig(top_k=8, num_experts=8).resolved_expert_hidden(64) == 64  # 32 -> at least 64
    assert MoEConfig(expert_hidden=48).resolved_expert_hidden(256) == 48


@pytest.mark.parametrize("kw, field", [
    (dict(num_experts=0, top_k=1), "num_experts"), (dict(num_experts=4, top_k=5), "top_k"),
    (dict(top_k=0), "top_k"), (dict(num_shared=-1), "num_shared"), (dict(expert_hidden=0), "expert_hidden"),
    (dict(first_dense_layers=-1), "first_dense_layers"), (dict(bias_update_rate=-1e-3), "bias_update_rate"),
    (dict(seq_aux_loss_weight=-1.0), "seq_aux_loss_weight"), (dict(expert_optimizer="sgd"), "expert_optimizer"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"moe\.{field}"):
        MoEConfig(**kw)


# --------------------------------------------------------------------------- routing


def test_exactly_top_k_distinct_experts_chosen_as_a_sort_would():
    m = make(top_k=3)
    x = torch.randn(2, 7, C)
    idx, gates = m.route(x)
    assert idx.shape == gates.shape == (2, 7, 3)
    experts, hand_gates, _ = hand_routing(m, x.reshape(-1, C))
    for t, (row, g) in enumerate(zip(idx.reshape(-1, 3).tolist(), gates.reshape(-1, 3))):
        assert len(set(row)) == 3 and set(row) == set(experts[t])
        by_expert = dict(zip(experts[t], hand_gates[t]))
        torch.testing.assert_close(g.double(), torch.tensor([by_expert[e] for e in row], dtype=torch.double))


def test_gates_sum_to_one_and_the_bias_selects_without_weighting():
    m = make(top_k=2)
    x = torch.randn(3, 5, C)
    _, gates = m.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 5))
    m.expert_bias[4] = 100.0  # forces expert 4 into every token's choice
    idx, gates = m.route(x)
    assert (idx == 4).any(-1).all()
    s = torch.sigmoid(x @ m.router.weight.detach().T)  # the affinities, no bias
    chosen = s.gather(-1, idx)
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    g4 = (gates * (idx == 4)).sum(-1)
    other = (s.gather(-1, idx) * (idx != 4)).sum(-1)
    torch.testing.assert_close(g4, s[..., 4] / (s[..., 4] + other))
    assert (g4 < 0.99).all()  # the bias of 100 did not leak into the gate


# --------------------------------------------------------------------------- outputs


def test_output_and_gradients_equal_a_per_token_loop():
    m = make(seed=1, top_k=2, num_shared=2)
    x = torch.randn(2, 9, C)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 9, C)
    y = m(x1)
    (y * g).sum().backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = naive_forward(m, x2)
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_grouped_mm_dispatch_equals_the_expert_loop(monkeypatch):
    """The grouped GEMMs: in float32 called directly, and as the dispatch under bf16 autocast
    (where it is used; float32 falls back to the loop)."""
    m = make(seed=13, num_experts=5, top_k=2)
    m.expert_bias[3] = -100.0  # one empty group
    x = torch.randn(3, 7, C)
    xs = torch.randn(3 * 7 * 2, C)
    counts = torch.tensor([9, 12, 10, 0, 11])
    torch.testing.assert_close(m._experts_grouped(xs, counts, torch.float32), m._experts_loop(xs, counts),
                               rtol=1e-5, atol=1e-6)
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for dispatch in ("loop", "grouped_mm"):
        m.dispatch = dispatch
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
            y.float().square().sum().backward()
        results[dispatch] = (y, {n: p.grad.clone() for n, p in m.named_parameters()})
    assert len(calls) == 2  # w_fc and w_proj, grouped path only
    (y_loop, g_loop), (y_grp, g_grp) = results["loop"], results["grouped_mm"]
    torch.testing.assert_close(y_grp, y_loop, rtol=2e-2, atol=2e-2)
    for n in g_loop:
        assert ((g_grp[n] - g_loop[n]).norm() / g_loop[n].norm()).item() < 2e-2, n
    assert not g_grp["w_fc"][3].any() and not g_grp["w_proj"][3].any()
    m(x)  # float32: the loop
    assert len(calls) == 2


def test_one_expert_top1_no_shared_is_the_dense_relu2_mlp():
    m = make(num_experts=1, top_k=1, num_shared=0, expert_hidden=4 * C, seq_aux_loss_weight=0.0)
    x = torch.randn(3, 6, C)
    dense = F.relu(x @ m.w_fc[0].T).square() @ m.w_proj[0].T
    torch.testing.assert_close(m(x), dense, rtol=1e-5, atol=1e-6)


def test_exactly_the_selected_experts_get_gradient():
    m = make(seed=2, num_experts=6, top_k=2)
    m.expert_bias[4:] = -100.0  # experts 4 and 5 are never chosen
    x = torch.randn(1, 1, C).expand(2, 3, C)  # one token six times: exactly two experts chosen
    experts, _, _ = hand_routing(m, x.reshape(-1, C))
    used = {e for row in experts for e in row}
    m(x).square().sum().backward()
    for e in range(6):
        for w in (m.w_fc, m.w_proj):
            assert (w.grad[e].abs().sum() > 0) == (e in used), (e, used)
    assert len(used) == 2 and used <= {0, 1, 2, 3}


def test_t1_decoding_routes_each_token_as_the_full_forward():
    m = make(seed=3).eval()
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        full = m(x)
        steps = torch.cat([m(x[:, t:t + 1]) for t in range(5)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_bf16_autocast_runs_and_routes_like_fp32(dispatch):
    m = make(seed=4)
    m.dispatch = dispatch
    x = torch.randn(2, 8, C)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        idx, _ = m.route(x)
        assert m.aux_loss is not None and m.aux_loss.dtype == torch.float32
        (y.float().square().sum() + m.aux_loss).backward()
    assert torch.equal(idx, m.route(x)[0])  # the router runs in fp32 under autocast
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# --------------------------------------------------------------------------- balance loss and bias


def test_seq_balance_loss_hand_numbers():
    m = make(num_experts=2, top_k=1)
    scores = torch.tensor([[[0.5, 0.5], [0.2, 0.6]]])  # B=1, T=2, E=2
    idx = torch.tensor([[[1], [1]]])
    # f = E/(kT) * hits = 2/2 * [0, 2] = [0, 2]; P = mean([.5, .5], [.25, .75]) = [.375, .625]
    assert m.sequence_balance_loss(scores, idx).item() == pytest.approx(2 * 0.625)
    # two sequences, k=2 of E=3: the mean over sequences
    m3 = make(num_experts=3, top_k=2)
    scores = torch.tensor([[[0.1, 0.2, 0.7]], [[0.3, 0.3, 0.4]]])  # B=2, T=1
    idx = torch.tensor([[[2, 1]], [[0, 2]]])
    # seq 0: f = 3/2 * [0, 1, 1], P = [.1, .2, .7] -> 1.5 * 0.9 = 1.35
    # seq 1: f = 3/2 * [1, 0, 1], P = [.3, .3, .4] -> 1.5 * 0.7 = 1.05
    assert m3.sequence_balance_loss(scores, idx).item() == pytest.approx((1.35 + 1.05) / 2)


def test_forward_aux_loss_is_the_weighted_hand_loss():
    m = make(seed=5, num_experts=4, top_k=2, seq_aux_loss_weight=0.01)
    x = torch.randn(3, 4, C)
    m(x)
    experts, _, s = hand_routing(m, x.reshape(-1, C))
    E, k, T = 4, 2, 4
    total = 0.0
    for b in range(3):
        toks = range(b * T, (b + 1) * T)
        f = [E / (k * T) * sum(e in experts[t] for t in toks) for e in range(E)]
        P = [sum((s[t, e] / s[t].sum()).item() for t in toks) / T for e in range(E)]
        total += sum(fi * pi for fi, pi in zip(f, P))
    assert m.aux_loss.item() == pytest.approx(0.01 * total / 3, rel=1e-5)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0  # through P only
    m.cfg.seq_aux_loss_weight = 0.0
    m(x)
    assert m.aux_loss is None


def test_eval_and_no_grad_record_nothing():
    m = make(seed=6)
    x = torch.randn(2, 3, C)
    with torch.no_grad():
        m(x)
    assert m.aux_loss is None and m.expert_counts.sum() == 0
    m.eval()
    m(x)
    assert m.aux_loss is None and m.expert_counts.sum() == 0
    m.update_bias()  # nothing counted: no-op
    assert m.stats() == {} and torch.equal(m.expert_bias, torch.zeros(6))


def test_update_bias_moves_by_sign_and_records_the_load():
    m = make(seed=7, num_experts=4, top_k=2, bias_update_rate=0.01)
    xs = [torch.randn(2, 5, C), torch.randn(1, 3, C)]  # two micro-batches in one step
    counts = [0] * 4
    for x in xs:
        m(x)
        for row in hand_routing(m, x.reshape(-1, C))[0]:
            for e in row:
                counts[e] += 1
    assert m.expert_counts.tolist() == counts
    mean = sum(counts) / 4
    m.update_bias()
    want = [0.01 * ((mean > c) - (mean < c)) for c in counts]
    torch.testing.assert_close(m.expert_bias, torch.tensor(want))
    std = (sum((c - mean) ** 2 for c in counts) / 4) ** 0.5
    st = m.stats()
    assert st["load_cv"] == pytest.approx(std / mean) and st["max_load"] == pytest.approx(max(counts) / mean)
    assert m.expert_counts.sum() == 0
    m.update_bias()  # nothing counted since: no change
    torch.testing.assert_close(m.expert_bias, torch.tensor(want))


def test_bias_updates_balance_a_skewed_router():
    """Router weights frozen, expert 0 (and 1) preferred by every token: the bias alone must
    even the load out."""
    m = make(seed=8, num_experts=4, top_k=1, bias_update_rate=0.01, seq_aux_loss_weight=0.0)
    with torch.no_grad():
        m.router.weight[0, 0] = 4.0
        m.router.weight[1, 0] = 2.0
    gen = torch.Generator().manual_seed(0)
    cvs = []
    for _ in range(50):
        x = torch.randn(16, 16, C, generator=gen)
        x[..., 0] += 1.5
        m(x)
        m.update_bias()
        cvs.append(m.stats()["load_cv"])
    assert cvs[0] > 1.0  # most tokens on one expert
    assert sum(cvs[-10:]) / 10 < 0.25 * cvs[0]  # (sign steps make it hover, not settle)
    assert m.expert_bias[0] < 0 and m.expert_bias[3] > 0


# --------------------------------------------------------------------------- init, state, accounting


def test_init_after_meta_and_to_empty_equals_normal_construction():
    cfg = MoEConfig(enabled=True, num_experts=5, num_shared=2, top_k=2, expert_hidden=24)
    torch.manual_seed(11)
    normal = MoE(C, cfg)
    torch.manual_seed(11)
    with torch.device("meta"):
        meta = MoE(C, cfg)
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*meta.parameters(), *meta.buffers()]:
            t.fill_(float("nan") if t.is_floating_point() else 7)
    meta.init_weights(3 ** 0.5 * C ** -0.5)
    a, b = normal.state_dict(), meta.state_dict()
    assert list(a) == list(b) == ["w_fc", "w_proj", "expert_bias", "router.weight", "shared.c_fc.weight",
                                  "shared.c_proj.weight"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(meta.expert_counts, torch.zeros(5, dtype=torch.long))
    bound = 3 ** 0.5 * C ** -0.5
    for w in (normal.w_fc, normal.shared.c_fc.weight, normal.router.weight):
        assert w.abs().max() <= bound and w.std() > 0.5 * bound / 3 ** 0.5
    assert not normal.w_proj.any() and not normal.shared.c_proj.weight.any()
    assert normal.expert_bias.dtype == torch.float32 and not normal.expert_bias.any()
    # the draws follow the documented order: w_fc, shared c_fc, router
    torch.manual_seed(11)
    torch.testing.assert_close(torch.empty(5, 24, C).uniform_(-bound, bound), normal.w_fc, rtol=0, atol=0)


def test_bias_is_saved_counts_are_not():
    m = make(seed=9)
    m(torch.randn(1, 4, C))
    m.update_bias()
    m(torch.randn(1, 4, C))
    sd = m.state_dict()
    assert "expert_bias" in sd and "expert_counts" not in sd
    other = make(seed=10)
    other.load_state_dict(sd)
    assert torch.equal(other.expert_bias, m.expert_bias)


def test_matmul_params_and_expert_parameters():
    C2, E, H, S, k = 40, 5, 24, 2, 3
    m = MoE(C2, MoEConfig(enabled=True, num_experts=E, num_shared=S, top_k=k, expert_hidden=H))
    router, shared, expert = E * C2, 2 * C2 * S * H, 2 * C2 * H
    assert m.matmul_params() == (router + shared + E * expert, router + shared + k * expert)
    assert m.matmul_params()[0] == sum(p.numel() for p in m.parameters())
    assert [tuple(p.shape) for p in m.expert_parameters()] == [(E, H, C2), (E, C2, H)]
    none = MoE(C2, MoEConfig(enabled=True, num_experts=E, num_shared=0, top_k=k, expert_hidden=H))
    assert none.shared is None and none.matmul_params() == (router + E * expert, router + k * expert)


# --------------------------------------------------------------------------- two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bias_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = make(seed=12, num_experts=4, top_k=2, bias_update_rate=0.01)
        xs = [torch.randn(2, 6, C, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
        counts = torch.zeros(4)
        for x in xs:  # every rank's tokens, routed here by hand
            for row in hand_routing(m, x.reshape(-1, C))[0]:
                counts[row] += 1
        assert counts.std() > 0
        m(xs[rank])
        m.update_bias()
        mean = counts.mean()
        torch.testing.assert_close(m.expert_bias, 0.01 * torch.sign(mean - counts))
        assert m.stats()["max_load"] == pytest.approx((counts.max() / mean).item())
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_one_bias_from_pooled_counts():
    torch.multiprocessing.start_processes(_bias_worker, args=(2, _free_port()), nprocs=2, start_method="fork")
