"""torch.distributed plumbing: who am I, start/stop the process group, the torchrun command.

Processes are started by PyTorch's own launcher (``torchrun`` = ``python -m
torch.distributed.run``), which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous variables; :func:`init_distributed` only reads them. A stage started as one
process whose params ask for more (``dist.nproc_per_node * dist.nnodes > 1``) replaces
itself with :func:`torchrun_argv` -- so ``dvc repro`` runs the same command either way.

There is no DDP wrapper: gradients are reduced inside the optimizer
(:class:`rdn.optim.dist.DistMuonAdamW`), the data loader slices one global stream
(:class:`rdn.data.loader.DeviceBatches`), and the loop all-reduces the few scalars every
rank must agree on (the loss, for the NaN stop; validation sums).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Set by torchrun in every worker; their presence means "already launched".
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in the initialised process group, else rank 0 of 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def launched_by_torchrun() -> bool:
    return any(k in os.environ for k in TORCHRUN_ENV)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_backend(backend: str, device: str) -> str:
    """``auto``: nccl when this run trains on CUDA, gloo otherwise (CPU, or MPS which has no backend)."""
    if backend != "auto":
        return backend
    import torch

    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda else "gloo"


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 900.0) -> DistInfo:
    """Join the process group torchrun set up; a no-op (rank 0 of 1) in a plain process.

    On nccl the process's CUDA device is ``cuda:LOCAL_RANK``. ``timeout_s`` bounds every
    collective, so a rank that stops answering turns into an error, not a hang (a rank
    that *dies* is caught much sooner by torchrun, which then stops the others)."""
    import torch
    import torch.distributed as dist

    if env_world_size() <= 1:
        return DistInfo()
    if dist.is_initialized():
        return dist_info()
    backend = resolve_backend(backend, device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = dist_info()
    if info.rank == 0:
        log.info("distributed: %d ranks, backend %s", info.world_size, backend)
    return info


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module, src: int = 0) -> None:
    """Make every rank's weights bitwise equal to rank ``src``'s (seeded init already agrees;
    this guards against any nondeterministic initialisation)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few float64 scalars over ranks (one collective); identity without a group."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def torchrun_argv(nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str, module: str,
                  args: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m module args`` for this interpreter.

    One node uses ``--standalone`` (a private rendezvous on a free local port); several
    nodes meet at ``rdzv_endpoint`` through the c10d rendezvous, each node running this
    same command (Slurm's ``srun``, a Kubernetes indexed Job)."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
            f"--nnodes={nnodes}"]
    if nnodes == 1:
        argv.append("--standalone")
    else:
        argv += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return argv + ["-m", module, *args]
