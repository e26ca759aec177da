"""Training-step cost of a preset: forward+backward and the MuonAdamW step timed apart, with
Muon's orthogonalization in float32 and in bf16 side by side, for RDN (coordinates) and GPT.

Builds the preset's model once per (mode, orthogonalization dtype), then takes their steps in
turn (one step of each configuration, repeated), so load from other processes on a shared
machine falls on every row alike: forward + backward of one ``device_batch_size x seq_len``
micro-batch of synthetic ids whose coordinates come from rdn.coords (computed on the device
inside the timed forward, as in training), then the optimizer step. Prints the median of each
over the timed steps, their ratio (optimizer step / forward+backward of one micro-batch;
training accumulates ``total_batch_size / (B * T)`` micro-batches per step, so there the
optimizer's share is smaller still), tok/s, MFU where the device's peak is known and the
run's peak memory. The header names the CPU capability ATen dispatches
to, whether oneDNN runs bf16 matmuls natively, and the dtype ``optim.orthogonalization_dtype:
auto`` picks on this machine; the RDN/GPT line compares the rows in that dtype.

    python benchmarks/train_step.py                          # params.yaml (tiny, CPU)
    python benchmarks/train_step.py --force-avx2             # as an AVX2-only CPU (see below)
    python benchmarks/train_step.py --params configs/d20.yaml --steps 20   # on a GPU

``--force-avx2`` re-executes the script with ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN: no AVX-512,
so no native bf16 matmul, and torch's bf16 probe says so), ``ATEN_CPU_CAPABILITY=avx2`` (ATen's
own kernels) and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL's float32 GEMMs): an approximation of
an AVX2-only CPU on a newer one (same cores, clocks and caches; AVX2 code paths).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

FORCED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
if "--force-avx2" in sys.argv and any(os.environ.get(k) != v for k, v in FORCED_AVX2.items()):
    # read once when the libraries load: restart with them set
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **FORCED_AVX2})

import torch  # noqa: E402

from rdn.config import load_params  # noqa: E402
from rdn.coords import hierarchical_coordinates  # noqa: E402
from rdn.device import (cpu_bf16_matmul_native, cpu_capability, dtype_name, orthogonalization_dtype,  # noqa: E402
                        peak_flops, peak_memory_mib, resolve_device)
from rdn.model import GPT, GPTConfig  # noqa: E402


def make_step(params, use_coordinates: bool, ortho: str, device: torch.device, compile_model: bool, vocab: int,
              batch: int | None):
    """A model of the preset with its MuonAdamW (orthogonalization in ``ortho``) and a function
    that takes one training step and returns (forward+backward seconds, optimizer seconds)."""
    cfg = params.base_train
    model_cfg = params.model.model_copy(update={"use_coordinates": use_coordinates})
    config = GPTConfig.from_params(model_cfg, vocab_size=vocab, n_coord_dim=params.coords.n_dim)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    opt = model.setup_optimizer(ortho_dtype=ortho)
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    B, T = batch or cfg.device_batch_size, cfg.seq_len
    g = torch.Generator().manual_seed(0)
    deltas = torch.zeros(vocab, dtype=torch.long)
    r = torch.rand(vocab, generator=g)
    deltas[r < 0.03], deltas[(r >= 0.03) & (r < 0.06)] = 1, -1
    deltas = deltas.to(device)
    ids = torch.randint(1, vocab, (B, T + 1), generator=g).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        x, y = ids[:, :-1], ids[:, 1:]
        coords = hierarchical_coordinates(ids, deltas, 0, params.coords.n_dim)[:, :-1] if use_coordinates else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = fwd(x, y, coords=coords)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, time.perf_counter() - t1

    info = {"tokens": B * T, "flops_per_token": model.estimate_flops(),
            "params": model.num_scaling_params()["total"]}
    return step, info


def summarize(times: list[tuple[float, float]], info: dict, device: torch.device) -> dict:
    fb = statistics.median(t[0] for t in times)
    op = statistics.median(t[1] for t in times)
    total = statistics.median(t[0] + t[1] for t in times)
    tok_s = info["tokens"] / total
    peak = peak_flops(device)
    return {"fb_ms": fb * 1e3, "opt_ms": op * 1e3, "ratio": op / fb, "dt_ms": total * 1e3, "tok_s": tok_s,
            "mfu": info["flops_per_token"] * tok_s / peak if peak else None, "params": info["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (medians are over these)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default=None, help="default: the params' run.device")
    ap.add_argument("--batch", type=int, default=None, help="override device_batch_size")
    ap.add_argument("--vocab", type=int, default=None, help="default: tokenizer.vocab_size of the params")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--modes", default="gpt,rdn", help="comma-separated subset of gpt,rdn")
    ap.add_argument("--ortho", default="float32,bfloat16",
                    help="comma-separated orthogonalization dtypes to time: float32, bfloat16, auto")
    ap.add_argument("--force-avx2", action="store_true", help="run as an AVX2-only CPU (see above)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    device = resolve_device(args.device or params.run.device)
    compile_model = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    vocab = args.vocab or params.tokenizer.vocab_size
    auto = dtype_name(orthogonalization_dtype("auto", device))
    orthos = list(dict.fromkeys(auto if o == "auto" else o for o in args.ortho.split(",")))
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"gpt", "rdn"} or set(orthos) - {"float32", "bfloat16"}:
        ap.error("--modes takes gpt,rdn and --ortho float32,bfloat16,auto")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"date {datetime.date.today()}  device {name}  torch {torch.__version__}  params {args.params}  "
          f"depth {params.model.depth}  B={args.batch or params.base_train.device_batch_size} T={params.base_train.seq_len}  "
          f"compile {compile_model}  steps {args.steps} (+{args.warmup} warm-up)")
    forced = " ".join(f"{k}={os.environ[k]}" for k in FORCED_AVX2 if k in os.environ) or "-"
    print(f"CPU capability {cpu_capability()}  bf16 matmul native (oneDNN) {cpu_bf16_matmul_native()}  "
          f"optim.orthogonalization_dtype auto -> {auto}  ISA env {forced}")
    # Every configuration is built first and their steps are interleaved (one step of each in
    # turn), so a change in machine load during the run hits every row alike.
    configs = [(mode, ortho) for mode in modes for ortho in orthos]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steppers = {c: make_step(params, c[0] == "rdn", c[1], device, compile_model, vocab, args.batch) for c in configs}
    for _ in range(args.warmup):
        for c in configs:
            steppers[c][0]()
    times: dict = {c: [] for c in configs}
    for _ in range(args.steps):
        for c in configs:
            times[c].append(steppers[c][0]())
    print(f"{'mode':4} {'ortho':9} {'params':>10} {'fwd+bwd ms':>11} {'optim ms':>9} {'optim/fb':>8} "
          f"{'ms/step':>8} {'tok/s':>8} {'MFU':>6}")
    results = {}
    for c in configs:
        results[c] = r = summarize(times[c], steppers[c][1], device)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{c[0]:4} {c[1]:9} {r['params']:>10,} {r['fb_ms']:11.1f} {r['opt_ms']:9.1f} {r['ratio']:8.2f} "
              f"{r['dt_ms']:8.1f} {r['tok_s']:8,.0f} {mfu:>6}")
    print(f"peak memory of the run (all {len(configs)} models): {peak_memory_mib(device):,.0f} MiB")
    if ("gpt", auto) in results and ("rdn", auto) in results:
        cost = results["gpt", auto]["tok_s"] / results["rdn", auto]["tok_s"] - 1
        print(f"RDN cost over GPT ({auto} orthogonalization): {100 * cost:+.1f}% time per token (goal <= +5%)")


if __name__ == "__main__":
    main()
