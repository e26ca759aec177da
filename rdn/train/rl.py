"""Chat RL: on-policy policy gradient on a verifiable task, from checkpoints/sft.

Each step takes ``prompts_per_step`` training problems, samples ``samples_per_prompt``
completions per prompt with the engine (tool calls executed), scores them with the
task's scorer, and computes group-relative advantages ``A = r - mean(r)`` over each
prompt's group (optionally divided by the group's std). The loss is token-level policy
gradient over the tokens the model sampled (forced tool outputs excluded):
``-sum(A * logp) / n_tokens``, optionally with a PPO-style clipped ratio and a k3 KL
penalty to the SFT reference (both off by default, as in nanochat, since one gradient
step per batch keeps the ratio at 1). LRs decay linearly to zero.

Under torchrun each rank samples and scores its share of the step's prompts (prompt ``i``
goes to rank ``i % world_size``); token counts and reward statistics are all-reduced, so
the loss is normalised by the global token count as on one process, and the sharded
optimizer averages the gradients. Rank 0 alone evaluates, logs and writes checkpoint
files other than optimizer shards.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from rdn.artifacts import CHECKPOINTS, METRICS, TOKENIZER, source_checkpoint
from rdn.checkpoint import coordinate_calculator, model_from_checkpoint
from rdn.config import ChatRLConfig, Params
from rdn.device import resolve_device
from rdn.dist import all_reduce_sum, dist_info
from rdn.eval.evaluate import task_accuracy
from rdn.inference.engine import Engine
from rdn.optim.variants import OptimVariant
from rdn.tasks import get_task
from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import render_for_completion
from rdn.train.trainer import OptimSettings, ScheduleValues, TrainJob, code_sha256, train

log = logging.getLogger(__name__)

RL_NEUTRAL = {"eval_every", "eval_examples", "save_every", "keep_last", "resume"}
HISTORY_COLUMNS = ("step", "reward_mean", "pass_at_k", "seq_len", "lrm", "eval_accuracy", "dt", "grad_norm")


def group_advantages(rewards: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``rewards`` [prompts, samples] -> advantages with zero mean in every group."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize:
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + 1e-4)
    return adv


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         old_logp: torch.Tensor | None = None, clip_eps: float | None = None,
                         ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                         n_tokens: int | None = None) -> torch.Tensor:
    """Token-level PG loss. ``logp``/``mask`` [B, T]; ``advantages`` [B] (one per sequence)."""
    adv = advantages[:, None].to(logp.dtype)
    if clip_eps is not None:
        old = logp.detach() if old_logp is None else old_logp
        ratio = torch.exp(logp - old)
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    else:
        per_token = -adv * logp
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)  # k3 estimator of KL(pi || ref)
    denom = n_tokens if n_tokens is not None else mask.sum().clamp(min=1)
    return (per_token * mask).sum() / denom


def _sequence_batch(prompts: list[list[int]], gens, pad_id: int, device: torch.device):
    """Prompt+completion rows, right-padded; targets are the completion's sampled tokens."""
    seqs, masks = [], []
    for prompt, g in zip(prompts, gens):
        seqs.append(prompt + g.tokens)
        masks.append([0] * len(prompt) + list(g.mask))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    tmask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        tmask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    x, y, m = ids[:, :-1], ids[:, 1:].clone(), tmask[:, 1:]
    y[~m] = -1
    return x.to(device), y.to(device), m.to(device), ids.to(device)


def _step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}-rl-{step}".encode()).digest()[:4], "big")


class PolicyGradientObjective:
    """A step's loss from on-policy rollouts: sample ``samples_per_prompt`` completions of the
    step's prompts, score them, and yield the policy-gradient loss of each micro-batch of
    sampled sequences. Evaluation is held-out task accuracy (rank 0 only)."""

    eval_key, eval_metric = "eval_accuracy", "rl/eval_accuracy"
    history_columns = HISTORY_COLUMNS
    untimed_steps = 0

    def __init__(self, cfg: ChatRLConfig, model, ref, tokenizer: Tokenizer, engine: Engine, task, train_set: list,
                 eval_set: list, calc, seed: int, device):
        self.cfg, self.model, self.ref, self.tok, self.engine = cfg, model, ref, tokenizer, engine
        self.task, self.train_set, self.eval_set, self.calc = task, train_set, eval_set, calc
        self.seed, self.device = seed, device
        self.info = dist_info()
        self.stats: list[float] = []

    def open(self, forward, loader_state) -> None:
        self.model.train()

    def micro_losses(self, step: int) -> Iterator[torch.Tensor]:
        cfg, world, model = self.cfg, self.info.world_size, self.model
        P, S = cfg.prompts_per_step, cfg.samples_per_prompt
        convs = self.train_set[step * P:(step + 1) * P][self.info.rank::world]
        prompts = [render_for_completion(self.tok, self.task.prompt(c)) for c in convs]
        model.eval()
        gens = self.engine.generate(prompts, num_samples=S, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_k=cfg.top_k, seed=_step_seed(self.seed, step))
        model.train()
        rewards = torch.tensor([[self.task.score(c, g.text) for g in samples] for c, samples in zip(convs, gens)])
        adv = group_advantages(rewards, cfg.normalize_advantages).flatten()
        flat_prompts = [p for p in prompts for _ in range(S)]
        flat_gens = [g for samples in gens for g in samples]
        n_local = sum(sum(g.mask) for g in flat_gens)
        # the global token count, / world because the optimizer averages the ranks' gradients
        n_tokens = max(1.0, all_reduce_sum([float(n_local)], self.device)[0]) / world
        for i in range(0, len(flat_gens), cfg.device_batch_size):
            x, y, m, ids = _sequence_batch(flat_prompts[i:i + cfg.device_batch_size],
                                           flat_gens[i:i + cfg.device_batch_size], self.tok.bos_id, self.device)
            coords = self.calc(ids)[:, :-1] if self.calc is not None else None
            logp = -model(x, y, coords=coords, loss_reduction="none")
            ref_logp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_logp = -self.ref(x, y, coords=coords, loss_reduction="none")
            yield policy_gradient_loss(logp, adv[i:i + cfg.device_batch_size].to(self.device), m.float(),
                                       clip_eps=cfg.clip_eps, ref_logp=ref_logp, kl_coef=cfg.kl_coef,
                                       n_tokens=n_tokens)
        self.stats = [float(rewards.sum()), rewards.numel(), float((rewards.max(dim=1).values >= 1.0).sum()),
                      len(convs), float(sum(len(g.tokens) for g in flat_gens))]

    def step_record(self, step: int, loss: float, dt: float) -> tuple[dict[str, float], dict[str, float], str]:
        reward_sum, n_rewards, pass_sum, n_prompts, len_sum = all_reduce_sum(self.stats, self.device)
        row = {"reward_mean": reward_sum / n_rewards, "pass_at_k": pass_sum / n_prompts, "seq_len": len_sum / n_rewards}
        text = (f"reward {row['reward_mean']:.3f} | pass@{self.cfg.samples_per_prompt} {row['pass_at_k']:.3f} | "
                f"len {row['seq_len']:.1f}")
        return {f"rl/{k}": v for k, v in row.items()}, row, text

    def evaluate(self) -> float | None:
        if not self.info.is_main:  # the other ranks wait in the next step's collectives
            return None
        self.model.eval()
        res = task_accuracy(self.engine, self.tok, self.task, self.eval_set, self.cfg.max_new_tokens,
                            temperature=0.0, batch_size=self.cfg.device_batch_size, seed=self.seed)
        self.model.train()
        return res["accuracy"]

    def loader_state(self) -> None:
        return None  # prompts are indexed by step: the step is the position

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self, step: int, elapsed: float, history: list[dict[str, float]]) -> dict[str, Any]:
        evals = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
        return {"task": self.cfg.task, "initial_eval_accuracy": evals[0] if evals else None,
                "final_eval_accuracy": evals[-1] if evals else None,
                "final_reward_mean": next((h["reward_mean"] for h in reversed(history) if "reward_mean" in h), None)}

    def close(self) -> None:
        pass


def run_chat_rl(params: Params, root: Path, run) -> dict[str, Any]:
    cfg: ChatRLConfig = params.chat_rl
    device = resolve_device(params.run.device)
    tokenizer = Tokenizer.load(root / TOKENIZER)
    source = source_checkpoint(root, "sft", "chat_rl")
    model, config = model_from_checkpoint(source, device)
    calc = coordinate_calculator(source, tokenizer)
    ref = model_from_checkpoint(source, device)[0].eval() if cfg.kl_coef > 0 else None
    task = get_task(cfg.task)
    seed = params.run.seed
    world = dist_info().world_size
    if cfg.prompts_per_step < world:
        raise ValueError(f"chat_rl.prompts_per_step ({cfg.prompts_per_step}) must be >= the number of ranks ({world})")
    train_set = task.generate(cfg.num_steps * cfg.prompts_per_step, seed=seed, split="train")
    eval_set = task.generate(cfg.eval_examples, seed=seed + 1, split="test")
    base = params.base_train
    compat = {"model_config": source.meta["model_config"], "tokenizer_sha256": tokenizer.hash,
              "coords": source.meta["coords"], "seed": seed, "code_sha256": code_sha256(),
              "rl_config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RL_NEUTRAL},
              "init_from": {"path": f"sft/{source.path.name}", "created_utc": source.meta.get("created_utc")}}
    log.info("chat_rl: task %s, %d steps x %d prompts x %d samples, from %s", cfg.task, cfg.num_steps,
             cfg.prompts_per_step, cfg.samples_per_prompt, source.path)
    frac = cfg.init_lr_frac
    job = TrainJob(
        stage="chat_rl", model=model, out_dir=root / CHECKPOINTS / "rl", device=device, num_steps=cfg.num_steps,
        optim=OptimSettings(unembedding_lr=base.unembedding_lr * frac, embedding_lr=base.embedding_lr * frac,
                            matrix_lr=base.matrix_lr * frac, scalar_lr=base.scalar_lr * frac, weight_decay=0.0,
                            adam_betas=(base.adam_beta1, base.adam_beta2),
                            orthogonalization=params.optim.orthogonalization_dtype,
                            variant=OptimVariant.from_config(params.optim)),
        schedule=lambda step, steps: ScheduleValues(1.0 - step / steps),  # linear decay to zero
        compat=compat, config=cfg.model_dump(mode="json"), eval_every=cfg.eval_every, save_every=cfg.save_every,
        keep_last=cfg.keep_last, resume=cfg.resume, log_every=1,
        history_path=root / METRICS / "chat_rl_history.csv")
    objective = PolicyGradientObjective(cfg, model, ref, tokenizer, Engine(model, tokenizer, calc), task, train_set,
                                        eval_set, calc, seed, device)
    summary = train(job, objective, run)
    summary["checkpoint"] = str(Path(summary["checkpoint"]).relative_to(root))
    return summary
