"""MuonAdamW and DistMuonAdamW on MoE's 3-D expert weights ``[E, H, C]`` / ``[E, C, H]``.

Oracles: the same optimizer over each expert's matrix as a separate 2-D parameter (what
"each expert orthogonalised on its own" means), torch.optim.AdamW, an uninterrupted run (for
the state-dict round trip), and the single-process step on the averaged gradients (two gloo
ranks, exact binary-fraction gradients so the comparison is bitwise).
"""

from __future__ import annotations

import io
import os
import socket

import pytest
import torch

from rdn.model.moe import MoE, MoEConfig
from rdn.optim import MuonAdamW

E, C, H = 4, 16, 32  # w_fc [4, 32, 16] is a stack of tall matrices, w_proj [4, 16, 32] of wide ones


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def muon_group(params, **kw):
    g = dict(kind="muon", params=list(params), lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.1)
    g.update(kw)
    return g


def adamw_group(params, **kw):
    g = dict(kind="adamw", params=list(params), lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    g.update(kw)
    return g


def moe_layers(n: int, seed: int = 0) -> list[MoE]:
    torch.manual_seed(seed)
    layers = [MoE(C, MoEConfig(enabled=True, num_experts=E, top_k=1, expert_hidden=H)) for _ in range(n)]
    for m in layers:
        with torch.no_grad():
            m.w_proj.normal_(0, 0.1)
        m.expert_bias[E - 1] = -100.0  # the last expert is never chosen: its gradient is zero
    return layers


def expert_grads(layers: list[MoE], step: int) -> None:
    """Real MoE gradients: a forward/backward of each layer on step-dependent tokens."""
    for i, m in enumerate(layers):
        m.zero_grad()
        x = torch.randn(2, 8, C, generator=torch.Generator().manual_seed(100 * step + i))
        m(x).square().mean().backward()


def per_expert_copies(weights: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(w.detach()[e].clone()) for w in weights for e in range(w.size(0))]


def test_muon_steps_each_expert_matrix_on_its_own():
    """Two layers' expert weights in Muon groups (stacked [2, E, m, n]) step exactly like the
    2 * E expert matrices as separate 2-D params; the zero-gradient expert included."""
    layers = moe_layers(2)
    w_fc, w_proj = [m.w_fc for m in layers], [m.w_proj for m in layers]
    ref_fc, ref_proj = per_expert_copies(w_fc), per_expert_copies(w_proj)
    opt = MuonAdamW([muon_group(w_fc), muon_group(w_proj)])
    ref = MuonAdamW([muon_group(ref_fc), muon_group(ref_proj)])
    for step in range(3):
        expert_grads(layers, step)
        assert all(not w.grad[E - 1].any() and w.grad[0].any() for w in w_fc + w_proj)
        for ws, refs in ((w_fc, ref_fc), (w_proj, ref_proj)):
            for r, g in zip(refs, (w.grad[e] for w in ws for e in range(E))):
                r.grad = g.clone()
        opt.step()
        ref.step()
    for ws, refs in ((w_fc, ref_fc), (w_proj, ref_proj)):
        torch.testing.assert_close(torch.stack(ws).detach(), torch.stack(refs).detach().view(2, E, *refs[0].shape),
                                   atol=1e-6, rtol=0)
    # NorMuon's statistics: per row of each tall expert matrix, per column of each wide one
    sm_fc = opt.state[w_fc[0]]["second_momentum_buffer"]
    sm_proj = opt.state[w_proj[0]]["second_momentum_buffer"]
    assert sm_fc.shape == (2, E, H, 1) and sm_proj.shape == (2, E, 1, H)
    torch.testing.assert_close(sm_fc, ref.state[ref_fc[0]]["second_momentum_buffer"].view(2, E, H, 1))
    torch.testing.assert_close(sm_proj, ref.state[ref_proj[0]]["second_momentum_buffer"].view(2, E, 1, H))


def test_adamw_expert_group_matches_torch_adamw():
    layers = moe_layers(1)
    w = layers[0].expert_parameters()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in w]
    opt = MuonAdamW([adamw_group(w)])
    ref = torch.optim.AdamW(theirs, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    for step in range(4):
        expert_grads(layers, step)
        for p, q in zip(w, theirs):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(w, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


def _build(layers: list[MoE]) -> MuonAdamW:
    """Expert weights in Muon (by shape) and AdamW, the rest of the layers in Muon/AdamW."""
    return MuonAdamW([muon_group([m.w_fc for m in layers]), muon_group([m.w_proj for m in layers]),
                      muon_group([m.router.weight for m in layers]),
                      muon_group([m.shared.c_fc.weight for m in layers]),
                      adamw_group([m.shared.c_proj.weight for m in layers])])


def test_state_dict_round_trip_with_expert_groups_is_bit_exact():
    straight = moe_layers(2)
    opt = _build(straight)
    for step in range(6):
        expert_grads(straight, step)
        opt.step()

    resumed = moe_layers(2)
    opt = _build(resumed)
    for step in range(3):
        expert_grads(resumed, step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": [m.state_dict() for m in resumed], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = moe_layers(2, seed=1)
    for m, sd in zip(fresh, saved["model"]):
        m.load_state_dict(sd)
    opt = _build(fresh)
    opt.load_state_dict(saved["optim"])
    assert opt.state[fresh[0].w_fc]["momentum_buffer"].shape == (2, E, H, C)
    for step in range(3, 6):
        expert_grads(fresh, step)
        opt.step()
    for a, b in zip(fresh, straight):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


# --------------------------------------------------------------------------- two ranks

# Muon: one layer's w_fc (N=1: padded to 2, rank 1 owns only the pad), three layers' w_proj
# (N=3, padded to 4); AdamW: 3-D experts sharded along E (E=4) and replicated (E=3, 3 % 2).
MUON_SHAPES = [[(E, H, C)], [(E, C, H)] * 3]
ADAMW_SHAPES = [(E, H, C), (3, C, H)]


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    muon = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes] for shapes in MUON_SHAPES]
    adamw = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ADAMW_SHAPES]
    return muon, adamw


def _groups(muon, adamw):
    return [adamw_group([p]) for p in adamw] + [muon_group(g) for g in muon]


def _grad(p: torch.Tensor, rank: int, step: int, index: int) -> torch.Tensor:
    """Multiples of 2^-10 below 1/4 (exact sums in any order); expert 1 gets none on rank 0."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * index + rank)
    g = torch.randint(-256, 257, p.shape, generator=gen).float() / 1024
    if rank == 0:
        g[1] = 0
    return g


def _flat(muon, adamw):
    return [p for g in muon for p in g] + adamw


def _set_grads(params, rank, world, step, averaged: bool):
    for i, p in enumerate(params):
        p.grad = (sum(_grad(p, r, step, i) for r in range(world)) / world) if averaged else _grad(p, rank, step, i)


def _dist_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from rdn.optim.dist import DistMuonAdamW

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        muon, adamw = _params()
        opt = DistMuonAdamW(_groups(muon, adamw), shard_min_numel=48)
        ref_muon, ref_adamw = _params()
        ref = MuonAdamW(_groups(ref_muon, ref_adamw))
        params, ref_params = _flat(muon, adamw), _flat(ref_muon, ref_adamw)
        saved = None
        for step in range(4):
            if step == 2:  # checkpoint this rank's shard and the weights mid-run
                buf = io.BytesIO()
                torch.save({"params": [p.detach().clone() for p in params], "optim": opt.state_dict()}, buf)
                saved = buf.getvalue()
            _set_grads(params, rank, world, step, averaged=False)
            _set_grads(ref_params, rank, world, step, averaged=True)
            opt.step()
            ref.step()
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), (rank, tuple(p.shape), (p - q).abs().max().item())

        # each rank keeps whole expert stacks: its share of the padded Muon stack
        st = opt.state[muon[0][0]]
        assert st["momentum_buffer"].shape == (1, E, H, C) and st["second_momentum_buffer"].shape == (1, E, H, 1)
        st3 = opt.state[muon[1][0]]
        assert st3["momentum_buffer"].shape == (2, E, C, H) and st3["second_momentum_buffer"].shape == (2, E, 1, H)
        ref3 = ref.state[ref_muon[1][0]]
        own = min(2, 3 - 2 * rank)  # rank 1 owns matrix 2 and the pad
        assert torch.equal(st3["second_momentum_buffer"][:own], ref3["second_momentum_buffer"][2 * rank:2 * rank + own])
        assert torch.equal(st3["momentum_buffer"][:own], ref3["momentum_buffer"][2 * rank:2 * rank + own])
        if rank == 0:
            assert torch.equal(st["momentum_buffer"], ref.state[ref_muon[0][0]]["momentum_buffer"])
        else:  # the pad matrix stays zero
            assert not st["momentum_buffer"].any()
        assert opt.state[adamw[0]]["exp_avg"].shape == (E // world, H, C)
        assert opt.state[adamw[1]]["exp_avg"].shape == (3, C, H)

        # resume this rank's shard from the mid-run checkpoint: the same last two steps
        blob = torch.load(io.BytesIO(saved), weights_only=True)
        muon2, adamw2 = _params(seed=1)
        params2 = _flat(muon2, adamw2)
        with torch.no_grad():
            for p, w in zip(params2, blob["params"]):
                p.copy_(w)
        opt2 = DistMuonAdamW(_groups(muon2, adamw2), shard_min_numel=48)
        opt2.load_state_dict(blob["optim"])
        for step in (2, 3):
            _set_grads(params2, rank, world, step, averaged=False)
            opt2.step()
        for p, q in zip(params2, params):
            assert torch.equal(p, q), (rank, tuple(p.shape))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_expert_weights_equal_single_process_and_resume_exactly():
    """Tolerance: none (bitwise), as in tests/test_dist.py."""
    torch.multiprocessing.start_processes(_dist_worker, args=(2, _free_port()), nprocs=2, start_method="fork")
