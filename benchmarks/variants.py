"""Cost of each model variant against the baseline at one preset: training-step time,
parameters (total and active) and FLOPs per token, side by side in one run.

Builds the preset's model once per variant (baseline, MoE, mHC, MTP, ternary, and all four
together, each with the settings below on top of the preset's ``model`` section), then times
their training steps in turn -- one step of each variant, repeated -- so load from other
processes on a shared machine falls on every row alike. A step is forward + backward of one
``device_batch_size x seq_len`` micro-batch of synthetic ids (coordinates from rdn.coords,
computed inside the timed region as in training), then the MuonAdamW step and the
variants' after-step hook (MoE's bias update). Prints the median step time, its ratio to the
baseline's, tok/s, parameters and FLOPs per token (``GPT.estimate_flops``) and the ratio of
time to FLOPs (how much of a variant's FLOPs overhead shows up as time).

    python benchmarks/variants.py                       # params.yaml (tiny, CPU)
    python benchmarks/variants.py --steps 20 --threads 2
    python benchmarks/variants.py --params configs/d12.yaml --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from rdn.config import load_params
from rdn.coords import hierarchical_coordinates
from rdn.device import cpu_capability, resolve_device
from rdn.model import GPT, GPTConfig

VARIANTS = {
    "baseline": {},
    "moe": {"moe": {"enabled": True, "num_experts": 8, "num_shared": 1, "top_k": 2, "first_dense_layers": 1}},
    "mhc": {"mhc": {"streams": 4}},
    "mtp": {"mtp": {"num_future": 4}},
    "ternary": {"ternary": {"enabled": True}},
}
VARIANTS["all"] = {k: v for d in VARIANTS.values() for k, v in d.items()}


def build(params, name: str, vocab: int, device: torch.device):
    model_params = params.model.model_copy(update={
        k: getattr(params.model, k).model_copy(update=v) for k, v in VARIANTS[name].items()})
    config = GPTConfig.from_params(model_params, vocab_size=vocab, n_coord_dim=params.coords.n_dim, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.train()
    return model, model.setup_optimizer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default=None, help="override run.device")
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    deltas = deltas.to(device)

    names = [n for n in VARIANTS if n in args.only]
    if "baseline" not in names:
        names.insert(0, "baseline")
    built = {n: build(params, n, vocab, device) for n in names}

    def step(name: str) -> float:
        model, opt = built[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        coords = hierarchical_coordinates(x, deltas, 0, params.coords.n_dim) \
            if model.config.use_coordinates else None
        model(x, y, coords=coords).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.steps + 2):
        for n in names:
            dt = step(n)
            if i >= 2:
                times[n].append(dt)

    print(f"# variants at {args.params} (depth {params.model.depth}, width {params.model.width}, "
          f"B x T = {B} x {T}), {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"device {device}" + (f", CPU capability {cpu_capability()}" if device.type == "cpu" else "")
          + f", {torch.get_num_threads()} threads, median of {args.steps} steps")
    base_t = statistics.median(times["baseline"])
    base_f = built["baseline"][0].estimate_flops()
    print("| variant | settings | step ms | time x | tok/s | params total | params active | FLOPs/token | "
          "FLOPs x | time x / FLOPs x |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        model = built[n][0]
        t = statistics.median(times[n])
        counts = model.num_scaling_params()
        f = model.estimate_flops()
        settings = "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items() if a != "enabled")
                             for k, v in VARIANTS[n].items()) or "-"
        print(f"| {n} | {settings} | {1000 * t:,.0f} | {t / base_t:.2f} | {B * T / t:,.0f} | "
              f"{counts['total']:,} | {counts['active']:,} | {f:,.3g} | {f / base_f:.2f} | "
              f"{(t / base_t) / (f / base_f):.2f} |")


if __name__ == "__main__":
    main()
