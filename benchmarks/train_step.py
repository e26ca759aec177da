"""Training-step throughput of a preset: RDN (coordinates) vs plain GPT, side by side.

Builds the preset's model twice (use_coordinates true/false), runs forward + backward +
MuonAdamW step on synthetic ids whose coordinates come from rdn.coords (computed on the
device inside the timed step, as in training), and prints tok/s, MFU where the device's
peak is known, peak memory, and the RDN/GPT cost ratio (goal: RDN costs <= 5% more).

    python benchmarks/train_step.py                         # params.yaml (tiny, CPU)
    python benchmarks/train_step.py --params configs/d20.yaml --steps 20   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from rdn.config import load_params
from rdn.coords import hierarchical_coordinates
from rdn.model import GPT, GPTConfig
from rdn.train.trainer import peak_flops, peak_memory_mib, resolve_device


def run(params, use_coordinates: bool, device: torch.device, steps: int, warmup: int, compile_model: bool,
        vocab: int, batch: int | None) -> dict:
    cfg = params.base_train
    model_cfg = params.model.model_copy(update={"use_coordinates": use_coordinates})
    config = GPTConfig.from_params(model_cfg, vocab_size=vocab, n_coord_dim=params.coords.n_dim)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    opt = model.setup_optimizer()
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    B, T = batch or cfg.device_batch_size, cfg.seq_len
    g = torch.Generator().manual_seed(0)
    deltas = torch.zeros(vocab, dtype=torch.long)
    r = torch.rand(vocab, generator=g)
    deltas[r < 0.03], deltas[(r >= 0.03) & (r < 0.06)] = 1, -1
    deltas = deltas.to(device)
    ids = torch.randint(1, vocab, (B, T + 1), generator=g).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        x, y = ids[:, :-1], ids[:, 1:]
        coords = hierarchical_coordinates(ids, deltas, 0, params.coords.n_dim)[:, :-1] if use_coordinates else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = fwd(x, y, coords=coords)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = B * T / dt
    peak = peak_flops(device)
    return {"dt_ms": dt * 1e3, "tok_s": tok_s, "mfu": model.estimate_flops() * tok_s / peak if peak else None,
            "mem_mib": peak_memory_mib(device), "params": model.num_scaling_params()["total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default=None, help="default: the params' run.device")
    ap.add_argument("--batch", type=int, default=None, help="override device_batch_size")
    ap.add_argument("--vocab", type=int, default=None, help="default: tokenizer.vocab_size of the params")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    args = ap.parse_args()
    params = load_params(args.params)
    device = resolve_device(args.device or params.run.device)
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    vocab = args.vocab or params.tokenizer.vocab_size
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"date {datetime.date.today()}  device {name}  torch {torch.__version__}  params {args.params}  "
          f"depth {params.model.depth}  B={args.batch or params.base_train.device_batch_size} T={params.base_train.seq_len}  "
          f"compile {compile_model}")
    results = {}
    for mode, coords in (("gpt", False), ("rdn", True)):
        results[mode] = r = run(params, coords, device, args.steps, args.warmup, compile_model, vocab, args.batch)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{mode}: {r['params']:,} params | {r['dt_ms']:8.1f} ms/step | {r['tok_s']:12,.0f} tok/s | "
              f"MFU {mfu} | peak mem {r['mem_mib']:,.0f} MiB")
    cost = results["gpt"]["tok_s"] / results["rdn"]["tok_s"] - 1
    print(f"RDN cost over GPT: {100 * cost:+.1f}% time per token (goal <= +5%)")


if __name__ == "__main__":
    main()
