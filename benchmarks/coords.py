"""Throughput of hierarchical coordinates: rdn's contract vs the seed's algorithm.

Both run on the same random ids (B=32, T=2048, n_dim=8 by default) with a bracket
delta table like a real tokenizer's (about 3% openers, 3% closers, a few BOS tokens so
rows hold several documents). The seed's version (a cumulative sum clamped to n_dim-1,
then a Python loop over the dimensions) is reproduced here only as the baseline; it
computes different numbers (no reset at BOS, no floor at zero), which is why rdn
replaced it. Prints tokens/s of each and the ratio, on CPU and, when present, CUDA.

    python benchmarks/coords.py [--batch 32] [--seq 2048] [--n-dim 8] [--repeat 20]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from rdn.coords import hierarchical_coordinates


def seed_coordinates(ids: torch.Tensor, deltas: torch.Tensor, bos_id: int, n_dim: int) -> torch.Tensor:
    """The seed's GPUCoordinateCalculator.calculate_coordinates_batch, as written there."""
    depths = torch.cumsum(deltas[ids], dim=1).clamp(0, n_dim - 1)
    coords = torch.zeros(*ids.shape, n_dim, dtype=torch.long, device=ids.device)
    for dim in range(n_dim):
        at = depths == dim
        pos = torch.cumsum(at.long(), dim=1)
        coords[:, :, dim] = torch.where(at, pos - 1, 0)
    coords[ids == bos_id] = 0
    return coords


def bench(fn, *args, repeat: int, device: torch.device) -> float:
    fn(*args)  # warm-up (allocator, kernels, compile caches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--n-dim", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    deltas = torch.zeros(args.vocab, dtype=torch.long)
    r = torch.rand(args.vocab, generator=g)
    deltas[r < 0.03] = 1
    deltas[(r >= 0.03) & (r < 0.06)] = -1
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.002] = 0  # BOS id 0: several documents per row
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    n = args.batch * args.seq
    print(f"date {datetime.date.today()}  torch {torch.__version__}  {platform.machine()} "
          f"{torch.get_num_threads()} threads  B={args.batch} T={args.seq} n_dim={args.n_dim}")
    for device in devices:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        i, d = ids.to(device), deltas.to(device)
        ours = bench(hierarchical_coordinates, i, d, 0, args.n_dim, repeat=args.repeat, device=device)
        seed = bench(seed_coordinates, i, d, 0, args.n_dim, repeat=args.repeat, device=device)
        print(f"{name:>24}: rdn {n / ours / 1e6:10.1f} M tok/s ({ours * 1e3:8.2f} ms) | "
              f"seed {n / seed / 1e6:10.1f} M tok/s ({seed * 1e3:8.2f} ms) | rdn/seed speed {seed / ours:5.2f}x")


if __name__ == "__main__":
    main()
