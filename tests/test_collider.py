"""rdn.train.collider (Collider token filtering, arXiv:2502.00340): kept-token counts against a
sort-free oracle; ColliderLinear's gathered backward against per-row loops; filter_fraction 0
and warm-up bitwise the plain model; the whole model's filtered gradient against an independent
masked-gradient oracle (plain nn.Linear, output gradients multiplied by the mask); filtered
rows' residual gradients exactly zero; cosine similarity to the full gradient recorded, not
asserted; bf16 autocast.

Bitwise tests pin one intra-op thread (``torch_threads(1)``): a matmul's reduction order
depends on the thread count, and both sides of a comparison must use the same one."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rdn.model import GPT, GPTConfig
from rdn.train.collider import (BLOCK_LINEARS, ColliderLinear, ColliderSettings, collider_backward,
                                collider_linears_, collider_loss, kept_count, kept_tokens)
from tests.conftest import torch_threads

# --------------------------------------------------------------------------- helpers

B, T, V = 3, 16, 61


def tiny_config(**kw) -> GPTConfig:
    base = dict(sequence_len=T, vocab_size=V, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, head_dim=16,
                use_coordinates=False, vocab_pad_multiple=8)
    return GPTConfig(**{**base, **kw})


def plain_model(**kw) -> GPT:
    """A tiny GPT with every parameter random (the zero-initialised output projections and
    gates too), so every gradient path carries signal."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.train()


def collider_model(plain: GPT, names=BLOCK_LINEARS) -> GPT:
    """A deep copy of ``plain`` with its block linears swapped for ColliderLinear (what
    ``block_linear`` will build), weights copied."""
    model = collider_linears_(copy.deepcopy(plain), names)
    swapped = {n for n, m in model.named_modules() if isinstance(m, ColliderLinear)}
    assert swapped == {n for n, m in plain.named_modules()
                       if isinstance(m, nn.Linear) and n.split(".", 2)[-1] in names}
    return model


def batch(ignored: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    if ignored:
        flat = y.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:ignored]] = -1
    return x, y


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def flat_grad(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for _, v in sorted(g.items())])


# --------------------------------------------------------------------------- settings and selection

def test_settings_validate():
    assert not ColliderSettings().enabled
    s = ColliderSettings(filter_fraction=0.35, warmup_steps=2)
    assert [s.active(i) for i in range(4)] == [False, False, True, True]
    for bad in (-0.1, 1.0, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match="filter_fraction"):
            ColliderSettings(filter_fraction=bad)
    for bad in (-1, 1.5, False):
        with pytest.raises(ValueError, match="warmup_steps"):
            ColliderSettings(filter_fraction=0.2, warmup_steps=bad)


def _oracle_keep(losses: list[float], supervised: list[bool], f: float) -> set[int]:
    """Plain-Python oracle: drop round-half-up(f * n) of the n supervised tokens, lowest
    losses first, the later position first among equal losses."""
    n = sum(supervised)
    n_drop = int(math.floor(f * n + 0.5)) if n else 0
    n_keep = max(n - n_drop, 1) if n else 0
    cands = [i for i in range(len(losses)) if supervised[i]]
    # selection by repeated maximum (no sort): highest loss, earliest index on ties
    kept = set()
    for _ in range(n_keep):
        best = None
        for i in cands:
            if i in kept:
                continue
            if best is None or losses[i] > losses[best]:
                best = i
        kept.add(best)
    return kept


@pytest.mark.parametrize("f", [0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("ignored", [0, 7, 47])
def test_kept_count_exact_and_highest_losses(f, ignored):
    x, y = batch(ignored=ignored, seed=int(100 * f) + ignored)
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(B, T, generator=g).round(decimals=1)   # many ties
    keep = kept_tokens(losses, f, ignore=y == -1)
    n_sup = B * T - ignored
    expected = n_sup - int(math.floor(f * n_sup + 0.5))
    assert int(keep.sum()) == max(expected, 1) == kept_count(n_sup, f)
    assert not keep[y == -1].any()
    oracle = _oracle_keep(losses.view(-1).tolist(), (y != -1).view(-1).tolist(), f)
    assert set(keep.view(-1).nonzero().squeeze(1).tolist()) == oracle
    assert torch.equal(keep, kept_tokens(losses.clone(), f, ignore=y == -1))   # deterministic


def test_kept_count_edges():
    assert kept_count(0, 0.5) == 0
    assert kept_count(1, 0.9) == 1            # never zero of a non-empty micro-batch
    assert kept_count(10, 0.35) == 6          # 3.5 + 0.5 -> drop 4
    assert kept_count(10, 0.34) == 7
    assert kept_count(2048, 0.35) == 2048 - 717
    assert kept_count(100, 0.29) == 71        # 0.29 * 100 = 28.999999999999996 in binary: still drop 29
    losses = torch.zeros(2, 4)
    keep = kept_tokens(losses, 0.5)
    assert keep.view(-1).tolist() == [True] * 4 + [False] * 4   # all tied: the earliest positions


# --------------------------------------------------------------------------- the layer

def test_collider_linear_is_nn_linear_outside_a_collider_forward():
    torch.manual_seed(0)
    ref = nn.Linear(12, 7, bias=True)
    lin = ColliderLinear(12, 7, bias=True)
    lin.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), lin(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(ref.weight.grad, lin.weight.grad) and torch.equal(ref.bias.grad, lin.bias.grad)


@pytest.mark.parametrize("bias", [False, True])
def test_gathered_backward_matches_per_row_loop(bias):
    """dW = sum over kept rows r of outer(dy_r, x_r); dx_r = dy_r W for kept rows, 0 for the
    others; the forward unchanged."""
    torch.manual_seed(1)
    lin = ColliderLinear(6, 5, bias=bias).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 7) < 0.6
    gy = torch.randn(2, 7, 5, dtype=torch.float64)
    with collider_backward(keep):
        y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.backward(gy)
    W = lin.weight.detach()
    dW = torch.zeros(5, 6, dtype=torch.float64)
    db = torch.zeros(5, dtype=torch.float64)
    dx = torch.zeros(2, 7, 6, dtype=torch.float64)
    for b in range(2):
        for t in range(7):
            if keep[b, t]:
                for o in range(5):
                    db[o] += gy[b, t, o]
                    for i in range(6):
                        dW[o, i] += gy[b, t, o] * x[b, t, i].item()
                        dx[b, t, i] += gy[b, t, o] * W[o, i]
    torch.testing.assert_close(lin.weight.grad, dW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    assert (x.grad[~keep] == 0).all()
    if bias:
        torch.testing.assert_close(lin.bias.grad, db, rtol=1e-12, atol=1e-12)


def test_backward_needs_the_kept_rows():
    lin = ColliderLinear(4, 3, bias=False)
    x = torch.randn(2, 5, 4, requires_grad=True)
    with collider_backward():
        y = lin(x)
    with pytest.raises(RuntimeError, match="before the kept tokens were set"):
        y.sum().backward()
    with collider_backward(torch.ones(3, 5, dtype=torch.bool)):
        y = lin(x)
    with pytest.raises(RuntimeError, match="covers 15"):
        y.sum().backward()


def test_collider_linears_swap_shares_parameters():
    plain = plain_model()
    model = collider_linears_(copy.deepcopy(plain))
    before = {n: p for n, p in model.named_parameters()}
    assert list(before) == [n for n, _ in plain.named_parameters()]
    swapped = {n for n, m in model.named_modules() if isinstance(m, ColliderLinear)}
    assert swapped == {f"blocks.{i}.{n}" for i in range(3) for n in BLOCK_LINEARS}
    assert torch.equal(flat_grad(dict(model.state_dict())), flat_grad(dict(plain.state_dict())))


# --------------------------------------------------------------------------- the model

def _plain_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return grads(model)


def _collider_grads(model, x, y, settings, step=0, forward=None):
    model.zero_grad(set_to_none=True)
    loss, kept = collider_loss(forward if forward is not None else model, x, y, None, settings, step)
    loss.backward()
    return grads(model), loss.detach(), kept


@pytest.mark.parametrize("settings,step", [(ColliderSettings(0.0), 5), (ColliderSettings(0.4, warmup_steps=3), 2)])
def test_off_and_warmup_are_bitwise_the_plain_model(settings, step):
    """filter_fraction 0, and a filtering run's warm-up steps: the same loss and gradients,
    bit for bit (one intra-op thread on both sides)."""
    with torch_threads(1):
        plain = plain_model()
        model = collider_model(plain)
        x, y = batch(ignored=5)
        g_plain = _plain_grads(plain, x, y)
        loss_plain = plain(x, y).detach()
        g, loss, kept = _collider_grads(model, x, y, settings, step)
    assert kept == 1.0 and torch.equal(loss, loss_plain)
    assert g.keys() == g_plain.keys()
    for n in g:
        assert torch.equal(g[n], g_plain[n]), n


def _masked_oracle_grads(plain: GPT, x, y, keep, names=BLOCK_LINEARS):
    """Independent oracle: the plain model (nn.Linear everywhere) with each collider layer's
    output gradient multiplied by the kept mask (dense, masked), and the loss the mean of
    the kept tokens' cross-entropy."""
    model = copy.deepcopy(plain)
    model.zero_grad(set_to_none=True)
    mask = keep.unsqueeze(-1).float()
    def mask_output_grad(mod, inp, out):
        out.register_hook(lambda g: g * mask)

    handles = [m.register_forward_hook(mask_output_grad) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name.endswith("." + n) for n in names)]
    logits = model(x)
    per_token = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-1, reduction="none")
    (per_token * keep.reshape(-1)).sum().div(keep.sum()).backward()
    for h in handles:
        h.remove()
    return grads(model)


def _cosine(a: dict, b: dict) -> float:
    return F.cosine_similarity(flat_grad(a), flat_grad(b), dim=0).item()


@pytest.mark.parametrize("f", [0.2, 0.35, 0.6])
def test_filtered_gradient_matches_masked_oracle_and_records_cosine(f, record_property):
    plain = plain_model()
    model = collider_model(plain)
    x, y = batch(ignored=6)
    g, loss, kept = _collider_grads(model, x, y, ColliderSettings(f))
    with torch.no_grad():
        token_losses = plain(x, y, loss_reduction="none")
    keep = kept_tokens(token_losses, f, ignore=y == -1)
    n_sup = int((y != -1).sum())
    assert kept == int(keep.sum()) / n_sup == kept_count(n_sup, f) / n_sup
    # the value is the mean over all supervised tokens (train/loss comparable with f = 0)
    torch.testing.assert_close(loss, plain(x, y).detach(), rtol=1e-6, atol=0)
    oracle = _masked_oracle_grads(plain, x, y, keep)
    assert g.keys() == oracle.keys()
    for n in g:
        torch.testing.assert_close(g[n], oracle[n], rtol=1e-4, atol=1e-6, msg=n)
    full = _plain_grads(plain, x, y)
    loss_only = _masked_oracle_grads(plain, x, y, keep, names=())    # kept-token loss, full backward
    cos, cos_loss_only, cos_layers = _cosine(g, full), _cosine(loss_only, full), _cosine(g, loss_only)
    print(f"\ncollider f={f}: kept {kept:.3f}; cosine to the full gradient {cos:.4f} "
          f"(loss filtering alone {cos_loss_only:.4f}; collider vs loss filtering alone {cos_layers:.4f})")
    record_property(f"cosine_f{f}", cos)
    assert all(math.isfinite(c) and c > 0 for c in (cos, cos_loss_only, cos_layers))


def _residual_grads(model, run) -> list[torch.Tensor]:
    """Gradients of every block's input (the residual stream) during ``run()``'s backward."""
    seen = []

    def pre(mod, args):
        args[0].register_hook(lambda g: seen.append(g.detach().clone()))
    handles = [b.register_forward_pre_hook(pre) for b in model.blocks]
    run()
    for h in handles:
        h.remove()
    assert len(seen) == len(model.blocks)
    return seen


@pytest.mark.parametrize("kw,names,exact", [
    ({"value_embeddings": False}, BLOCK_LINEARS, True),
    ({"value_embeddings": True}, BLOCK_LINEARS + ("attn.ve_gate",), True),
    ({"value_embeddings": True}, BLOCK_LINEARS, False),   # the plain ve_gate leaks filtered dv into the residual rows
    # MoE feed-forward (plain layers, full-size backward): row-wise, so zero rows stay zero
    ({"value_embeddings": False, "moe": {"enabled": True, "num_experts": 4, "top_k": 2}}, BLOCK_LINEARS, True),
])
def test_filtered_rows_get_no_activation_gradient(kw, names, exact):
    """The residual stream's gradient is exactly zero on filtered rows at every block's input
    when every linear that reads it gathers (module docstring), nonzero on kept rows."""
    plain = plain_model(**kw)
    model = collider_model(plain, names)
    x, y = batch()
    f = 0.4
    with torch.no_grad():
        keep = kept_tokens(plain(x, y, loss_reduction="none"), f)

    def run():
        loss, _ = collider_loss(model, x, y, None, ColliderSettings(f), 0)
        loss.backward()
    res = _residual_grads(model, run)
    filtered = torch.stack([r[~keep].abs().max() for r in res])
    kept_rows = torch.stack([r[keep].abs().max() for r in res])
    assert (kept_rows > 0).all()
    if exact:
        assert (filtered == 0).all(), filtered
    else:
        assert (filtered[:-1] > 0).any(), filtered   # below the top layer, the leak is visible


def test_bf16_autocast_runs_and_tracks_fp32():
    plain = plain_model()
    model = collider_model(plain)
    x, y = batch(ignored=4)
    s = ColliderSettings(0.35)
    g32, loss32, kept32 = _collider_grads(model, x, y, s)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, kept = collider_loss(model, x, y, None, s, 0)
    loss.backward()
    g16 = grads(model)
    assert 0 < kept < 1
    assert torch.isfinite(loss) and abs(loss.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in g16.values())
    assert g16.keys() == g32.keys()
    cos = _cosine(g16, g32)
    print(f"\ncollider bf16 vs fp32 filtered gradient (kept {kept:.3f} vs {kept32:.3f}): cosine {cos:.4f}")
    assert cos > 0.9


def test_compiled_model_graph_breaks_around_the_gathered_layers():
    """torch.compile (eager backend: no C compiler needed) traces the inactive path as F.linear
    and runs the active one around graph breaks, with the eager gradients."""
    plain = plain_model()
    model = collider_model(plain)
    x, y = batch()
    s = ColliderSettings(0.4)
    g_eager, _, _ = _collider_grads(model, x, y, s)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    for step in (0, 1):   # a filtering step, then the same again
        g, _, kept = _collider_grads(model, x, y, s, step, forward=compiled)
        for n in g:
            torch.testing.assert_close(g[n], g_eager[n], rtol=1e-5, atol=1e-7, msg=n)
    g_off, _, _ = _collider_grads(model, x, y, ColliderSettings(0.0), forward=compiled)
    for n, v in _plain_grads(plain, x, y).items():
        torch.testing.assert_close(g_off[n], v, rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------- through base_train

def test_base_train_with_collider_logs_kept_fraction_and_resumes_exactly(tiny_artifacts, tmp_path_factory,
                                                                       monkeypatch):
    """`base_train.collider.filter_fraction: 0.4` after one warm-up step: the kept fraction is
    logged (1.0 in warm-up, then exactly the kept count's share), and a run killed after
    checkpoint 2 resumes to the straight run's losses and weights bitwise."""
    import shutil

    from safetensors.torch import load_file

    from rdn.config import validate_params
    from rdn.train.pretrain import run_base_train
    from tests.test_train import RecordingRun, kill_base_loader, tiny_params

    p = tiny_params(num_iterations=4, eval_every=4, save_every=2, sample_every=100).model_dump(mode="json")
    p["base_train"]["collider"] = {"filter_fraction": 0.4, "warmup_steps": 1}
    params = validate_params(p)
    roots = []
    for name in ("straight", "killed"):
        root = tmp_path_factory.mktemp(f"collider_{name}")
        shutil.copytree(tiny_artifacts[0], root / "artifacts/data")
        shutil.copytree(tiny_artifacts[1], root / "artifacts/tokenizer")
        roots.append(root)
    straight = RecordingRun()
    run_base_train(params, roots[0], straight)
    kept = straight.history["train/collider_kept"]
    assert kept[1] == 1.0                                        # warm-up: full backward
    n = 2 * 64                                                   # supervised tokens per micro-batch
    assert all(abs(kept[s] - kept_count(n, 0.4) / n) < 1e-12 for s in (2, 3, 4))

    restore = kill_base_loader(monkeypatch, 2 * 2 + 1)
    with pytest.raises(KeyboardInterrupt):
        run_base_train(params, roots[1], RecordingRun())
    restore()
    resumed = RecordingRun()
    run_base_train(params, roots[1], resumed)
    for step in (3, 4):
        assert resumed.history["train/loss"][step] == straight.history["train/loss"][step]
    a, b = (load_file(str(r / "artifacts/checkpoints/base/step_000004/model.safetensors")) for r in roots)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_collider_with_mtp_or_ternary_is_refused_naming_the_key():
    from rdn.config import ParamsError, validate_params
    from tests.test_train import tiny_params

    p = tiny_params().model_dump(mode="json")
    p["mid_train"]["collider"] = {"filter_fraction": 0.3, "warmup_steps": 0}
    p["model"]["mtp"] = {"num_future": 2}
    p["model"]["ternary"] = {"enabled": True}
    with pytest.raises(ParamsError) as e:
        validate_params(p)
    text = "\n".join(e.value.problems)
    assert "mid_train.collider.filter_fraction" in text and "model.mtp.num_future" in text
    assert "model.ternary.enabled" in text
