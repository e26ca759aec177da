"""Polar Express vs Muon's original Newton-Schulz quintic: how orthogonal, how fast.

Both run 5 steps in bf16 on a 768x3072 Gaussian (the docs/design.md anchor: Polar Express lands
the singular values in about [0.86, 1.14], Newton-Schulz in about [0.68, 1.15]) and on the
same Gaussian with row scales spread over one decade (a gradient-like spread spectrum).
Prints the singular-value range of each output and the time per call on this machine's
device (CUDA when available, else CPU), eager mode.

    python benchmarks/polar_express.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from rdn.optim import polar_express

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's Muon quintic, the same at every step


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's original orthogonalisation: fixed quintic, bf16, on the wide orientation."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def seconds_per_call(fn, G: torch.Tensor, repeats: int) -> float:
    def sync():
        if G.is_cuda:
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: kernel selection, allocator, oneDNN/cuBLAS init
        fn(G)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(G)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per method (median reported)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"date    {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"device  {device.type} ({name}); torch {torch.__version__}")
    print("input   768x3072 bf16, 5 steps each; singular values of the output in float32\n")

    gen = torch.Generator().manual_seed(0)
    gaussian = torch.randn(768, 3072, generator=gen)
    inputs = {
        "gaussian": gaussian,
        "gaussian, rows scaled 1..0.1": gaussian * torch.logspace(0, -1, 768).unsqueeze(1),
    }
    methods = {"polar_express": polar_express, "newton_schulz": newton_schulz}

    print(f"{'input':<30} {'in max/min':>10} | " + " | ".join(f"{m + ' [min, max]':>28}" for m in methods))
    for label, G in inputs.items():
        G = G.bfloat16().to(device)
        s_in = torch.linalg.svdvals(G.float())
        ranges = []
        for fn in methods.values():
            s = torch.linalg.svdvals(fn(G).float())
            ranges.append(f"[{s.min().item():.3f}, {s.max().item():.3f}]")
        print(f"{label:<30} {(s_in.max() / s_in.min()).item():>10.1f} | " + " | ".join(f"{r:>28}" for r in ranges))

    G = gaussian.bfloat16().to(device)
    print()
    for method, fn in methods.items():
        print(f"time    {method:<14} {seconds_per_call(fn, G, args.repeats) * 1e3:8.2f} ms/call "
              f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
