"""rdn.model.mhc: Sinkhorn, the mHC update and its init, checked against slow, obvious references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rdn.model.mhc import (ALPHA_INIT, MAX_STREAMS, RES_INIT_DIAG, HyperConnection, MHCConfig, collapse_streams,
                           expand_streams, hyper_update, sinkhorn)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- slow references

def sinkhorn_reference(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """One ``[n, n]`` matrix, Python loops over entries, float64."""
    n = logits.size(0)
    L = logits.double().tolist()
    top = max(max(row) for row in L)
    M = [[math.exp(v - top) for v in row] for row in L]
    for _ in range(iters):
        for i in range(n):
            s = sum(M[i])
            M[i] = [v / s for v in M[i]]
        for j in range(n):
            s = sum(M[i][j] for i in range(n))
            for i in range(n):
                M[i][j] = M[i][j] / s
    return torch.tensor(M, dtype=torch.float64)


def coefficients_reference(hc: HyperConnection, x: torch.Tensor):
    """Coefficients of one token's streams ``x`` ``[n, C]``, straight from the paper's formulas."""
    n, C = hc.streams, hc.n_embd
    v = x.double().reshape(n * C)
    rms = math.sqrt(sum(float(t) ** 2 for t in v) / (n * C) + torch.finfo(torch.float64).eps)
    h = hc.phi.double() @ (v / rms)
    a = hc.alpha.double()
    pre = [1 / (1 + math.exp(-(a[0] * h[i] + hc.bias_pre[i]).item())) for i in range(n)]
    post = [2 / (1 + math.exp(-(a[1] * h[n + i] + hc.bias_post[i]).item())) for i in range(n)]
    res_logits = torch.tensor([[(a[2] * h[2 * n + i * n + j] + hc.bias_res[i, j]).item() for j in range(n)]
                               for i in range(n)], dtype=torch.float64)
    return pre, post, sinkhorn_reference(res_logits, hc.sinkhorn_iters)


def update_reference(hc: HyperConnection, xs: torch.Tensor, branch) -> torch.Tensor:
    """``x_{l+1}[i] = sum_j H_res[i, j] x_l[j] + H_post[i] F(sum_j H_pre[j] x_l[j])``, token by token."""
    B, T, n, C = xs.shape
    coeffs = {(b, t): coefficients_reference(hc, xs[b, t]) for b in range(B) for t in range(T)}
    x_in = torch.zeros(B, T, C, dtype=torch.float64)
    for (b, t), (pre, _, _) in coeffs.items():
        for j in range(n):
            x_in[b, t] += pre[j] * xs[b, t, j].double()
    y = branch(x_in)  # the branch may mix tokens: all inputs first
    out = torch.zeros(B, T, n, C, dtype=torch.float64)
    for (b, t), (_, post, res) in coeffs.items():
        for i in range(n):
            acc = post[i] * y[b, t]
            for j in range(n):
                acc = acc + res[i, j] * xs[b, t, j].double()
            out[b, t, i] = acc
    return out


@torch.no_grad()
def randomize_(hc: HyperConnection, seed: int = 7) -> HyperConnection:
    """Every parameter random and O(1), so the dynamic part and every bias matter."""
    g = gen(seed)
    for p in hc.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.1 if p is hc.phi else 1.0))
    return hc


def mixing_branch(dim: int, seed: int = 3):
    """A small attention + MLP residual branch (causal softmax attention, ReLU^2 MLP, pre-norm),
    the shape of what the lead wraps: F(x) = a + mlp(norm(x + a)), a = attn(norm(x))."""
    g = gen(seed)
    W = {k: (torch.randn(dim, dim, generator=g) / dim ** 0.5).requires_grad_() for k in "qkvo"}
    W["fc"] = (torch.randn(4 * dim, dim, generator=g) / dim ** 0.5).requires_grad_()
    W["proj"] = (torch.randn(dim, 4 * dim, generator=g) / (4 * dim) ** 0.5).requires_grad_()

    def norm(x):
        return F.rms_norm(x, (x.size(-1),))

    def branch(x):
        h = norm(x)
        q, k, v = h @ W["q"].T, h @ W["k"].T, h @ W["v"].T
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True) @ W["o"].T
        m = F.relu(norm(x + a) @ W["fc"].T).square() @ W["proj"].T
        return a + m

    return branch, W


# --------------------------------------------------------------------------- config

def test_config_defaults_and_enabled():
    assert MHCConfig() == MHCConfig(streams=1, sinkhorn_iters=20)
    assert not MHCConfig().enabled
    assert MHCConfig(streams=4).enabled and MHCConfig(streams=MAX_STREAMS).enabled


@pytest.mark.parametrize("kwargs, field", [
    (dict(streams=0), "streams"), (dict(streams=MAX_STREAMS + 1), "streams"), (dict(streams=2.0), "streams"),
    (dict(streams=True), "streams"), (dict(sinkhorn_iters=0), "sinkhorn_iters"),
])
def test_config_refuses_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MHCConfig(**kwargs)


def test_hyperconnection_refuses_one_stream():
    with pytest.raises(ValueError, match="plain residual"):
        HyperConnection(8, 1, 20)


# --------------------------------------------------------------------------- sinkhorn

@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_sinkhorn_columns_exact_and_nonnegative_for_any_logits(n):
    logits = torch.randn(3, 5, n, n, generator=gen(n)) * 3
    M = sinkhorn(logits, 20)
    assert M.shape == logits.shape and M.dtype == torch.float32
    assert (M >= 0).all()
    torch.testing.assert_close(M.sum(-2), torch.ones(3, 5, n), rtol=0, atol=1e-6)  # the last step
    # Schur's test: ||M||_2 <= sqrt(max row sum * max column sum), whatever the row sums are.
    bound = (M.sum(-1).amax(-1) * M.sum(-2).amax(-1)).sqrt()
    assert (torch.linalg.matrix_norm(M.double(), ord=2) <= bound.double() + 1e-6).all()


@pytest.mark.parametrize("n, scale", [(2, 0.5), (3, 1.0), (4, 1.0), (8, 1.0), (16, 1.0)])
def test_sinkhorn_doubly_stochastic_with_norm_at_most_one(n, scale):
    """Both marginals within 1e-5 at the default 20 iterations for well-spread logits (standard
    normal; std 0.5 for n = 2, whose rows converge slowest: ~3% of N(0, 1) 2x2 matrices are
    still off by more than 1e-5 after 20 iterations, under 0.4% for n = 4)."""
    logits = torch.randn(4, 6, n, n, generator=gen(10 + n)) * scale
    M = sinkhorn(logits, 20)
    ones = torch.ones(4, 6, n)
    torch.testing.assert_close(M.sum(-1), ones, rtol=0, atol=1e-5)
    torch.testing.assert_close(M.sum(-2), ones, rtol=0, atol=1e-5)
    assert (torch.linalg.matrix_norm(M.double(), ord=2) <= 1 + 1e-5).all()


def test_sinkhorn_rows_converge_with_iterations_for_peaked_logits():
    """Standard normal * 3 (peaked) logits: 20 iterations leave row sums off by up to ~5e-2, the
    error keeps shrinking with more, and the spectral norm approaches 1 accordingly."""
    logits = torch.randn(64, 4, 4, generator=gen(5), dtype=torch.float64) * 3
    errs = [(sinkhorn(logits, k).sum(-1) - 1).abs().amax().item() for k in (5, 20, 100, 5000)]
    assert errs[1] < 0.1
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-5
    M = sinkhorn(logits, 5000)
    assert (torch.linalg.matrix_norm(M, ord=2) <= 1 + 1e-5).all()


@pytest.mark.parametrize("n, scale", [(2, 1.0), (3, 3.0), (5, 2.0)])
def test_sinkhorn_matches_loop_reference(n, scale):
    logits = torch.randn(4, n, n, generator=gen(n), dtype=torch.float64) * scale
    for iters in (1, 3, 20):
        got64 = sinkhorn(logits, iters)
        got32 = sinkhorn(logits.float(), iters)
        for b in range(4):
            want = sinkhorn_reference(logits[b], iters)
            torch.testing.assert_close(got64[b], want, rtol=0, atol=1e-12)
            torch.testing.assert_close(got32[b].double(), want, rtol=0, atol=2e-6)


def test_sinkhorn_batches_over_leading_dims():
    logits = torch.randn(2, 3, 4, 4, generator=gen(1)) * 2
    M = sinkhorn(logits, 20)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(M[i, j], sinkhorn(logits[i, j], 20), rtol=0, atol=1e-7)


def test_sinkhorn_fixed_point_shift_invariance_and_dtypes():
    D = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(D.log(), 20), D, rtol=0, atol=1e-12)  # already doubly stochastic
    L = torch.randn(5, 3, 3, generator=gen(2), dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(L + 7.0, 20), sinkhorn(L, 20), rtol=0, atol=1e-12)
    assert sinkhorn(L.to(torch.bfloat16), 20).dtype == torch.float32
    extreme = torch.tensor([[0.0, -300.0], [-300.0, -300.0]])  # exp underflows whole rows/columns
    assert torch.isfinite(sinkhorn(extreme, 20)).all()
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(L, 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\]"):
        sinkhorn(torch.zeros(2, 3), 1)


# --------------------------------------------------------------------------- streams and the update

def test_expand_is_a_real_copy_and_collapse_is_the_mean():
    x = torch.randn(2, 3, 5, generator=gen(0))
    xs = expand_streams(x, 4)
    assert xs.shape == (2, 3, 4, 5) and xs.is_contiguous() and xs.stride(-2) == 5
    assert xs.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert all(torch.equal(xs[:, :, i], x) for i in range(4))
    assert torch.equal(collapse_streams(xs), x)  # the mean of 4 equal copies is exact
    ys = torch.randn(2, 3, 3, 5, generator=gen(1))
    torch.testing.assert_close(collapse_streams(ys), (ys[:, :, 0] + ys[:, :, 1] + ys[:, :, 2]) / 3)


def test_one_stream_with_unit_coefficients_is_the_plain_residual():
    branch, _ = mixing_branch(8)
    x = torch.randn(2, 5, 8, generator=gen(2))
    ones = torch.ones(2, 5, 1)
    out = hyper_update(x.unsqueeze(-2), branch, ones, ones, ones.unsqueeze(-1))
    assert torch.equal(out.squeeze(-2), x + branch(x))


def test_hand_computed_two_streams():
    """n = 2, C = 2, one token, F(v) = 10 v, H_pre = e_1, H_post = [1, 0.5]:
    x_in = [1, 2], F = [10, 20]; H_res = I: [[1+10, 2+20], [3+5, 4+10]];
    H_res = swap: [[3+10, 4+20], [1+5, 2+10]]."""
    xs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pre, post = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.5]]])
    eye, swap = torch.eye(2).view(1, 1, 2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    out = hyper_update(xs, lambda v: 10 * v, pre, post, eye)
    assert torch.equal(out, torch.tensor([[[[11.0, 22.0], [8.0, 14.0]]]]))
    assert torch.equal(collapse_streams(out), torch.tensor([[[9.5, 18.0]]]))
    out = hyper_update(xs, lambda v: 10 * v, pre, post, swap)
    assert torch.equal(out, torch.tensor([[[[13.0, 24.0], [6.0, 12.0]]]]))


@pytest.mark.parametrize("n", [2, 3])
def test_forward_matches_per_token_loop(n):
    C = 6
    hc = randomize_(HyperConnection(C, n, 20)).double()
    branch, W = mixing_branch(C)
    xs = torch.randn(2, 3, n, C, generator=gen(n), dtype=torch.float64)

    with torch.no_grad():
        got = hc(xs, lambda x: _double(branch, W, x))
        want = update_reference(hc, xs, lambda x: _double(branch, W, x))
        pre, post, res = hc.coefficients(xs)
        ref = coefficients_reference(hc, xs[1, 2])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(pre[1, 2], torch.tensor(ref[0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(post[1, 2], torch.tensor(ref[1], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(res[1, 2], ref[2], rtol=0, atol=1e-12)
    # float32 as in training: coefficients float32, output within float32 rounding of the reference
    hc32 = hc.float()
    with torch.no_grad():
        got32 = hc32(xs.float(), branch)
        h32 = hc32.coefficients(xs.float())
    assert all(h.dtype == torch.float32 for h in h32) and got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-4)


def _double(branch, W, x):
    """Run the float32 test branch in float64 (its weights cast for the call)."""
    saved = {k: w for k, w in W.items()}
    try:
        for k in W:
            W[k] = saved[k].double()
        return branch(x)
    finally:
        W.update(saved)


def test_forward_leaves_the_input_untouched():
    hc = randomize_(HyperConnection(8, 4, 20))
    xs = torch.randn(2, 3, 4, 8, generator=gen(4))
    before, version = xs.clone(), xs._version
    hc(xs, lambda x: 2 * x)
    assert torch.equal(xs, before) and xs._version == version


def test_mixing_stays_in_stream_dtype_under_autocast():
    """Under bf16 autocast the coefficients and the stream mixing stay float32: with a branch
    free of autocast ops the result equals the one without autocast bitwise."""
    hc = randomize_(HyperConnection(8, 4, 20))
    xs = torch.randn(2, 3, 4, 8, generator=gen(5))
    with torch.no_grad():
        plain = hc(xs, lambda x: torch.tanh(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            coeffs = hc.coefficients(xs)
            auto = hc(xs, lambda x: torch.tanh(x))
            bf16_branch = hc(xs, lambda x: x @ torch.eye(8))  # matmul: bf16 under autocast
    assert all(h.dtype == torch.float32 for h in coeffs)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert bf16_branch.dtype == torch.float32


# --------------------------------------------------------------------------- backward

def test_backward_under_anomaly_detection_reaches_every_parameter():
    C, n, layers = 16, 4, 3
    torch.manual_seed(0)
    hcs = [HyperConnection(C, n, 20) for _ in range(layers)]
    branches = [mixing_branch(C, seed=i) for i in range(layers)]
    x = torch.randn(2, 7, C, generator=gen(6), requires_grad=True)
    noise = 0.1 * torch.randn(2, 7, n, C, generator=gen(7))  # unequal streams: H_res gets gradient
    with torch.autograd.set_detect_anomaly(True):
        x0s = expand_streams(x, n)
        xs = x0s + noise
        for hc, (branch, _) in zip(hcs, branches):
            xs = 0.9 * xs + 0.1 * x0s  # the GPT's per-layer resid/x0 lambdas, on every stream
            xs = hc(xs, branch)
        loss = collapse_streams(xs).square().mean()
        loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for hc in hcs:
        for name, p in hc.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 0, name
    for _, W in branches:
        assert all(w.grad is not None and w.grad.abs().max() > 0 for w in W.values())


def test_backward_under_anomaly_detection_with_autocast():
    C, n = 16, 2
    hc = HyperConnection(C, n, 20)
    branch, _ = mixing_branch(C)
    x = torch.randn(2, 5, C, generator=gen(8), requires_grad=True)
    with torch.autograd.set_detect_anomaly(True), torch.autocast("cpu", dtype=torch.bfloat16):
        out = collapse_streams(hc(hc(expand_streams(x, n), branch), branch))
        out.float().square().mean().backward()
    assert out.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hc.parameters())


# --------------------------------------------------------------------------- init

@pytest.mark.parametrize("n", [2, 4, 16])
def test_init_is_the_documented_static_part(n):
    hc = HyperConnection(8, n, 20)
    assert torch.equal(hc.alpha.detach(), torch.full((3,), ALPHA_INIT))
    with torch.no_grad():
        hc.alpha.zero_()
        pre, post, res = hc.coefficients(torch.randn(1, 2, n, 8, generator=gen(n)))
    torch.testing.assert_close(pre, torch.full_like(pre, 1 / n), rtol=0, atol=1e-6)
    torch.testing.assert_close(post, torch.ones_like(post), rtol=0, atol=0)
    off = (1 - RES_INIT_DIAG) / (n - 1)
    want = torch.full((n, n), off) + (RES_INIT_DIAG - off) * torch.eye(n)
    torch.testing.assert_close(res, want.expand_as(res), rtol=0, atol=1e-6)


def test_init_behaves_like_the_plain_residual_on_equal_streams():
    C, n = 16, 4
    torch.manual_seed(1)
    hc = HyperConnection(C, n, 20)
    branch, _ = mixing_branch(C)
    x = torch.randn(2, 7, C, generator=gen(9))
    with torch.no_grad():
        plain = x + branch(x)
        near = collapse_streams(hc(expand_streams(x, n), branch))
        hc.alpha.zero_()
        exact = hc(expand_streams(x, n), branch)
    assert (near - plain).abs().max() < 0.05 * plain.abs().max()  # alpha = 0.01: ~1% away
    for i in range(n):  # static part only: every stream is x + F(x)
        torch.testing.assert_close(exact[:, :, i], plain, rtol=1e-5, atol=1e-5)


def test_init_weights_after_meta_equals_normal_construction():
    torch.manual_seed(3)
    normal = HyperConnection(16, 4, 20)
    with torch.device("meta"):
        meta = HyperConnection(16, 4, 20)
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    for (name, a), (_, b) in zip(normal.named_parameters(), meta.named_parameters()):
        assert torch.equal(a, b), name
    torch.manual_seed(3)
    again = HyperConnection(16, 4, 20)
    again.init_weights()  # a second init redraws: different phi, same static part
    assert not torch.equal(again.phi, normal.phi) and torch.equal(again.bias_res, normal.bias_res)


def test_parameter_roles_and_matmul_count():
    n, C = 3, 10
    hc = HyperConnection(C, n, 20)
    muon = hc.muon_parameters()
    assert muon == [hc.phi] and all(p.dim() == 2 for p in muon)
    others = [p for p in hc.parameters() if all(p is not q for q in muon)]
    assert sorted(p.numel() for p in others) == sorted([3, n, n, n * n])
    assert hc.matmul_params() == (n * n + 2 * n) * n * C == hc.phi.numel()
