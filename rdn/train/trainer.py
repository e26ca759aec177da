"""The one trainer: base pretraining, mid-training, chat SFT and chat RL all run here.

A stage describes *what* to train in a :class:`TrainJob` (model, output folder, step count,
optimizer settings, schedule, resume fields) and *how one step's loss is produced* in an
:class:`Objective`; :func:`train` does the rest as a few named steps of :class:`Trainer`:

* :meth:`~Trainer.build_or_resume` -- the optimizer, then a fresh start or the newest
  compatible checkpoint (model, optimizer, RNG, loader position, history); a finished run
  is recognised and not trained, validated or saved again;
* :meth:`~Trainer.step` -- schedules, the objective's micro-batch losses each through
  :meth:`~Trainer.backward`, an optional gradient clip, a NaN check every rank agrees on,
  the optimizer step; the global gradient norm (before clipping) is logged every step as
  ``train/grad_norm``;
* :meth:`~Trainer.evaluate` -- the objective's evaluation (val bits-per-byte, held-out task
  accuracy), every ``eval_every`` steps and at the end (where an objective with a
  ``final_evaluate`` may measure more: base_train's bpb over bracket classes);
* :meth:`~Trainer.checkpoint` -- an atomic checkpoint every ``save_every`` steps and at the end;
* :meth:`~Trainer.finish` -- the final evaluation and checkpoint, and the stage's summary.

Where a variant plugs in, each at one place: an extra loss term (e.g. multi-token
prediction) in the objective's ``loss`` (:class:`LMObjective.loss`); a different backward
(e.g. Collider) in :meth:`Trainer.backward`; a new optimizer in :func:`build_optimizer`.

Under torchrun (:mod:`rdn.dist`) the same code runs on every rank: the optimizer is
:class:`~rdn.optim.dist.DistMuonAdamW` (which averages gradients and clips after the
reduction), the step's loss is all-reduced so every rank takes the same NaN decision, and
only rank 0 logs and writes checkpoint files other than optimizer shards.

Muon's orthogonalisation dtype (``optim.orthogonalization_dtype``) is resolved once per
run (:func:`rdn.device.orthogonalization_dtype`), logged with the hardware it was chosen
for, recorded in MLflow and in the checkpoint meta; a resumed run keeps the checkpoint's
dtype, so its continuation is the run it would have been.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from rdn.checkpoint import (Checkpoint, CheckpointError, check_compatible, clear_checkpoints, latest_checkpoint,
                            list_checkpoints, rng_state, save_checkpoint, set_rng_state)
from rdn.device import (ORTHOGONALIZATION_DTYPES, dtype_name, hardware_report, orthogonalization_dtype,
                        peak_memory_mib)
from rdn.dist import barrier, broadcast_parameters, dist_info
from rdn.optim import MuonAdamW, OptimVariant, state_bytes
from rdn.optim.dist import DistMuonAdamW
from rdn.progress import human_seconds

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# Modules whose code shapes a training stage's trajectory (data order, model, loss, optimizer,
# schedules, rollouts, the trainer itself): a checkpoint written by other code is not resumed,
# since its run would not be the run this code does. tests/test_train.py checks that every
# rdn module the training stages import is either here or known not to shape a trajectory.
TRAJECTORY_MODULES = (
    "rdn.coords", "rdn.checkpoint", "rdn.data.corpus", "rdn.data.loader", "rdn.data.conversations",
    "rdn.tokenizer.bpe", "rdn.tokenizer.chat", "rdn.model.attention", "rdn.model.gpt",
    "rdn.model.moe", "rdn.model.mhc", "rdn.model.mtp", "rdn.model.ternary",
    "rdn.optim.muon_adamw", "rdn.optim.dist", "rdn.optim.schedules", "rdn.optim.quant8", "rdn.optim.lion",
    "rdn.optim.galore", "rdn.optim.variants",
    "rdn.tasks.base", "rdn.tasks.calculator", "rdn.tasks.tictactoe", "rdn.tasks.brackets", "rdn.tasks.spelling",
    "rdn.tasks.loaders", "rdn.inference.engine", "rdn.inference.tools",
    "rdn.train.trainer", "rdn.train.collider", "rdn.train.lm", "rdn.train.pretrain", "rdn.train.posttrain",
    "rdn.train.rl",
)


def code_sha256(modules: tuple[str, ...] = TRAJECTORY_MODULES) -> str:
    """sha256 over the source of ``modules`` (recorded in checkpoint meta, checked on resume)."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for name in modules:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- what a stage hands in

@dataclass(frozen=True)
class OptimSettings:
    """Learning rates and the rest of what :func:`build_optimizer` needs."""

    unembedding_lr: float
    embedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float
    adam_betas: tuple[float, float]
    grad_clip: float = 0.0                  # global gradient-norm clip (0 = off)
    orthogonalization: str = "auto"         # optim.orthogonalization_dtype
    variant: OptimVariant = OptimVariant()  # optim.state_dtype / matrix / vector / lion_lr_scale / galore


@dataclass(frozen=True)
class ScheduleValues:
    """What the schedule sets before a step: the LR multiplier, and for Muon groups the
    momentum and weight decay (None = leave the group's own value)."""

    lrm: float
    momentum: float | None = None
    weight_decay: float | None = None


@dataclass
class TrainJob:
    """Everything the trainer needs about a stage; components get only their own settings."""

    stage: str
    model: torch.nn.Module
    out_dir: Path
    device: torch.device
    num_steps: int
    optim: OptimSettings
    schedule: Callable[[int, int], ScheduleValues]   # (step, num_steps) -> values
    compat: dict[str, Any]                 # meta fields a resumed checkpoint must match
    config: dict[str, Any]                 # the stage's params section, recorded in meta.json
    eval_every: int
    save_every: int
    keep_last: int = 2
    resume: str = "auto"                   # auto | never
    log_every: int = 10
    meta: dict[str, Any] = field(default_factory=dict)   # extra meta.json content
    history_path: Path | None = None       # CSV of per-step metrics (DVC plots, report)
    compile: bool = False                  # torch.compile the model's forward
    sample: Callable[[torch.nn.Module], str] | None = None   # a short text sample, logged now and then
    sample_every: int = 0
    world_size: int | None = None          # None = the process group's (1 without one)


class Objective(Protocol):
    """How a stage turns a step into losses, and how it evaluates. See :class:`LMObjective`
    and :class:`rdn.train.rl.PolicyGradientObjective`."""

    eval_key: str                 # history key of the evaluation figure ("val_bpb", "eval_accuracy")
    eval_metric: str              # its MLflow key ("val/bpb", "rl/eval_accuracy")
    history_columns: tuple[str, ...]
    untimed_steps: int            # first steps left out of timing (compilation, warm-up)

    def open(self, forward: torch.nn.Module, loader_state: dict | None) -> None: ...
    def micro_losses(self, step: int) -> Iterator[torch.Tensor]: ...
    def step_record(self, step: int, loss: float, dt: float) -> tuple[dict[str, float], dict[str, float], str]: ...
    def evaluate(self) -> float | None: ...
    def loader_state(self) -> dict | None: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def summary(self, step: int, elapsed: float, history: list[dict[str, float]]) -> dict[str, Any]: ...
    def close(self) -> None: ...
    # Optional: ``final_evaluate() -> (value, {mlflow_key: figure})`` replaces ``evaluate`` at the
    # run's end; the extra figures go to MLflow and, as ``key.replace("/", "_")``, to the history.


def autocast_context(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """A factory of autocast contexts (a no-op context for float32)."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model, settings: OptimSettings, world: int, ortho_dtype: torch.dtype) -> torch.optim.Optimizer:
    """The optimizer of every training stage: :class:`~rdn.optim.MuonAdamW` on one process,
    :class:`~rdn.optim.dist.DistMuonAdamW` (sharded state, clipping after the gradient
    reduction) under torchrun. A new optimizer variant is chosen here: ``settings.variant``
    (:class:`~rdn.optim.OptimVariant`) writes its updates and state dtype into the groups."""
    groups = model.optimizer_param_groups(
        unembedding_lr=settings.unembedding_lr, embedding_lr=settings.embedding_lr, matrix_lr=settings.matrix_lr,
        scalar_lr=settings.scalar_lr, weight_decay=settings.weight_decay, adam_betas=settings.adam_betas,
        ortho_dtype=dtype_name(ortho_dtype))
    groups = settings.variant.param_groups(groups, settings.adam_betas)
    if world > 1:
        return DistMuonAdamW(groups, max_grad_norm=settings.grad_clip)
    return MuonAdamW(groups)


def write_history_csv(path: Path, history: list[dict[str, float]], columns: tuple[str, ...]) -> None:
    """Per-step metrics as CSV (one row per entry, blanks where a metric was not measured)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


# --------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, job: TrainJob, objective: Objective, run):
        self.job, self.objective, self.run = job, objective, run
        self.info = dist_info()
        self.world = self.info.world_size
        if job.world_size is not None and job.world_size != self.world:
            raise ValueError(f"{job.stage}: job.world_size is {job.world_size} but the process group has "
                             f"{self.world} ranks")
        self.model = job.model.to(job.device)
        self.step_no = 0
        self.elapsed = 0.0          # seconds of the timed steps
        self.earlier_peak = 0.0     # peak memory of earlier processes of this run
        self.history: list[dict[str, float]] = []
        self.ckpt: Checkpoint | None = None
        self.finished_eval: float | None = None   # set when the newest checkpoint is a finished run
        self.last_eval: float | None = None
        self.recent: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.ortho_dtype: torch.dtype | None = None

    # -- build or resume
    def build_or_resume(self) -> None:
        job, info = self.job, self.info
        ckpt = latest_checkpoint(job.out_dir)
        stale = False  # old checkpoints to remove before this run writes its own
        if ckpt is not None and job.resume == "never":
            log.info("%s: resume: never -- starting fresh; removing %d old checkpoints", job.stage,
                     len(list_checkpoints(job.out_dir)))
            stale, ckpt = True, None
        if ckpt is not None:
            try:
                check_compatible(ckpt, {**job.compat, "optim_variant": job.optim.variant.compat()})
            except CheckpointError as e:
                # A different configuration (e.g. `dvc exp run -S ...` after a finished run): these
                # checkpoints belong to another run, and DVC's cache still holds them.
                log.warning("%s: not resuming: %s -- starting fresh and removing the old checkpoints", job.stage, e)
                stale, ckpt = True, None
        barrier()  # (several ranks) every rank has decided from the same files before rank 0 removes any
        if stale and info.is_main:
            clear_checkpoints(job.out_dir)
        if ckpt is not None and ckpt.meta.get("world_size", 1) != self.world:
            n = ckpt.meta.get("world_size", 1)
            raise CheckpointError(f"{ckpt.path} was written by {n} ranks and this run has {self.world}: the "
                                  f"optimizer state is sharded per rank, so resume with {n} ranks "
                                  f"(dist.nproc_per_node x dist.nnodes), or set {job.stage}.resume: never to "
                                  f"start fresh")
        self.ckpt = ckpt
        self.ortho_dtype = self._orthogonalization_dtype(ckpt)
        self.optimizer = build_optimizer(self.model, job.optim, self.world, self.ortho_dtype)
        loader_state = None
        if ckpt is not None:
            ckpt.load_model(self.model, job.device)
            ckpt.load_optimizer(self.optimizer, rank=info.rank)
            state = ckpt.trainer_state()
            self.step_no, self.elapsed = int(state["step"]), float(state["elapsed"])
            self.earlier_peak = float(state.get("peak_memory_mib", 0.0))
            self.objective.load_state(state)
            set_rng_state(state["rng"])
            loader_state = ckpt.loader_state()
            self.history = ckpt.history()
            log.info("%s: resuming from %s (step %d of %d)", job.stage, ckpt.path, self.step_no, job.num_steps)
            if self.step_no >= job.num_steps:
                # A finished run: its final checkpoint holds the final evaluation.
                self.finished_eval = next((h[self.objective.eval_key] for h in reversed(self.history)
                                           if h.get("step") == self.step_no and self.objective.eval_key in h), None)
                if self.finished_eval is not None:
                    log.info("%s: already finished at step %d (%s); nothing to do", job.stage, self.step_no,
                             ckpt.path)
        broadcast_parameters(self.model)  # no-op on one rank
        report = hardware_report(job.device, self.ortho_dtype)
        log.info("%s: %s", job.stage, report.line())
        self.run.log_params({"hardware": report.as_params()})
        forward = torch.compile(self.model, dynamic=False) if job.compile else self.model
        self.objective.open(forward, loader_state)

    def _orthogonalization_dtype(self, ckpt: Checkpoint | None) -> torch.dtype:
        job = self.job
        here = orthogonalization_dtype(job.optim.orthogonalization, job.device)
        if ckpt is None:
            return here
        kept = ckpt.meta.get("orthogonalization_dtype", "bfloat16")  # checkpoints from before the key: bf16
        if kept != dtype_name(here):
            log.warning("%s: resuming with the checkpoint's Muon orthogonalization dtype %s (optim."
                        "orthogonalization_dtype: %s would pick %s on this machine), so the continuation is "
                        "the run it started as; set %s.resume: never to retrain in %s", job.stage, kept,
                        job.optim.orthogonalization, dtype_name(here), job.stage, dtype_name(here))
        else:
            log.info("%s: resuming with the checkpoint's Muon orthogonalization dtype %s", job.stage, kept)
        return ORTHOGONALIZATION_DTYPES[kept]

    # -- one optimizer step
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch loss (the one place a custom backward plugs in)."""
        loss.backward()

    def step(self) -> float:
        job, optimizer = self.job, self.optimizer
        sched = job.schedule(self.step_no, job.num_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * sched.lrm
            if group["kind"] == "muon":
                if sched.momentum is not None:
                    group["momentum"] = sched.momentum
                if sched.weight_decay is not None:
                    group["weight_decay"] = sched.weight_decay
        cuda = job.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(job.device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=job.device)
        for loss in self.objective.micro_losses(self.step_no):
            self.backward(loss)
            loss_sum += loss.detach().float()
        if self.world == 1:  # global norm before clipping; the sharded optimizer takes it after its reduction
            if job.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), job.optim.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters()
                                                           if p.grad is not None])
        if self.world > 1:  # every rank must see the same loss to take the same NaN decision
            torch.distributed.all_reduce(loss_sum)
        loss_value = float(loss_sum.item()) / self.world  # one host sync per step, for the NaN check
        if not math.isfinite(loss_value):
            newest = latest_checkpoint(job.out_dir)
            raise TrainingDiverged(f"{job.stage}: loss is {loss_value} at step {self.step_no}; nothing was saved "
                                   f"from this step. Last good checkpoint: {newest.path if newest else 'none'}")
        optimizer.step()
        if self.world > 1:
            grad_norm = optimizer.last_grad_norm
        optimizer.zero_grad(set_to_none=True)
        after_step = getattr(self.model, "after_optimizer_step", None)
        if after_step is not None:  # model variants' own per-step updates (MoE routing biases)
            after_step()
        if cuda:
            torch.cuda.synchronize(job.device)
        dt = time.perf_counter() - t0
        grad_norm = float(grad_norm)  # after the synchronize: no extra wait
        self.step_no += 1
        if self.step_no > self.objective.untimed_steps:
            self.elapsed += dt
        self.recent = (self.recent + [dt])[-20:]
        metrics, row, text = self.objective.step_record(self.step_no, loss_value, dt)
        variant = self.model.variant_metrics() if hasattr(self.model, "variant_metrics") else {}
        if variant:
            text += " | " + " ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in variant.items())
        metrics = {**metrics, **variant, "train/lrm": sched.lrm, "train/dt": dt, "train/grad_norm": grad_norm}
        if sched.momentum is not None:
            metrics["optim/muon_momentum"] = sched.momentum
        if sched.weight_decay is not None:
            metrics["optim/weight_decay"] = sched.weight_decay
        self.run.log_metrics(metrics, step=self.step_no)
        self.history.append({"step": self.step_no, **row, "lrm": sched.lrm, "dt": dt, "grad_norm": grad_norm})
        s, n = self.step_no, job.num_steps
        if s % job.log_every == 0 or s == n or s <= 3:
            eta = (n - s) * (sum(self.recent) / len(self.recent))
            log.info("%s: step %05d/%05d (%5.1f%%) | %s | lrm %.2f | dt %.0fms | eta %s", job.stage, s, n,
                     100 * s / n, text, sched.lrm, dt * 1000, human_seconds(eta))
            self.run.log_metrics({"memory/peak_mib": peak_memory_mib(job.device),
                                  "memory/optimizer_state_mib": state_bytes(optimizer) / 2**20}, step=s, flush=True)
        return loss_value

    # -- evaluation and checkpoints
    def evaluate(self, flush: bool = False, final: bool = False) -> float | None:
        extra: dict[str, float] = {}
        if final and hasattr(self.objective, "final_evaluate"):
            value, extra = self.objective.final_evaluate()
        else:
            value = self.objective.evaluate()
        if value is None:  # this rank does not evaluate (chat_rl evaluates on rank 0 only)
            return None
        self.last_eval = value
        self.run.log_metrics({self.objective.eval_metric: value, **extra}, step=self.step_no, flush=flush)
        self.history.append({"step": self.step_no, self.objective.eval_key: value,
                             **{k.replace("/", "_"): v for k, v in extra.items()}})
        log.info("%s: step %d %s %.4f", self.job.stage, self.step_no, self.objective.eval_metric, value)
        return value

    def peak_memory(self) -> float:
        return max(self.earlier_peak, peak_memory_mib(self.job.device))

    def checkpoint(self) -> Path:
        job = self.job
        state = {"step": self.step_no, "elapsed": self.elapsed, "peak_memory_mib": self.peak_memory(),
                 "rng": rng_state(), **self.objective.state()}
        meta = {**job.compat, "optim_variant": job.optim.variant.compat(), **job.meta, "stage": job.stage,
                self.objective.eval_key: self.last_eval,
                "world_size": self.world, "orthogonalization_dtype": dtype_name(self.ortho_dtype),
                "config": job.config}
        path = save_checkpoint(job.out_dir, self.step_no, self.model, self.optimizer, state,
                               self.objective.loader_state(), meta, keep_last=job.keep_last, history=self.history,
                               rank=self.info.rank, world_size=self.world)
        self.write_history()
        return path

    def write_history(self) -> None:
        if self.job.history_path is not None and self.info.is_main:
            write_history_csv(self.job.history_path, self.history, self.objective.history_columns)

    # -- the loop
    def fit(self) -> dict[str, Any]:
        job = self.job
        self.build_or_resume()
        try:
            while self.step_no < job.num_steps:
                if self.step_no % job.eval_every == 0:
                    self.evaluate()
                if (job.sample is not None and self.info.is_main and self.step_no > 0
                        and self.step_no % job.sample_every == 0):
                    log.info("%s: sample at step %d: %r", job.stage, self.step_no, job.sample(self.model)[:200])
                self.step()
                if self.step_no % job.save_every == 0 and self.step_no < job.num_steps:
                    self.checkpoint()
            return self.finish()
        finally:
            self.objective.close()

    def finish(self) -> dict[str, Any]:
        job = self.job
        if self.finished_eval is not None:
            self.last_eval = self.finished_eval
            final = job.out_dir / self.ckpt.path.name
            self.write_history()  # DVC removed the stage's outputs before rerunning it
        else:
            self.evaluate(flush=True, final=True)
            final = self.checkpoint()
        summary = {"steps": self.step_no, **self.objective.summary(self.step_no, self.elapsed, self.history),
                   "final_grad_norm": next((h["grad_norm"] for h in reversed(self.history) if "grad_norm" in h), None),
                   "train_seconds": round(self.elapsed, 2), "peak_memory_mib": round(self.peak_memory(), 1),
                   "optimizer_state_mib": round(state_bytes(self.optimizer) / 2**20, 3),
                   "checkpoint": str(final)}
        log.info("%s: done: %d steps, %s %s, %s", job.stage, self.step_no, self.objective.eval_metric,
                 f"{self.last_eval:.4f}" if self.last_eval is not None else "n/a", human_seconds(self.elapsed))
        return summary


def train(job: TrainJob, objective: Objective, run) -> dict[str, Any]:
    """Build or resume, train to ``job.num_steps``, evaluate and save: the stage's summary."""
    return Trainer(job, objective, run).fit()
