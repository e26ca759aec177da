"""Next-token training (base, mid and SFT): the objective and the job every such stage builds.

:class:`LMObjective` produces a step's loss as next-token cross-entropy over loader
batches, gradient-accumulated to ``total_batch_size`` tokens, and evaluates bits-per-byte
of a validation pass. :func:`run_lm_stage` turns a stage's train section into a
:class:`~rdn.train.trainer.TrainJob` and runs the shared trainer.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from rdn.config import OptimConfig, TrainConfig
from rdn.device import peak_flops
from rdn.dist import dist_info
from rdn.eval.bpb import CLASSES, evaluate_bpb, evaluate_bpb_by_class, unpack_batch
from rdn.optim.schedules import lr_multiplier, muon_momentum, weight_decay_multiplier
from rdn.optim.variants import OptimVariant
from rdn.train.collider import BLOCK_LINEARS, ColliderSettings, collider_linears_, collider_loss
from rdn.train.trainer import OptimSettings, ScheduleValues, TrainJob, autocast_context, train

log = logging.getLogger(__name__)

# Train settings that do not change the trajectory: a checkpoint that differs only in
# these is still resumable.
TRAJECTORY_NEUTRAL = {"eval_every", "eval_tokens", "sample_every", "save_every", "keep_last", "resume", "prefetch",
                      "compile"}


def trajectory_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of a train section a resumed checkpoint must match."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in TRAJECTORY_NEUTRAL}


def num_iterations(cfg: TrainConfig, model) -> int:
    if cfg.num_iterations is not None:
        return cfg.num_iterations
    counts = model.num_scaling_params()
    n = counts["transformer_matrices"] + counts["lm_head"]
    return max(1, int(cfg.target_param_data_ratio * n // cfg.total_batch_size))


def _epoch(state: Any) -> Any:
    """Epoch of a loader state: text loaders keep it at the top, the mixture under its parts."""
    if not isinstance(state, dict):
        return "?"
    if "epoch" in state:
        return state["epoch"]
    return (state.get("conversations") or {}).get("epoch", "?")


class LMObjective:
    """Next-token cross-entropy, gradient-accumulated; evaluation is bits-per-byte.

    ``make_train_batches(loader_state)`` opens the training stream at a position;
    ``make_val_batches()`` a fresh deterministic validation pass. With ``bpb_classes`` (a
    :class:`~rdn.coords.CoordinateCalculator`), the run's final evaluation also measures val
    bpb over closing-bracket targets and targets at depth >= 2 (``val/bpb_closing``,
    ``val/bpb_depth2``; :func:`rdn.eval.bpb.evaluate_bpb_by_class`)."""

    eval_key, eval_metric = "val_bpb", "val/bpb"
    history_columns = ("step", "loss", "val_bpb", "lrm", "dt", "tok_per_sec", "grad_norm")
    untimed_steps = 3  # compilation / warm-up steps left out of tok/s
    ema_beta = 0.9

    def __init__(self, make_train_batches: Callable[[dict | None], Iterator], make_val_batches: Callable[[], Iterator],
                 token_bytes: torch.Tensor, accum_steps: int, tokens_per_step: int, eval_tokens: int,
                 autocast: Callable[[], AbstractContextManager], flops_per_token: float, peak: float | None,
                 world: int, bpb_classes=None, collider: ColliderSettings | None = None):
        self.make_train_batches, self.make_val_batches = make_train_batches, make_val_batches
        self.token_bytes, self.accum, self.tokens_per_step = token_bytes, accum_steps, tokens_per_step
        self.eval_tokens, self.autocast = eval_tokens, autocast
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world
        self.bpb_classes = bpb_classes
        self.collider = collider or ColliderSettings()
        self._kept: list[float] = []   # kept-token fraction of each micro-batch of the step
        self.forward: torch.nn.Module | None = None
        self.batches: Iterator | None = None
        self._loader_state: dict | None = None
        self.ema, self.tokens_seen, self.timed_tokens, self.min_bpb = 0.0, 0, 0, math.inf

    def open(self, forward: torch.nn.Module, loader_state: dict | None) -> None:
        self.forward, self._loader_state = forward, loader_state
        self.batches = self.make_train_batches(loader_state)

    def loss(self, x: torch.Tensor, y: torch.Tensor, coords: torch.Tensor | None, step: int = 0) -> torch.Tensor:
        """One micro-batch's training loss: where an extra loss term goes (the model's own terms,
        MTP and MoE balance, come with its training forward), and Collider's token filtering
        (:func:`rdn.train.collider.collider_loss`; the plain forward when it is off or warming up)."""
        if not self.collider.enabled:
            return self.forward(x, y, coords=coords)
        loss, kept = collider_loss(self.forward, x, y, coords, self.collider, step)
        self._kept.append(kept)
        return loss

    def micro_losses(self, step: int) -> Iterator[torch.Tensor]:
        self._kept = []
        for _ in range(self.accum):
            x, y, cx, self._loader_state = unpack_batch(next(self.batches))
            with self.autocast():
                loss = self.loss(x, y, cx, step)
            yield loss / self.accum

    def step_record(self, step: int, loss: float, dt: float) -> tuple[dict[str, float], dict[str, float], str]:
        self.ema = self.ema_beta * self.ema + (1 - self.ema_beta) * loss
        debiased = self.ema / (1 - self.ema_beta ** step)
        self.tokens_seen += self.tokens_per_step
        if step > self.untimed_steps:
            self.timed_tokens += self.tokens_per_step
        tok_s = self.tokens_per_step / dt
        mfu = self.flops_per_token * tok_s / (self.peak * self.world) if self.peak else None
        metrics = {"train/loss": debiased, "train/tok_per_sec": tok_s}
        if self._kept:
            metrics["train/collider_kept"] = sum(self._kept) / len(self._kept)
        if mfu is not None:
            metrics["train/mfu"] = mfu
        text = (f"loss {debiased:.4f} | tok/s {tok_s:,.0f} | mfu "
                f"{f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | epoch {_epoch(self._loader_state)}")
        return metrics, {"loss": debiased, "tok_per_sec": tok_s}, text

    def evaluate(self) -> float:
        batches = self.make_val_batches()
        try:
            bpb = evaluate_bpb(self.forward, batches, self.eval_tokens, self.token_bytes, self.autocast)
        finally:
            if hasattr(batches, "close"):
                batches.close()
        self.min_bpb = min(self.min_bpb, bpb)
        return bpb

    def final_evaluate(self) -> tuple[float, dict[str, float]]:
        """The run's last evaluation: val bpb and, with ``bpb_classes``, the class figures (one pass)."""
        if self.bpb_classes is None:
            return self.evaluate(), {}
        batches = self.make_val_batches()
        try:
            res = evaluate_bpb_by_class(self.forward, batches, self.eval_tokens, self.token_bytes, self.autocast,
                                        self.bpb_classes)
        finally:
            if hasattr(batches, "close"):
                batches.close()
        self.min_bpb = min(self.min_bpb, res["bpb"])
        return res["bpb"], {f"val/bpb_{c}": res[f"bpb_{c}"] for c in CLASSES if res[f"bpb_{c}"] is not None}

    def loader_state(self) -> dict | None:
        return self._loader_state

    def state(self) -> dict[str, Any]:
        return {"ema": self.ema, "tokens_seen": self.tokens_seen, "timed_tokens": self.timed_tokens,
                "min_val_bpb": self.min_bpb}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ema, self.tokens_seen = float(state["ema"]), int(state["tokens_seen"])
        self.timed_tokens, self.min_bpb = int(state["timed_tokens"]), float(state["min_val_bpb"])

    def summary(self, step: int, elapsed: float, history: list[dict[str, float]]) -> dict[str, Any]:
        final_bpb = next((h["val_bpb"] for h in reversed(history) if "val_bpb" in h), None)
        classes = {f"final_val_bpb_{c}": next((h[f"val_bpb_{c}"] for h in reversed(history) if f"val_bpb_{c}" in h),
                                              None) for c in CLASSES} if self.bpb_classes is not None else {}
        return {"final_val_bpb": final_bpb, **classes, "min_val_bpb": self.min_bpb,
                "final_train_loss": self.ema / (1 - self.ema_beta ** step) if step else None,
                "tokens_seen": self.tokens_seen,
                "tok_per_sec": round(self.timed_tokens / elapsed, 1) if elapsed > 0 else None}

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


def lm_schedule(cfg: TrainConfig) -> Callable[[int, int], ScheduleValues]:
    """Warmup / constant / warmdown LR, Muon momentum ramp, weight decay fading to zero."""
    def schedule(step: int, steps: int) -> ScheduleValues:
        return ScheduleValues(lr_multiplier(step, steps, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac),
                              muon_momentum(step), cfg.weight_decay * weight_decay_multiplier(step, steps))
    return schedule


def run_lm_stage(stage: str, cfg: TrainConfig, optim: OptimConfig, model, device: torch.device, out_dir: Path,
                 make_train_batches: Callable[[dict | None], Iterator], make_val_batches: Callable[[], Iterator],
                 token_bytes: torch.Tensor, compat: dict[str, Any], run, *, lr_scale: float = 1.0,
                 log_every: int = 10, sample: Callable[[torch.nn.Module], str] | None = None,
                 history_path: Path | None = None, meta: dict[str, Any] | None = None,
                 bpb_classes=None) -> dict[str, Any]:
    """Train ``model`` with next-token loss under the settings of train section ``cfg``; ``bpb_classes``:
    the :class:`~rdn.coords.CoordinateCalculator` of the final bracket-class bpb (:class:`LMObjective`)."""
    world = dist_info().world_size
    tokens_per_pass = cfg.device_batch_size * cfg.seq_len * world
    accum = cfg.total_batch_size // tokens_per_pass
    if accum < 1 or cfg.total_batch_size % tokens_per_pass:
        raise ValueError(f"{stage}.total_batch_size ({cfg.total_batch_size}) must be a multiple of "
                         f"device_batch_size * seq_len * world_size ({tokens_per_pass})")
    cuda = device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    steps = num_iterations(cfg, model)
    counts = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    run.log_params({"model": {f"params_{k}": v for k, v in counts.items()},
                    stage: {"num_iterations": steps, "grad_accum_steps": accum, "flops_per_token": flops_per_token}})
    log.info("%s: %d steps x %d tokens (%d x %d x %d accum x %d ranks), %s parameters, %.3g FLOPs/token, "
             "device %s%s", stage, steps, cfg.total_batch_size, cfg.device_batch_size, cfg.seq_len, accum, world,
             f"{counts['total']:,}", flops_per_token, device, "" if peak else " (MFU n/a)")
    autocast = autocast_context(device, dtype)
    collider = ColliderSettings(**cfg.collider.model_dump())
    if collider.enabled:
        # The same parameters behind linear layers whose backward runs on the kept rows only;
        # lm_head and ve_gate too (lm_head's filtered rows get no gradient anyway).
        collider_linears_(model, BLOCK_LINEARS + ("lm_head", "ve_gate"))
        log.info("%s: Collider drops %.0f%% of the supervised tokens from backward after %d warm-up steps", stage,
                 100 * collider.filter_fraction, collider.warmup_steps)
    objective = LMObjective(make_train_batches, make_val_batches, token_bytes, accum, cfg.total_batch_size,
                            cfg.eval_tokens, autocast, flops_per_token, peak, world, bpb_classes=bpb_classes,
                            collider=collider)
    job = TrainJob(
        stage=stage, model=model, out_dir=out_dir, device=device, num_steps=steps,
        optim=OptimSettings(unembedding_lr=cfg.unembedding_lr * lr_scale, embedding_lr=cfg.embedding_lr * lr_scale,
                            matrix_lr=cfg.matrix_lr * lr_scale, scalar_lr=cfg.scalar_lr * lr_scale,
                            weight_decay=cfg.weight_decay, adam_betas=(cfg.adam_beta1, cfg.adam_beta2),
                            grad_clip=cfg.grad_clip, orthogonalization=optim.orthogonalization_dtype,
                            variant=OptimVariant.from_config(optim)),
        schedule=lm_schedule(cfg), compat=compat, config=cfg.model_dump(mode="json"),
        eval_every=cfg.eval_every, save_every=cfg.save_every, keep_last=cfg.keep_last, resume=cfg.resume,
        log_every=log_every, meta=meta or {}, history_path=history_path,
        compile=cfg.compile == "on" or (cfg.compile == "auto" and cuda),
        sample=sample, sample_every=cfg.sample_every,
    )
    summary = train(job, objective, run)
    summary["parameters"] = counts["total"]
    summary["parameters_active"] = counts["active"]
    summary["flops_per_token"] = flops_per_token
    return summary
