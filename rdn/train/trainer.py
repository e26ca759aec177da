"""The one training loop, shared by base pretraining, mid-training and SFT.

``train(job, run)`` does: resume or initialise, then for each optimizer step gradient
accumulation to ``total_batch_size`` tokens, schedules (LR warmup/warmdown, Muon
momentum ramp, weight-decay decay), an optional gradient clip, the step; every
``eval_every`` steps validation bits-per-byte, every ``sample_every`` a short greedy
sample, every ``save_every`` an atomic checkpoint (and always one at the end). A
non-finite loss stops the run with an error and leaves the last good checkpoint as the
newest one. bf16 autocast and ``torch.compile`` on CUDA; fp32 eager on CPU.

Under torchrun (:mod:`rdn.dist`) the same function runs on every rank: each rank takes its
share of the micro-batches (the loader slices one global stream), the optimizer is
:class:`~rdn.optim.dist.DistMuonAdamW` (which averages the gradients), the step's loss is
all-reduced so every rank takes the same NaN decision, validation sums are all-reduced,
and only rank 0 logs, samples and writes checkpoint files other than optimizer shards.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rdn.config import TrainConfig
from rdn.dist import all_reduce_sum, barrier, broadcast_parameters, dist_info
from rdn.optim.schedules import lr_multiplier, muon_momentum, weight_decay_multiplier
from rdn.progress import human_seconds
from rdn.checkpoint import (Checkpoint, CheckpointError, check_compatible, latest_checkpoint,
                                  list_checkpoints, rng_state, save_checkpoint, set_rng_state)

log = logging.getLogger(__name__)

# bf16 dense peak FLOP/s by device name fragment (for MFU). Unknown devices -> MFU not reported.
PEAK_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device: cuda requested but torch.cuda.is_available() is False")
    if name == "cuda" and dist_info().world_size > 1:
        return torch.device("cuda", torch.cuda.current_device())  # cuda:LOCAL_RANK, set by rdn.dist
    return torch.device(name)


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of this device, or None where unknown (CPU, MPS): MFU is then n/a."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


@dataclass
class TrainJob:
    """Everything the loop needs, built by a stage; components get only their own config."""

    stage: str
    cfg: TrainConfig
    model: torch.nn.Module
    out_dir: Path
    device: torch.device
    make_train_batches: Callable[[dict | None], Iterator]   # loader state -> batches
    make_val_batches: Callable[[], Iterator]                # a fresh, deterministic val pass
    token_bytes: torch.Tensor                               # bytes per token id (0 = special)
    compat: dict[str, Any]                                  # meta fields a resumed checkpoint must match
    meta: dict[str, Any] = field(default_factory=dict)      # extra meta.json content
    lr_scale: float = 1.0                                   # e.g. SFT's init_lr_frac
    log_every: int = 10
    sample: Callable[[torch.nn.Module], str] | None = None  # returns a short text sample
    world_size: int | None = None                           # None = the process group's (1 without one)
    history_path: Path | None = None                        # CSV of per-step metrics (DVC plots, report)


# Train settings that do not change the trajectory: a checkpoint that differs only in
# these is still resumable.
TRAJECTORY_NEUTRAL = {"eval_every", "eval_tokens", "sample_every", "save_every", "keep_last", "resume", "prefetch",
                      "compile"}


def trajectory_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of a train section a resumed checkpoint must match."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in TRAJECTORY_NEUTRAL}


def clear_checkpoints(directory: Path) -> None:
    for ckpt in list_checkpoints(directory):
        shutil.rmtree(ckpt.path, ignore_errors=True)


def _epoch(state: Any) -> Any:
    """Epoch of a loader state: text loaders keep it at the top, the mixture under its parts."""
    if not isinstance(state, dict):
        return "?"
    if "epoch" in state:
        return state["epoch"]
    return (state.get("conversations") or {}).get("epoch", "?")


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    *tensors, state = batch
    return tensors[0], tensors[1], (tensors[2] if len(tensors) > 2 else None), state


def num_iterations(cfg: TrainConfig, model) -> int:
    if cfg.num_iterations is not None:
        return cfg.num_iterations
    counts = model.num_scaling_params()
    n = counts["transformer_matrices"] + counts["lm_head"]
    return max(1, int(cfg.target_param_data_ratio * n // cfg.total_batch_size))


@torch.no_grad()
def evaluate_bpb(model, batches: Iterator, max_tokens: int, token_bytes: torch.Tensor,
                 autocast: Callable[[], Any]) -> float:
    """Bits per byte of the targets: sum of nats / (ln 2 * sum of target bytes). Special
    tokens (0 bytes) are excluded, so the figure is independent of the vocabulary."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64)
    nbytes = torch.zeros((), dtype=torch.float64)
    seen = 0
    world = dist_info().world_size  # each rank evaluates its slice of the same batches
    for batch in batches:
        x, y, cx, _ = _unpack(batch)
        with autocast():
            loss = model(x, y, coords=cx, loss_reduction="none")
        tb = token_bytes.to(y.device)[y.clamp(min=0)] * (y >= 0)  # masked targets (-1) count nothing
        nats += (loss.float() * (tb > 0)).sum().double().cpu()
        nbytes += tb.sum().double().cpu()
        seen += y.numel() * world
        if seen >= max_tokens:
            break
    model.train(was_training)
    if world > 1:
        total = all_reduce_sum([nats.item(), nbytes.item()], next(model.parameters()).device)
        nats, nbytes = (torch.tensor(v, dtype=torch.float64) for v in total)
    if nbytes.item() == 0:
        raise ValueError("validation split produced no batch: make eval_tokens or the val split larger")
    return float(nats / (math.log(2) * nbytes))


HISTORY_COLUMNS = ("step", "loss", "val_bpb", "lrm", "dt", "tok_per_sec")


def write_history_csv(path: Path, history: list[dict[str, float]], columns=HISTORY_COLUMNS) -> None:
    """Per-step metrics as CSV (one row per entry, blanks where a metric was not measured)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def train(job: TrainJob, run) -> dict[str, Any]:
    cfg, model, device = job.cfg, job.model, job.device
    info = dist_info()
    world = info.world_size
    if job.world_size is not None and job.world_size != world:
        raise ValueError(f"{job.stage}: job.world_size is {job.world_size} but the process group has {world} ranks")
    model.to(device)
    use_cuda = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if use_cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]

    def autocast():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    tokens_per_pass = cfg.device_batch_size * cfg.seq_len * world
    accum = cfg.total_batch_size // tokens_per_pass
    if accum < 1 or cfg.total_batch_size % tokens_per_pass:
        raise ValueError(f"{job.stage}.total_batch_size ({cfg.total_batch_size}) must be a multiple of "
                         f"device_batch_size * seq_len * world_size ({tokens_per_pass})")
    steps = num_iterations(cfg, model)
    optim_kwargs = dict(
        unembedding_lr=cfg.unembedding_lr * job.lr_scale, embedding_lr=cfg.embedding_lr * job.lr_scale,
        matrix_lr=cfg.matrix_lr * job.lr_scale, scalar_lr=cfg.scalar_lr * job.lr_scale,
        weight_decay=cfg.weight_decay, adam_betas=(cfg.adam_beta1, cfg.adam_beta2))
    if world > 1:
        from rdn.optim.dist import DistMuonAdamW

        # clipping needs the reduced gradients, so the sharded optimizer does it
        optimizer = DistMuonAdamW(model.optimizer_param_groups(**optim_kwargs), max_grad_norm=cfg.grad_clip)
    else:
        optimizer = model.setup_optimizer(**optim_kwargs)

    # -- resume
    step, ema, tokens_seen, elapsed, min_bpb, loader_state = 0, 0.0, 0, 0.0, math.inf, None
    timed_tokens = 0  # tokens of the timed steps (warm-up steps excluded), for tok/s
    earlier_peak = 0.0  # peak memory of earlier processes of this run (a resumed run's summary covers them)
    ckpt: Checkpoint | None = latest_checkpoint(job.out_dir)
    stale = False  # old checkpoints to remove before this run writes its own
    if ckpt is not None and cfg.resume == "never":
        log.info("%s: resume: never -- starting fresh; removing %d old checkpoints", job.stage,
                 len(list_checkpoints(job.out_dir)))
        stale, ckpt = True, None
    if ckpt is not None:
        try:
            check_compatible(ckpt, job.compat)
        except CheckpointError as e:
            # A different configuration (e.g. `dvc exp run -S ...` after a finished run): these
            # checkpoints belong to another run, and DVC's cache still holds them.
            log.warning("%s: not resuming: %s -- starting fresh and removing the old checkpoints", job.stage, e)
            stale, ckpt = True, None
    barrier()  # (several ranks) every rank has decided from the same files before rank 0 removes any
    if stale and info.is_main:
        clear_checkpoints(job.out_dir)
    if ckpt is not None and ckpt.meta.get("world_size", 1) != world:
        raise CheckpointError(f"{ckpt.path} was written by {ckpt.meta.get('world_size', 1)} ranks and this run has "
                              f"{world}: the optimizer state is sharded per rank, so resume with "
                              f"{ckpt.meta.get('world_size', 1)} ranks (dist.nproc_per_node x dist.nnodes), or set "
                              f"{job.stage}.resume: never to start fresh")
    history: list[dict[str, float]] = []
    if ckpt is not None:
        ckpt.load_model(model, device)
        ckpt.load_optimizer(optimizer, rank=info.rank)
        state = ckpt.trainer_state()
        step, ema, tokens_seen = int(state["step"]), float(state["ema"]), int(state["tokens_seen"])
        elapsed, min_bpb = float(state["elapsed"]), float(state["min_val_bpb"])
        timed_tokens = int(state["timed_tokens"])
        earlier_peak = float(state.get("peak_memory_mib", 0.0))  # of the processes before this one
        set_rng_state(state["rng"])
        loader_state = ckpt.loader_state()
        history = ckpt.history()
        log.info("%s: resuming from %s (step %d of %d)", job.stage, ckpt.path, step, steps)
    # A finished run (its final checkpoint holds the final validation): nothing to train,
    # validate or save again -- the summary comes from the checkpoint.
    finished_bpb = next((h["val_bpb"] for h in reversed(history) if h.get("step") == step and "val_bpb" in h),
                        None) if ckpt is not None and step >= steps else None
    if finished_bpb is not None:
        log.info("%s: already finished at step %d (%s); nothing to do", job.stage, step, ckpt.path)
    broadcast_parameters(model)  # no-op on one rank
    forward = torch.compile(model, dynamic=False) if (cfg.compile == "on" or (cfg.compile == "auto" and use_cuda)) else model

    counts = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    run.log_params({"model": {f"params_{k}": v for k, v in counts.items()},
                    f"{job.stage}": {"num_iterations": steps, "grad_accum_steps": accum,
                                     "flops_per_token": flops_per_token}})
    log.info("%s: %d steps x %d tokens (%d x %d x %d accum x %d ranks), %s parameters, %.3g FLOPs/token, "
             "device %s%s", job.stage, steps, cfg.total_batch_size, cfg.device_batch_size, cfg.seq_len, accum, world,
             f"{counts['total']:,}", flops_per_token, device, "" if peak else " (MFU n/a)")

    def save(at_step: int, val_bpb: float | None) -> Path:
        trainer_state = {"step": at_step, "ema": ema, "tokens_seen": tokens_seen, "elapsed": elapsed,
                         "timed_tokens": timed_tokens, "peak_memory_mib": max(earlier_peak, peak_memory_mib(device)),
                         "min_val_bpb": min_bpb, "rng": rng_state()}
        meta = {**job.compat, **job.meta, "stage": job.stage, "val_bpb": val_bpb,
                "world_size": world, "config": cfg.model_dump(mode="json")}
        path = save_checkpoint(job.out_dir, at_step, model, optimizer, trainer_state, loader_state, meta,
                               keep_last=cfg.keep_last, history=history, rank=info.rank, world_size=world)
        if job.history_path is not None and info.is_main:
            write_history_csv(job.history_path, history)
        return path

    def validate() -> float:
        batches = job.make_val_batches()
        try:
            return evaluate_bpb(forward, batches, cfg.eval_tokens, job.token_bytes, autocast)
        finally:
            if hasattr(batches, "close"):
                batches.close()

    batches = job.make_train_batches(loader_state)
    last_bpb: float | None = None
    beta, recent = 0.9, []
    try:
        while step < steps:
            if step % cfg.eval_every == 0:
                last_bpb = validate()
                min_bpb = min(min_bpb, last_bpb)
                run.log_metrics({"val/bpb": last_bpb}, step=step)
                history.append({"step": step, "val_bpb": last_bpb})
                log.info("%s: step %d val bpb %.4f", job.stage, step, last_bpb)
            if job.sample is not None and info.is_main and step > 0 and step % cfg.sample_every == 0:
                log.info("%s: sample at step %d: %r", job.stage, step, job.sample(model)[:200])

            lrm = lr_multiplier(step, steps, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            momentum, wd = muon_momentum(step), cfg.weight_decay * weight_decay_multiplier(step, steps)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"], group["weight_decay"] = momentum, wd

            if use_cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                x, y, cx, loader_state = _unpack(next(batches))
                with autocast():
                    loss = forward(x, y, coords=cx)
                (loss / accum).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0 and world == 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if world > 1:  # every rank must see the same loss to take the same NaN decision
                torch.distributed.all_reduce(loss_sum)
            loss_value = float(loss_sum.item()) / (accum * world)  # one host sync per step, for the NaN check
            if not math.isfinite(loss_value):
                newest = latest_checkpoint(job.out_dir)
                raise TrainingDiverged(f"{job.stage}: loss is {loss_value} at step {step}; nothing was saved "
                                       f"from this step. Last good checkpoint: {newest.path if newest else 'none'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if use_cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            tokens_seen += cfg.total_batch_size
            if step > 3:  # leave out warm-up/compile steps from timing
                elapsed += dt
                timed_tokens += cfg.total_batch_size
            recent = (recent + [dt])[-20:]
            ema = beta * ema + (1 - beta) * loss_value
            debiased = ema / (1 - beta ** step)
            tok_s = cfg.total_batch_size / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            metrics = {"train/loss": debiased, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_s,
                       "optim/muon_momentum": momentum, "optim/weight_decay": wd}
            if mfu is not None:
                metrics["train/mfu"] = mfu
            run.log_metrics(metrics, step=step)
            history.append({"step": step, "loss": debiased, "lrm": lrm, "dt": dt, "tok_per_sec": tok_s})
            if step % job.log_every == 0 or step == steps or step <= 3:
                eta = (steps - step) * (sum(recent) / len(recent))
                log.info("%s: step %05d/%05d (%5.1f%%) | loss %.4f | lrm %.2f | dt %.0fms | tok/s %s | mfu %s | "
                         "epoch %s | eta %s", job.stage, step, steps, 100 * step / steps, debiased, lrm, dt * 1000,
                         f"{tok_s:,.0f}", f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                         _epoch(loader_state),
                         human_seconds(eta))
                run.log_metrics({"memory/peak_mib": peak_memory_mib(device)}, step=step, flush=True)
            if step % cfg.save_every == 0 and step < steps:
                save(step, last_bpb)
        if finished_bpb is not None:
            last_bpb, final = finished_bpb, job.out_dir / ckpt.path.name
            if job.history_path is not None and info.is_main:  # DVC removed it before rerunning the stage
                write_history_csv(job.history_path, history)
        else:  # final evaluation and checkpoint
            last_bpb = validate()
            min_bpb = min(min_bpb, last_bpb)
            run.log_metrics({"val/bpb": last_bpb}, step=step, flush=True)
            history.append({"step": step, "val_bpb": last_bpb})
            final = save(step, last_bpb)
    finally:
        if hasattr(batches, "close"):
            batches.close()
    summary = {
        "steps": step, "final_val_bpb": last_bpb, "min_val_bpb": min_bpb, "final_train_loss": ema / (1 - beta ** max(step, 1)) if step else None,
        "tokens_seen": tokens_seen, "train_seconds": round(elapsed, 2),
        "tok_per_sec": round(timed_tokens / elapsed, 1) if elapsed > 0 else None,
        "peak_memory_mib": round(max(earlier_peak, peak_memory_mib(device)), 1), "parameters": counts["total"],
        "checkpoint": str(final),
    }
    log.info("%s: done: %d steps, val bpb %.4f (min %.4f), %s tokens, %s", job.stage, step, last_bpb, min_bpb,
             f"{tokens_seen:,}", human_seconds(elapsed))
    return summary

