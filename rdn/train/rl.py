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
import math
import time
from pathlib import Path
from typing import Any

import torch

from rdn.config import ChatRLConfig, Params
from rdn.dist import all_reduce_sum, broadcast_parameters, dist_info
from rdn.inference.engine import Engine
from rdn.eval.evaluate import task_accuracy
from rdn.tasks import get_task
from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import render_for_completion
from rdn.train.pretrain import TOKENIZER, code_sha256
from rdn.checkpoint import (CheckpointError, check_compatible, latest_checkpoint, rng_state, save_checkpoint,
                                  set_rng_state)
from rdn.train.trainer import clear_checkpoints, peak_memory_mib, resolve_device, write_history_csv
from rdn.train.posttrain import CHECKPOINTS, coordinate_calculator, model_from_checkpoint, source_checkpoint

log = logging.getLogger(__name__)

RL_NEUTRAL = {"eval_every", "eval_examples", "save_every", "resume"}
HISTORY_COLUMNS = ("step", "reward_mean", "pass_at_k", "seq_len", "lrm", "eval_accuracy", "dt")


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
    train_set = task.generate(cfg.num_steps * cfg.prompts_per_step, seed=seed, split="train")
    eval_set = task.generate(cfg.eval_examples, seed=seed + 1, split="test")
    base = params.base_train
    info = dist_info()
    world = info.world_size
    if cfg.prompts_per_step < world:
        raise ValueError(f"chat_rl.prompts_per_step ({cfg.prompts_per_step}) must be >= the number of ranks ({world})")
    optim_kwargs = dict(
        unembedding_lr=base.unembedding_lr * cfg.init_lr_frac, embedding_lr=base.embedding_lr * cfg.init_lr_frac,
        matrix_lr=base.matrix_lr * cfg.init_lr_frac, scalar_lr=base.scalar_lr * cfg.init_lr_frac,
        weight_decay=0.0, adam_betas=(base.adam_beta1, base.adam_beta2))
    if world > 1:
        from rdn.optim.dist import DistMuonAdamW

        optimizer = DistMuonAdamW(model.optimizer_param_groups(**optim_kwargs))
    else:
        optimizer = model.setup_optimizer(**optim_kwargs)
    out_dir = root / CHECKPOINTS / "rl"
    compat = {"model_config": source.meta["model_config"], "tokenizer_sha256": tokenizer.hash,
              "coords": source.meta["coords"], "seed": seed, "code_sha256": code_sha256(),
              "rl_config": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RL_NEUTRAL},
              "init_from": {"path": f"sft/{source.path.name}", "created_utc": source.meta.get("created_utc")}}
    step, history, elapsed, earlier_peak = 0, [], 0.0, 0.0
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and cfg.resume == "auto":
        try:
            check_compatible(ckpt, compat)
        except CheckpointError as e:
            log.warning("chat_rl: not resuming: %s -- starting fresh", e)
            ckpt = None
    elif ckpt is not None:
        ckpt = None
    if ckpt is not None and ckpt.meta.get("world_size", 1) != world:
        raise CheckpointError(f"{ckpt.path} was written by {ckpt.meta.get('world_size', 1)} ranks and this run has "
                              f"{world}: resume with the same number of ranks, or set chat_rl.resume: never")
    if ckpt is None:
        if info.is_main:
            clear_checkpoints(out_dir)
    else:
        ckpt.load_model(model, device)
        ckpt.load_optimizer(optimizer, rank=info.rank)
        state = ckpt.trainer_state()
        step, elapsed = int(state["step"]), float(state["elapsed"])
        earlier_peak = float(state.get("peak_memory_mib", 0.0))
        set_rng_state(state["rng"])
        history = ckpt.history()
        log.info("chat_rl: resuming from %s (step %d of %d)", ckpt.path, step, cfg.num_steps)
    broadcast_parameters(model)
    engine = Engine(model, tokenizer, calc)
    P, S = cfg.prompts_per_step, cfg.samples_per_prompt
    log.info("chat_rl: task %s, %d steps x %d prompts x %d samples, from %s", cfg.task, cfg.num_steps, P, S,
             source.path)

    def evaluate() -> dict[str, float]:
        model.eval()
        res = task_accuracy(engine, tokenizer, task, eval_set, cfg.max_new_tokens, temperature=0.0,
                            batch_size=cfg.device_batch_size, seed=seed)
        model.train()
        return res

    def save(at_step: int, eval_acc: float | None):
        meta = {**compat, "stage": "chat_rl", "eval_accuracy": eval_acc, "world_size": world,
                "config": cfg.model_dump(mode="json")}
        save_checkpoint(out_dir, at_step, model, optimizer, {"step": at_step, "elapsed": elapsed, "rng": rng_state(),
                                                       "peak_memory_mib": max(earlier_peak, peak_memory_mib(device))},
                        None, meta, keep_last=2, history=history, rank=info.rank, world_size=world)
        if info.is_main:
            write_history_csv(root / "metrics" / "chat_rl_history.csv", history, HISTORY_COLUMNS)

    last_eval: dict[str, float] | None = None
    model.train()
    while step < cfg.num_steps:
        if step % cfg.eval_every == 0 and info.is_main:  # the other ranks wait in the next step's collectives
            last_eval = evaluate()
            run.log_metrics({"rl/eval_accuracy": last_eval["accuracy"]}, step=step)
            history.append({"step": step, "eval_accuracy": last_eval["accuracy"]})
            log.info("chat_rl: step %d held-out %s accuracy %.3f", step, cfg.task, last_eval["accuracy"])
        t0 = time.perf_counter()
        lrm = 1.0 - step / cfg.num_steps
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        convs = train_set[step * P:(step + 1) * P][info.rank::world]
        prompts = [render_for_completion(tokenizer, task.prompt(c)) for c in convs]
        model.eval()
        gens = engine.generate(prompts, num_samples=S, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_k=cfg.top_k, seed=_step_seed(seed, step))
        model.train()
        rewards = torch.tensor([[task.score(c, g.text) for g in samples] for c, samples in zip(convs, gens)])
        adv = group_advantages(rewards, cfg.normalize_advantages).flatten()
        flat_prompts = [p for p in prompts for _ in range(S)]
        flat_gens = [g for samples in gens for g in samples]
        n_local = sum(sum(g.mask) for g in flat_gens)
        # the global token count, / world because the optimizer averages the ranks' gradients
        n_tokens = max(1.0, all_reduce_sum([float(n_local)], device)[0]) / world
        for i in range(0, len(flat_gens), cfg.device_batch_size):
            x, y, m, ids = _sequence_batch(flat_prompts[i:i + cfg.device_batch_size],
                                           flat_gens[i:i + cfg.device_batch_size], tokenizer.bos_id, device)
            coords = calc(ids)[:, :-1] if calc is not None else None
            logp = -model(x, y, coords=coords, loss_reduction="none")
            ref_logp = None
            if ref is not None:
                with torch.no_grad():
                    ref_logp = -ref(x, y, coords=coords, loss_reduction="none")
            loss = policy_gradient_loss(logp, adv[i:i + cfg.device_batch_size].to(device), m.float(),
                                        clip_eps=cfg.clip_eps, ref_logp=ref_logp, kl_coef=cfg.kl_coef,
                                        n_tokens=n_tokens)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        elapsed += dt
        step += 1
        reward_sum, n_rewards, pass_sum, n_prompts, len_sum, loss_sum = all_reduce_sum(
            [float(rewards.sum()), rewards.numel(), float((rewards.max(dim=1).values >= 1.0).sum()), len(convs),
             float(sum(len(g.tokens) for g in flat_gens)), float(loss.detach())], device)
        reward_mean, pass_k, seq_len = reward_sum / n_rewards, pass_sum / n_prompts, len_sum / n_rewards
        if not math.isfinite(loss_sum):  # the same sum on every rank: all stop together
            raise RuntimeError(f"chat_rl: loss is not finite at step {step}")
        run.log_metrics({"rl/reward_mean": reward_mean, "rl/pass_at_k": pass_k, "rl/seq_len": seq_len,
                         "rl/lrm": lrm, "train/dt": dt}, step=step)
        history.append({"step": step, "reward_mean": reward_mean, "pass_at_k": pass_k, "seq_len": seq_len,
                        "lrm": lrm, "dt": dt})
        log.info("chat_rl: step %03d/%03d | reward %.3f | pass@%d %.3f | len %.1f | lrm %.2f | dt %.1fs", step,
                 cfg.num_steps, reward_mean, S, pass_k, seq_len, lrm, dt)
        if step % cfg.save_every == 0 and step < cfg.num_steps:
            save(step, last_eval["accuracy"] if last_eval else None)
    # a run resumed after it had finished already has its final evaluation and checkpoint
    final = next((h for h in reversed(history) if h.get("step") == step and "eval_accuracy" in h), None)
    if final is not None and ckpt is not None and ckpt.step == step:
        last_eval = {"accuracy": final["eval_accuracy"]}
        log.info("chat_rl: already finished at step %d (%s); nothing to do", step, ckpt.path)
        if info.is_main:  # DVC removes a stage's outputs before running it: write them again
            write_history_csv(root / "metrics" / "chat_rl_history.csv", history, HISTORY_COLUMNS)
    else:
        if info.is_main:
            last_eval = evaluate()
            run.log_metrics({"rl/eval_accuracy": last_eval["accuracy"]}, step=step, flush=True)
            history.append({"step": step, "eval_accuracy": last_eval["accuracy"]})
        save(step, last_eval["accuracy"] if last_eval else None)
    first_eval = next((h["eval_accuracy"] for h in history if "eval_accuracy" in h), None)
    return {"steps": step, "task": cfg.task, "initial_eval_accuracy": first_eval,
            "final_eval_accuracy": last_eval["accuracy"] if last_eval else None,
            "final_reward_mean": next((h["reward_mean"] for h in reversed(history) if "reward_mean" in h), None),
            "train_seconds": round(elapsed, 2), "peak_memory_mib": round(max(earlier_peak, peak_memory_mib(device)), 1),
            "checkpoint": f"{CHECKPOINTS}/rl/step_{step:06d}"}
