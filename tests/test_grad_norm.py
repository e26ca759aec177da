"""``train/grad_norm``: the global L2 norm of the gradient every step, before clipping (after
the gradient reduction on several ranks).

Oracles: ``sqrt(sum(p.grad ** 2))`` over the gradients the optimizer is handed, computed by
hand in a one-process run; for :class:`DistMuonAdamW`, the same hand computation over the
averaged gradient on one process (the 2-rank *trainer* figure is compared with the
one-process run's in tests/test_dist.py, on the 2-rank run that file already makes).

Tolerance of the trainer figure: rel 1e-4. The hand sum is float64; torch's fp32 CPU norm
kernel (``get_total_norm``, as in ``clip_grad_norm_``) accumulates each lane sequentially,
so a running sum near 1 drops the untrained lm head's many ~1e-5 entries (squares ~1e-10):
about 2e-5 relative at the first step of the tiny model."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from rdn.optim import MuonAdamW
from tests.test_dist import _free_port, _grad, _make_params, _param_groups
from tests.test_train import RecordingRun, root, tiny_params  # noqa: F401  (root: fixture)


def hand_norm(grads) -> float:
    return math.sqrt(math.fsum(float(g.double().square().sum()) for g in grads))


def _dist_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from rdn.optim.dist import DistMuonAdamW

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for clip in (0.0, 0.5, 1e6):
            muon, adamw = _make_params()
            opt = DistMuonAdamW(_param_groups(muon, adamw), shard_min_numel=48, max_grad_norm=clip)
            assert opt.last_grad_norm is None
            params = [p for g in muon for p in g] + adamw
            for step in range(2):
                for i, p in enumerate(params):
                    p.grad = _grad(p, rank, step, i)
                # one process, the averaged gradient (exact: binary fractions, see tests/test_dist.py)
                want = hand_norm(sum(_grad(p, r, step, i) for r in range(world)) / world
                                 for i, p in enumerate(params))
                opt.step()
                assert want > 0.5  # so clip 0.5 clips: the figure is the norm before clipping
                assert float(opt.last_grad_norm) == pytest.approx(want, rel=1e-6), (rank, clip, step)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_dist_optimizer_exposes_the_global_norm_of_the_averaged_gradient(world):
    """Sharded and replicated AdamW params and padded Muon stacks; with and without clipping."""
    torch.multiprocessing.start_processes(_dist_worker, args=(world, _free_port()), nprocs=world,
                                          start_method="fork")


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no_clip", "clip"])
def test_logged_norm_is_the_hand_norm_of_the_step_before_clipping(root, monkeypatch, clip):  # noqa: F811
    from rdn.train.pretrain import run_base_train

    handed = []  # hand norm of the gradients the optimizer is handed (after any clip)
    real = MuonAdamW.step

    def step(self, *args, **kwargs):
        handed.append(hand_norm(p.grad for g in self.param_groups for p in g["params"] if p.grad is not None))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MuonAdamW, "step", step)
    run = RecordingRun()
    summary = run_base_train(tiny_params(num_iterations=3, eval_every=3, grad_clip=clip), root, run)
    logged = run.history["train/grad_norm"]
    assert sorted(logged) == [1, 2, 3] and len(handed) == 3
    if clip == 0:
        assert [logged[s] for s in (1, 2, 3)] == pytest.approx(handed, rel=1e-4)
    else:  # the logged figure is the norm before clipping; the optimizer got the clipped gradient
        assert all(logged[s] > clip for s in (1, 2, 3))
        assert handed == pytest.approx([clip] * 3, rel=1e-4)
    with open(root / "metrics/base_train_history.csv") as f:
        column = {int(r["step"]): float(r["grad_norm"]) for r in csv.DictReader(f) if r["grad_norm"]}
    assert column == pytest.approx(logged, rel=1e-12)
    assert summary["final_grad_norm"] == logged[3]
