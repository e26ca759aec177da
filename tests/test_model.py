"""rdn.model: the GPT in both modes, checked against hand arithmetic and slow, obvious references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rdn.config import ModelConfig
from rdn.coords import hierarchical_coordinates
from rdn.model import GPT, GPTConfig, KVCache, attention
import rdn.model.gpt as gpt_module

BOS = 0
VOCAB = 61
N_DIM = 4
MODES = {"rdn": True, "gpt": False}


def tiny_config(use_coordinates: bool = True, **overrides) -> GPTConfig:
    kw = dict(sequence_len=32, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, head_dim=16,
              window_pattern="SL", short_window=8, use_coordinates=use_coordinates, n_coord_dim=N_DIM,
              vocab_pad_multiple=16)
    kw.update(overrides)
    return GPTConfig(**kw)


def delta_table(vocab: int = VOCAB) -> torch.Tensor:
    """A small bracket table: tokens 1-5 open, 6-10 close, 11 opens two levels, the rest are text."""
    deltas = torch.zeros(vocab, dtype=torch.long)
    deltas[1:6], deltas[6:11], deltas[11] = 1, -1, 2
    return deltas


def coords_of(ids: torch.Tensor) -> torch.Tensor:
    return hierarchical_coordinates(ids, delta_table(), BOS, N_DIM)


def random_batch(B: int, T: int, seed: int = 1):
    """Rows of random ids starting with BOS (plus one more document start), shifted targets, coords."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T + 1), generator=g)
    ids[:, 0] = BOS
    ids[:, T // 2] = BOS
    return ids[:, :-1], ids[:, 1:], coords_of(ids)[:, :-1]


def model_for(use_coordinates: bool, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(use_coordinates, **overrides))


@torch.no_grad()
def randomize_(model: GPT, seed: int = 123) -> GPT:
    """Give every parameter a random value, so that every path (output projections, gates,
    coordinate tables, lambdas) changes the output -- the zero-init paths would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "lambdas" in name:
            p.copy_(0.8 + 0.2 * r if name.startswith("resid") else 0.2 * r)
        elif p.dim() == 2 and "embed" not in name and "wte" not in name:
            p.copy_(r / math.sqrt(p.size(1)))
        else:
            p.copy_(r)
    return model


def sgd_step_(model: GPT, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    model.zero_grad(set_to_none=True)


def loss_of(model: GPT, batch) -> torch.Tensor:
    x, y, cx = batch
    return model(x, y, coords=cx if model.config.use_coordinates else None)


# --------------------------------------------------------------------------- training in both modes

@pytest.mark.parametrize("mode", MODES)
def test_initial_loss_is_that_of_a_uniform_prediction(mode):
    model = model_for(MODES[mode])
    loss = loss_of(model, random_batch(4, 32))
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(VOCAB)) < 0.5  # lm_head std 0.001 => near-uniform logits


@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_gets_a_finite_gradient(mode):
    model = model_for(MODES[mode])
    batch = random_batch(4, 32)
    loss_of(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # At init the output projections are zero, so only the paths that bypass them carry signal.
    for name in ["wte.weight", "lm_head.weight", "blocks.0.attn.c_proj.weight", "blocks.0.mlp.c_proj.weight"] \
            + (["coord_embed.weight"] if MODES[mode] else []):
        assert grads[name].abs().sum() > 0, name
    # One step makes the projections non-zero; from then on every parameter learns,
    # the zero-initialised value-embedding gates included.
    sgd_step_(model, 0.5)
    loss_of(model, batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert any(".ve_gate." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("mode", MODES)
def test_sgd_memorises_a_fixed_batch(mode):
    model = model_for(MODES[mode])
    batch = random_batch(4, 32)
    losses = []
    for _ in range(15):
        loss = loss_of(model, batch)
        losses.append(loss.item())
        loss.backward()
        sgd_step_(model, 1.0)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_gpt_mode_has_no_coordinate_parameters_and_trains_under_anomaly_detection():
    model = model_for(False)
    assert model.coord_embed is None
    assert not [n for n, _ in model.named_parameters() if "coord" in n]
    assert model.num_scaling_params()["coord_embeds"] == 0
    x, y, _ = random_batch(2, 32)
    with torch.autograd.set_detect_anomaly(True):
        for _ in range(2):  # the second step runs on weights the first one changed
            loss = model(x, y)
            loss.backward()
            sgd_step_(model, 0.5)
    assert torch.isfinite(loss)


def test_gpt_mode_ignores_coordinates_with_one_warning():
    model = randomize_(model_for(False))
    x, _, cx = random_batch(2, 16)
    plain = model(x)
    with pytest.warns(UserWarning, match="ignored"):
        with_coords = model(x, coords=cx)
    assert torch.equal(plain, with_coords)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, coords=cx)  # warned once per model, not every step


def test_rdn_mode_requires_coordinates():
    model = model_for(True)
    x, y, cx = random_batch(2, 16)
    with pytest.raises(ValueError, match="coordinates are required.*CoordinateCalculator"):
        model(x, y)
    with pytest.raises(ValueError, match="coords must have shape"):
        model(x, y, coords=cx[..., :2])


def test_rdn_model_starts_as_the_gpt_baseline():
    """Zero coordinate tables that draw no random numbers: same seed => same function at init."""
    x, _, cx = random_batch(2, 32)
    torch.testing.assert_close(model_for(True, seed=5)(x, coords=cx), model_for(False, seed=5)(x), rtol=0, atol=0)


def test_loss_reductions_match_a_direct_log_softmax():
    model = randomize_(model_for(True))
    x, y, cx = random_batch(2, 16)
    y = y.clone()
    y[0, :5] = -1  # ignored positions
    logits = model(x, coords=cx)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    nll = -torch.log_softmax(logits.double(), -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(y == -1, 0.0, nll)
    per_token = model(x, y, coords=cx, loss_reduction="none")
    assert per_token.shape == (2, 16)
    torch.testing.assert_close(per_token.double(), nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x, y, coords=cx).double(), nll.sum() / (y != -1).sum(), rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= model.config.logit_softcap


# --------------------------------------------------------------------------- structure

@pytest.mark.parametrize("n_layer, ve_layers", [(4, [1, 3]), (5, [0, 2, 4])])
def test_value_embeddings_sit_on_alternating_layers_ending_at_the_last(n_layer, ve_layers):
    model = model_for(True, n_layer=n_layer)
    assert sorted(int(k) for k in model.value_embeds) == ve_layers
    for i, block in enumerate(model.blocks):
        gate = block.attn.ve_gate
        if i in ve_layers:
            assert model.value_embeds[str(i)].weight.shape == (64, 2 * 16)  # padded vocab, n_kv_head*head_dim
            assert gate.weight.shape == (2, 32) and torch.count_nonzero(gate.weight) == 0
        else:
            assert gate is None
    assert model.resid_lambdas.shape == model.x0_lambdas.shape == (n_layer,)
    assert torch.all(model.resid_lambdas == 1.0)
    no_ve = model_for(True, n_layer=n_layer, value_embeddings=False)
    assert len(no_ve.value_embeds) == 0 and all(b.attn.ve_gate is None for b in no_ve.blocks)


@pytest.mark.parametrize("pattern, n_layer, expected", [
    ("L", 4, [64, 64, 64, 64]),
    ("L", 6, [64, 64, 64, 64, 64, 64]),
    ("SL", 4, [32, 64, 32, 64]),
    ("SL", 6, [32, 64, 32, 64, 32, 64]),
    ("SSSL", 4, [32, 32, 32, 64]),
    ("SSSL", 6, [32, 32, 32, 64, 32, 64]),
    ("S", 4, [32, 32, 32, 64]),  # the last layer is full even when the pattern says S
])
def test_window_sizes(pattern, n_layer, expected):
    cfg = GPTConfig(sequence_len=64, n_layer=n_layer, window_pattern=pattern, n_embd=64, head_dim=32)
    assert cfg.window_sizes() == expected
    cfg = GPTConfig(sequence_len=64, n_layer=n_layer, window_pattern=pattern, short_window=16, n_embd=64, head_dim=32)
    assert cfg.window_sizes() == [16 if w == 32 else w for w in expected]


def test_config_from_params_and_validation():
    params = ModelConfig(depth=2, aspect_ratio=64, head_dim=64, sequence_len=64, window_pattern="SL")
    cfg = GPTConfig.from_params(params, vocab_size=1000, n_coord_dim=6)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer) == (128, 2, 2, 2)
    assert cfg.padded_vocab_size == 1024 and cfg.window_sizes() == [32, 64] and cfg.n_coord_dim == 6
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=3, n_kv_head=2)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig(window_pattern="SXL")


def test_coordinate_embedding_equals_the_sum_of_per_dimension_tables():
    model = randomize_(model_for(True))
    T, n = model.config.sequence_len, N_DIM
    W = model.coord_embed.weight
    g = torch.Generator().manual_seed(3)
    coords = torch.randint(0, T, (3, 20, n), generator=g)
    coords[0, 0] = T + 7  # past the table: clamped to the last row
    expected = torch.zeros(3, 20, model.config.n_embd)
    for d in range(n):
        table_d = W[d * T:(d + 1) * T]
        expected = expected + table_d[coords[..., d].clamp(max=T - 1)]
    torch.testing.assert_close(model.coordinate_embedding(coords), expected)
    # and it is what the model adds to the token embedding
    idx = torch.randint(0, VOCAB, (3, 20), generator=g)
    torch.testing.assert_close(model._embed(idx, coords), model.wte(idx) + expected)


def test_flops_and_parameter_counts_by_hand():
    cfg = GPTConfig(sequence_len=64, vocab_size=250, vocab_pad_multiple=64, n_layer=2, n_embd=128, head_dim=64,
                    n_head=2, n_kv_head=2, window_pattern="SL", short_window=32, n_coord_dim=3)
    model = GPT(cfg)
    C, V = 128, 256  # 250 padded up to a multiple of 64
    c_q = c_k = c_v = c_proj = 128 * 128      # q: 2 heads x 64; k, v: 2 kv heads x 64
    c_fc = mlp_proj = 128 * 512
    per_layer = c_q + c_k + c_v + c_proj + c_fc + mlp_proj  # 196_608
    ve_gate = 32 * 2                            # only layer 1 (the last) of 2 layers has one
    matrices = 2 * per_layer + ve_gate          # 393_280
    lm_head = C * V                             # 32_768
    attn = 12 * 2 * 64 * 32 + 12 * 2 * 64 * 64  # layer 0 window 32, layer 1 full 64
    assert model.estimate_flops() == 6 * (matrices + lm_head) + attn == 2_703_744
    wte = V * C
    value_embeds = V * 2 * 64
    coord_embeds = 3 * 64 * C
    assert model.num_scaling_params() == dict(
        wte=wte, value_embeds=value_embeds, coord_embeds=coord_embeds, lm_head=lm_head,
        transformer_matrices=matrices, scalars=2 + 2,
        total=wte + value_embeds + coord_embeds + lm_head + matrices + 4,
        active=wte + value_embeds + coord_embeds + lm_head + matrices + 4)  # no MoE: every parameter is active
    assert model.num_scaling_params()["total"] == 516_164


# --------------------------------------------------------------------------- attention

def naive_attention(q, k, v, window):
    """Loop over queries: softmax over the visible keys (queries are the last Tq positions)."""
    B, Hq, Tq, D = q.shape
    Tk, rep = k.size(2), Hq // k.size(1)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                pos = Tk - Tq + i
                lo = 0 if window is None else max(0, pos - window + 1)
                keys, vals = k[b, h // rep, lo:pos + 1], v[b, h // rep, lo:pos + 1]
                w = torch.softmax(keys @ q[b, h, i] / math.sqrt(D), dim=0)
                out[b, h, i] = w @ vals
    return out


@pytest.mark.parametrize("t_q, t_k, window", [
    (12, 12, None), (12, 12, 4), (12, 12, 1), (12, 12, 30),
    (3, 12, None), (3, 12, 4), (1, 12, 5), (1, 12, None), (5, 5, 2),
])
def test_attention_matches_naive_softmax(t_q, t_k, window):
    g = torch.Generator().manual_seed(t_q * 100 + t_k + (window or 0))
    q = torch.randn(2, 4, t_q, 8, generator=g)
    k, v = torch.randn(2, 2, t_k, 8, generator=g), torch.randn(2, 2, t_k, 8, generator=g)
    torch.testing.assert_close(attention(q, k, v, window), naive_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t_q, t_k, window", [(12, 12, None), (12, 12, 4), (3, 12, None), (1, 12, 5), (1, 12, None)])
def test_key_mask_hides_left_padding(t_q, t_k, window):
    """Row b with its first pad[b] keys masked: its real queries equal naive attention over that
    row alone without the pads (the pads' keys are garbage, so any leak shows); its pad queries
    stay finite."""
    g = torch.Generator().manual_seed(t_q * 7 + t_k)
    pad = [0, 3, 7]
    q = torch.randn(3, 4, t_q, 8, generator=g)
    k, v = torch.randn(3, 2, t_k, 8, generator=g), torch.randn(3, 2, t_k, 8, generator=g)
    for b, n in enumerate(pad):
        k[b, :, :n], v[b, :, :n] = 1e3, 1e3
    key_mask = torch.arange(t_k)[None, :] >= torch.tensor(pad)[:, None]
    out = attention(q, k, v, window, key_mask)
    assert torch.isfinite(out).all()
    for b, n in enumerate(pad):
        real_q = max(0, n - (t_k - t_q))  # the first query that is a real token
        want = naive_attention(q[b:b + 1, :, real_q:], k[b:b + 1, :, n:], v[b:b + 1, :, n:], window)
        torch.testing.assert_close(out[b:b + 1, :, real_q:], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        attention(q, k, v, window, key_mask[:, 1:])


def test_model_layers_use_their_windows(monkeypatch):
    """The whole model with a naive attention that takes each layer's window from a hand-written
    list (not from the model) gives the same output as the real dispatch."""
    model = randomize_(model_for(True, n_layer=4, window_pattern="SSL", short_window=5))
    x, _, cx = random_batch(2, 20)
    fast = model(x, coords=cx)
    hand = [5, 5, None, None]  # S S L | S -> forced full (last layer)
    calls = []

    def oracle(q, k, v, window, key_mask=None):
        assert key_mask is None  # no KV cache, no padding
        calls.append(window)
        return naive_attention(q, k, v, hand[len(calls) - 1])

    monkeypatch.setattr(gpt_module, "attention", oracle)
    torch.testing.assert_close(model(x, coords=cx), fast, rtol=1e-4, atol=1e-4)
    assert calls == hand


# --------------------------------------------------------------------------- KV cache

def greedy_recompute(model, ids, steps):
    rdn = model.config.use_coordinates
    for _ in range(steps):
        logits = model(ids, coords=coords_of(ids) if rdn else None)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def feed(model, ids, start, cache):
    """Run the tokens ids[:, start:] through the cache; the caller slices the coordinates."""
    coords = coords_of(ids)[:, start:] if model.config.use_coordinates else None
    return model(ids[:, start:], coords=coords, kv_cache=cache)


def greedy_cached(model, ids, steps, cache):
    for _ in range(steps):
        logits = feed(model, ids, cache.pos, cache)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def prompt(B, T=6, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    ids[:, 0] = BOS
    ids[:, 2:3] = 1  # an opener, so coordinates leave dimension 0
    return ids


@pytest.mark.parametrize("pattern", ["L", "SL"])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_kv_cache_greedy_decoding_equals_recomputation(mode, pattern):
    model = randomize_(model_for(MODES[mode], window_pattern=pattern, short_window=6)).eval()
    ids = prompt(2)
    want = greedy_recompute(model, ids, 20)
    cache = KVCache.for_model(model, batch_size=2)
    feed(model, ids[:, :4], 0, cache)  # prefill in two chunks: the second attends to a cached prefix
    logits = feed(model, ids, 4, cache)
    assert cache.pos == 6
    torch.testing.assert_close(logits, model(ids, coords=coords_of(ids) if MODES[mode] else None)[:, 4:],
                               rtol=1e-4, atol=1e-4)
    got = greedy_cached(model, torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1), 19, cache)
    assert got.shape == (2, 26) and cache.pos == 25
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_kv_cache_expand_forks_the_prefill(mode):
    model = randomize_(model_for(MODES[mode], window_pattern="SL", short_window=6)).eval()
    ids = prompt(1)
    single = KVCache.for_model(model, batch_size=1)
    feed(model, ids, 0, single)
    fork = single.expand(3)
    assert fork.batch_size == 3 and fork.pos == single.pos == 6
    # each sample continues from the shared prefill with its own next token
    firsts = torch.tensor([[11], [20], [7]])
    rows = torch.cat([ids.expand(3, -1), firsts], dim=1)
    got = greedy_cached(model, rows, 10, fork)
    for r in range(3):
        assert torch.equal(got[r:r + 1], greedy_recompute(model, rows[r:r + 1], 10))
    assert single.pos == 6  # the fork is independent of its source
    single.set_padding([2])
    assert single.expand(3).key_mask(4).tolist() == [[False, False, True, True]] * 3
    single.set_padding([0])
    assert single.key_mask(4) is None
    single.reset()
    assert single.pos == 0


@torch.no_grad()
def test_kv_cache_refuses_to_overflow():
    model = model_for(False)
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    model(prompt(1, T=8), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(prompt(1, T=1), kv_cache=cache)


# --------------------------------------------------------------------------- init and optimizer groups

def test_seeded_init_is_reproducible():
    a, b, c = model_for(True, seed=11), model_for(True, seed=11), model_for(True, seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["wte.weight"], sc["wte.weight"])
    s = math.sqrt(3) / math.sqrt(64)
    w = a.blocks[0].attn.c_q.weight
    assert w.abs().max() <= s and w.abs().max() > 0.9 * s  # uniform(-s, s)
    assert torch.count_nonzero(a.blocks[0].attn.c_proj.weight) == 0


def test_meta_construction_then_init_weights():
    """The training path builds on the meta device, then to_empty + init_weights: it must give
    the same weights and buffers as init_weights on a normally built model from the same RNG state."""
    with torch.device("meta"):
        lazy = GPT(tiny_config(True))
    lazy.to_empty(device="cpu")
    torch.manual_seed(4)
    lazy.init_weights()
    eager = model_for(True)
    torch.manual_seed(4)
    eager.init_weights()
    for (name, a), b in zip(lazy.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), name
    for buf in ("cos", "sin", "coord_offsets"):
        assert torch.equal(getattr(lazy, buf), getattr(eager, buf)), buf


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_groups_cover_every_parameter_once(mode):
    model = model_for(MODES[mode])
    groups = model.optimizer_param_groups(weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}

    muon = [g for g in groups if g["kind"] == "muon"]
    adamw = [g for g in groups if g["kind"] == "adamw"]
    assert len(muon) + len(adamw) == len(groups)
    block_params = {id(p) for p in model.blocks.parameters()}
    assert {id(p) for g in muon for p in g["params"]} == block_params
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted(set(shapes))
    # n_embd 64, head_dim 16, 4 heads, 2 kv heads: c_k/c_v (32, 64), ve_gate (2, 32), c_q/c_proj (64, 64)
    assert shapes == [(2, 32), (32, 64), (64, 64), (64, 256), (256, 64)]
    for g in muon:
        assert all(p.dim() == 2 and tuple(p.shape) == tuple(g["params"][0].shape) for p in g["params"])
        assert {k: g[k] for k in ("lr", "momentum", "ns_steps", "beta2", "weight_decay")} == \
            dict(lr=0.02, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.1)

    scale = (64 / 768) ** -0.5
    by_param = {id(p): g for g in adamw for p in g["params"]}
    assert by_param[id(model.lm_head.weight)]["lr"] == pytest.approx(0.004 * scale)
    assert by_param[id(model.wte.weight)]["lr"] == pytest.approx(0.3 * scale)
    assert by_param[id(model.value_embeds["0"].weight)]["lr"] == pytest.approx(0.3 * scale)
    assert by_param[id(model.resid_lambdas)]["lr"] == pytest.approx(0.5 * 0.01)
    assert by_param[id(model.x0_lambdas)]["lr"] == 0.5 and by_param[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    if MODES[mode]:
        assert by_param[id(model.coord_embed.weight)]["lr"] == pytest.approx(0.3 * scale)
    for g in adamw:
        assert g["eps"] == 1e-10 and g["weight_decay"] == 0.0 and len(g["betas"]) == 2


def test_setup_optimizer_steps():
    model = model_for(True)
    opt = model.setup_optimizer()
    before = model.wte.weight.detach().clone()
    loss_of(model, random_batch(2, 16)).backward()
    opt.step()
    assert not torch.equal(before, model.wte.weight)
