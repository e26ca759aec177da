"""Collider (arXiv:2502.00340) backward time against ``filter_fraction`` at one preset, against
seed 004's claim of 35 % faster backprop at about 40 % of tokens filtered.

Builds the preset's model twice with the same weights: plain (``nn.Linear`` blocks), and with
the six block linears as :class:`~rdn.train.collider.ColliderLinear` (what ``block_linear``
builds when collider is on). A third copy also gathers the lm_head and the value-embedding
gate (not what the factory builds: how much more the other linears would give). Rows:

- ``f=0`` the plain model's ``model(x, y).backward()`` -- the baseline;
- ``f=0.2 / 0.4 / 0.6`` :func:`~rdn.train.collider.collider_loss` on the collider model;
- ``f=0.4 +lm_head,ve_gate`` the same with the third copy;
- ``f=0.4 loss only`` the plain model with the kept tokens' mean loss and a full backward
  (loss filtering without Collider's gathered backward: what the paper improves on).

One forward + backward of a ``device_batch_size x seq_len`` micro-batch of synthetic ids per
row, rows interleaved (one of each, repeated) so load from other processes falls on every
row alike; the forward (with the token selection) and the backward are timed apart; median
over ``--steps`` after 2 warm-up rounds, at each ``--threads`` count (``backward x (min)``: the
ratio of the fastest backwards, the least disturbed by other processes; ``backward x (CPU
time)``: of the process's CPU time, which time slices lost to other processes do not inflate
-- the robust figure at 1 thread on a shared machine; at 2 threads it also counts OpenMP
spin-waiting). ``ideal`` is the backward
time ratio if backward time were proportional to backward FLOPs: ``1 - f * share``, with
``share`` the gathered layers' part of the backward FLOPs (linears 4 per weight per token, the
attention core ``8 * n_head * head_dim * window``, i.e. twice its forward).

    python benchmarks/collider.py                          # params.yaml (tiny, CPU), 1 and 2 threads
    python benchmarks/collider.py --steps 20 --threads 2
    python benchmarks/collider.py --params configs/d12.yaml --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from rdn.config import load_params
from rdn.coords import hierarchical_coordinates
from rdn.device import cpu_capability, resolve_device
from rdn.model import GPT, GPTConfig
from rdn.train.collider import BLOCK_LINEARS, ColliderSettings, collider_linears_, collider_loss, kept_tokens

SEED_CLAIM = (0.4, -0.35)   # seed 004: backprop 35 % faster at about 40 % of tokens filtered
FRACTIONS = (0.2, 0.4, 0.6)
EXTRA = ("attn.ve_gate", "lm_head")


def build(params, vocab: int, device: torch.device) -> GPT:
    config = GPTConfig.from_params(params.model, vocab_size=vocab, n_coord_dim=params.coords.n_dim, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():   # the zero-initialised projections random too (a trained model's gradients everywhere)
        for block in model.blocks:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0.0, 0.02)
    return model.train()


def backward_flops_share(model: GPT, names) -> float:
    """Part of the backward FLOPs per token in the linears named ``names`` (linears: 4 FLOPs
    per weight; attention core: twice its forward ``4 * n_head * head_dim * window``)."""
    cfg = model.config
    linear = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = 4 * sum(linear.values()) + sum(8 * cfg.n_head * cfg.head_dim * w for w in cfg.window_sizes())
    gathered = 4 * sum(v for n, v in linear.items() if any(n == k or n.endswith("." + k) for k in names))
    return gathered / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (after 2 warm-up rounds)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2],
                    help="torch intra-op thread counts to run (0 = torch's default)")
    ap.add_argument("--device", default=None, help="override run.device")
    args = ap.parse_args()
    params = load_params(args.params)
    device = resolve_device(args.device or params.run.device)
    B, T = params.base_train.device_batch_size, params.base_train.seq_len
    vocab = params.tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    x, y = idx[:, :-1], idx[:, 1:]
    deltas = torch.zeros(vocab, dtype=torch.long)   # 3 % of the vocabulary opens a bracket, 3 % closes one
    r = torch.rand(vocab, generator=g)
    deltas[r < 0.03], deltas[(r >= 0.03) & (r < 0.06)] = 1, -1
    plain = build(params, vocab, device)
    coords = (hierarchical_coordinates(x, deltas.to(device), 0, params.coords.n_dim)
              if plain.config.use_coordinates else None)
    blocks = collider_linears_(copy.deepcopy(plain), BLOCK_LINEARS)
    wider = collider_linears_(copy.deepcopy(plain), BLOCK_LINEARS + EXTRA)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain_loss():
        return plain(x, y, coords=coords), 1.0

    def loss_only(f):
        def run():
            per_token = plain(x, y, coords=coords, loss_reduction="none")
            keep = kept_tokens(per_token, f, y == -1)
            return torch.where(keep, per_token, 0.0).sum() / keep.sum(), keep.float().mean().item()
        return run

    def collider(model, f):
        return lambda: collider_loss(model, x, y, coords, ColliderSettings(f), 0)

    rows = {"0 (plain)": (plain, plain_loss, 0.0, ())}
    for f in FRACTIONS:
        rows[f"{f}"] = (blocks, collider(blocks, f), f, BLOCK_LINEARS)
    rows["0.4 +lm_head,ve_gate"] = (wider, collider(wider, 0.4), 0.4, BLOCK_LINEARS + EXTRA)
    rows["0.4 loss only"] = (plain, loss_only(0.4), 0.4, ())

    def step(name):
        model, run, _, _ = rows[name]
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss, kept = run()
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c1, kept

    print(f"# collider at {args.params} (depth {params.model.depth}, width {params.model.width}, B x T = {B} x {T}, "
          f"vocab {vocab}), {datetime.date.today()}, {platform.processor() or platform.machine()}, device {device}"
          + (f", CPU capability {cpu_capability()}" if device.type == "cpu" else "")
          + f", median of {args.steps} interleaved rounds after 2 warm-up")
    print(f"# seed 004 claim: backward {100 * SEED_CLAIM[1]:+.0f} % at filter_fraction {SEED_CLAIM[0]} "
          f"(reference line: backward x {1 + SEED_CLAIM[1]:.2f})")
    for threads in args.threads:
        if threads:
            torch.set_num_threads(threads)
        times = {n: ([], [], [], []) for n in rows}
        for i in range(args.steps + 2):
            for n in rows:
                fwd, bwd, bwd_cpu, kept = step(n)
                if i >= 2:
                    for series, v in zip(times[n], (fwd, bwd, bwd_cpu, kept)):
                        series.append(v)
        base_f, base_b = (statistics.median(v) for v in times["0 (plain)"][:2])
        print(f"\n## {torch.get_num_threads()} thread(s)\n")
        best_b = min(times["0 (plain)"][1])
        base_cpu = statistics.median(times["0 (plain)"][2])
        print("| filter_fraction | kept | forward ms | backward ms | backward x | backward x (min) | "
              "backward x (CPU time) | ideal x | seed x | fwd+bwd ms | fwd+bwd x |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, (model, _, f, names) in rows.items():
            fw, bw = statistics.median(times[n][0]), statistics.median(times[n][1])
            cpu, kept = statistics.median(times[n][2]), statistics.mean(times[n][3])
            ideal = 1 - f * backward_flops_share(model, names) if names else 1.0
            seed = f"{1 + SEED_CLAIM[1]:.2f}" if f == SEED_CLAIM[0] and names else "-"
            print(f"| {n} | {kept:.3f} | {1000 * fw:,.1f} | {1000 * bw:,.1f} | {bw / base_b:.2f} | "
                  f"{min(times[n][1]) / best_b:.2f} | {cpu / base_cpu:.2f} | {ideal:.2f} | "
                  f"{seed} | {1000 * (fw + bw):,.1f} | {(fw + bw) / (base_f + base_b):.2f} |")
    print(f"\nshare of backward FLOPs gathered: block linears {backward_flops_share(plain, BLOCK_LINEARS):.3f}, "
          f"+lm_head,ve_gate {backward_flops_share(plain, BLOCK_LINEARS + EXTRA):.3f}")


if __name__ == "__main__":
    main()
