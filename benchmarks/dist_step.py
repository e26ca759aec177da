"""Distributed training step: time per step and communication share for 1, 2, 3... ranks.

Each rank (a process of a gloo/nccl group started with torch.multiprocessing) builds the
preset's model, runs forward + backward on one micro-batch of ``device_batch_size x
seq_len`` synthetic ids (with coordinates) and steps the optimizer: MuonAdamW on one rank,
DistMuonAdamW on several. Printed per world size: median ms/step, the median time a rank
spends *blocked* in collectives (waiting on a reduction or gather, the blocking
grad-presence and loss all-reduces included) -- the exposed communication the async
launches did not hide -- its share of the step, global tok/s, and the bytes each rank is
expected to send per step with ring collectives (``rdn.optim.dist.communication_bytes``).

On a CPU the ranks share the cores (each gets cores // ranks threads), so this shows
correctness and overhead, not scaling; on a multi-GPU machine it gives scaling efficiency.

    python benchmarks/dist_step.py --ranks 1 2 3 --steps 6         # params.yaml (tiny, CPU)
    python benchmarks/dist_step.py --params configs/d20.yaml --ranks 1 8 --device cuda
    python benchmarks/dist_step.py --params configs/d20.yaml --ranks 8 16 --bytes-only   # no run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist

from rdn.config import load_params
from rdn.coords import hierarchical_coordinates
from rdn.model import GPT, GPTConfig
from rdn.optim.dist import communication_bytes


class _Blocked:
    """Accumulates wall time spent in wait() of async collectives and in blocking ones."""

    seconds = 0.0

    @classmethod
    def wrap_async(cls, fn):
        def call(*args, **kwargs):
            work = fn(*args, **kwargs)
            return _TimedWork(work, cls) if kwargs.get("async_op") else work
        return call

    @classmethod
    def wrap_blocking(cls, fn):
        def call(*args, **kwargs):
            if kwargs.get("async_op"):
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - t0
        return call


class _TimedWork:
    def __init__(self, work, clock):
        self.work, self.clock = work, clock

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            self.clock.seconds += time.perf_counter() - t0


def _instrument() -> None:
    import rdn.optim.dist as od

    od._reduce_scatter = _Blocked.wrap_async(od._reduce_scatter)
    od._all_gather = _Blocked.wrap_async(od._all_gather)
    all_reduce = dist.all_reduce
    dist.all_reduce = _Blocked.wrap_blocking(_Blocked.wrap_async(all_reduce))


def _worker(rank: int, world: int, port: int, params_path: str | None, steps: int, warmup: int, device_name: str,
            out: dict) -> None:
    params = load_params(params_path or "params.yaml")
    device = torch.device(device_name if device_name != "cuda" else f"cuda:{rank}")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world)
        _instrument()
    cfg = params.base_train
    config = GPTConfig.from_params(params.model, vocab_size=params.tokenizer.vocab_size, n_coord_dim=params.coords.n_dim)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    groups = model.optimizer_param_groups()
    if world > 1:
        from rdn.optim.dist import DistMuonAdamW

        opt = DistMuonAdamW(groups)
    else:
        opt = model.setup_optimizer()
    B, T, vocab = cfg.device_batch_size, cfg.seq_len, params.tokenizer.vocab_size
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, vocab, (B, T + 1), generator=g).to(device)
    deltas = torch.zeros(vocab, dtype=torch.long, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        coords = hierarchical_coordinates(ids, deltas, 0, params.coords.n_dim)[:, :-1] if config.use_coordinates else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids[:, :-1], ids[:, 1:], coords=coords)
        loss.backward()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)  # as the loop does, for the shared NaN decision
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, blocked = [], []
    for i in range(warmup + steps):
        _Blocked.seconds = 0.0
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            blocked.append(_Blocked.seconds)
    if rank == 0:
        out.update(ms=1000 * statistics.median(times), blocked_ms=1000 * statistics.median(blocked),
                   tokens=B * T * world, params=sum(p.numel() for p in model.parameters()),
                   bytes=communication_bytes(groups, world))
    if world > 1:
        dist.destroy_process_group()


def expected_bytes(params_path: str | None, ranks: list[int]) -> None:
    """The per-rank bytes of each world size for the preset's model (built on the meta device)."""
    params = load_params(params_path or "params.yaml")
    config = GPTConfig.from_params(params.model, vocab_size=params.tokenizer.vocab_size, n_coord_dim=params.coords.n_dim)
    with torch.device("meta"):
        model = GPT(config)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n:,} parameters ({n * 4 / 2**20:,.1f} MiB fp32); bytes each rank sends per step (ring):")
    print("| ranks | total | Muon (reduce-scatter + all-gather) | AdamW sharded | AdamW replicated (all-reduce) |")
    print("|---:|---:|---:|---:|---:|")
    for world in ranks:
        b = communication_bytes(model.optimizer_param_groups(), world, element_size=4)
        print(f"| {world} | {b['total'] / 2**20:,.1f} MiB | {b['muon'] / 2**20:,.1f} MiB | "
              f"{b['adamw_sharded'] / 2**20:,.1f} MiB | {b['adamw_replicated'] / 2**20:,.1f} MiB |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bytes-only", action="store_true", help="print the expected communication, run nothing")
    args = ap.parse_args()
    if args.bytes_only:
        expected_bytes(args.params, args.ranks)
        return
    print(f"# {datetime.date.today()} {platform.machine()} torch {torch.__version__} device {args.device} "
          f"({os.cpu_count()} cores)")
    print("| ranks | ms/step | blocked in collectives | share | global tok/s | sent/rank/step (ring) |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = None
    for world in args.ranks:
        with torch.multiprocessing.Manager() as manager:
            out = manager.dict()
            torch.multiprocessing.spawn(_worker, args=(world, _free_port(), args.params, args.steps, args.warmup,
                                                       args.device, out), nprocs=world)
            r = dict(out)
        tok_s = r["tokens"] / (r["ms"] / 1000)
        base = base or tok_s
        b = r["bytes"]
        print(f"| {world} | {r['ms']:.0f} | {r['blocked_ms']:.1f} ms | {100 * r['blocked_ms'] / r['ms']:.1f}% | "
              f"{tok_s:,.0f} ({tok_s / base / world:.2f} of linear) | {b['total'] / 2**20:.2f} MiB "
              f"(muon {b['muon'] / 2**20:.2f}, adamw sharded {b['adamw_sharded'] / 2**20:.2f}, "
              f"replicated {b['adamw_replicated'] / 2**20:.2f}) |")
    print(f"model: {r['params']:,} parameters ({r['params'] * 4 / 2**20:.1f} MiB fp32)")


if __name__ == "__main__":
    main()
