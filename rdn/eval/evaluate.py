"""Evaluation of every stage's checkpoint: val bits-per-byte and held-out task accuracy.

``task_accuracy`` (also used by chat_rl for its periodic evaluation) generates answers
to held-out (test-split) problems with the engine and scores them with the task's own
scorer. ``run_evaluate`` does that for each checkpoint named in ``evaluate.stages``,
plus bits-per-byte on the pretraining val split for base and mid (``val_bpb``, and over
closing-bracket targets and targets at depth >= 2: ``val_bpb_closing``, ``val_bpb_depth2``,
:func:`rdn.eval.bpb.evaluate_bpb_by_class`), and writes
``metrics/eval.json`` (DVC metrics) and ``metrics/eval_by_stage.csv`` (DVC plots).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from rdn.artifacts import DATA, TOKENIZER, checkpoint_dir, load_token_bytes
from rdn.checkpoint import coordinate_calculator, latest_checkpoint, model_from_checkpoint
from rdn.config import Params
from rdn.data.loader import get_dataloader
from rdn.device import resolve_device
from rdn.coords import CoordinateCalculator
from rdn.eval.bpb import CLASSES, evaluate_bpb_by_class
from rdn.inference.engine import Engine
from rdn.tasks import get_task
from rdn.tasks.base import reference_final_text
from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import render_for_completion

log = logging.getLogger(__name__)

STAGE_DIRS = {"base": "base", "mid": "mid", "sft": "sft", "rl": "rl"}
TEXT_STAGES = ("base", "mid")   # bits-per-byte on pretraining text
CHAT_STAGES = ("mid", "sft", "rl")  # task accuracy
RL_VS_SFT = "rl_vs_sft"  # eval.json key of the paired SFT-vs-RL comparison on the RL task
BASELINE = "baseline"    # eval.json key of the majority-answer baseline (chance level) per task
BASELINE_TRAIN_PROBLEMS = 1000
PAIRED_STAGES = ("sft", "rl")  # scored on evaluate.rl_task_examples problems of the RL task


@torch.no_grad()
def task_accuracy(engine: Engine, tokenizer: Tokenizer, task, conversations: list, max_new_tokens: int,
                  temperature: float = 0.0, batch_size: int = 16, num_samples: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    """Mean reward of the first sample (accuracy when rewards are 0/1), pass@num_samples, and
    ``scores``: the first sample's reward per conversation, in order (for paired comparisons)."""
    first, any_correct = [], []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i:i + batch_size]
        prompts = [render_for_completion(tokenizer, task.prompt(conv)) for conv in chunk]
        gens = engine.generate(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=None, seed=seed + i)
        for conv, samples in zip(chunk, gens):
            scores = [task.score(conv, g.text) for g in samples]
            first.append(scores[0])
            any_correct.append(float(max(scores) >= 1.0))
    n = max(len(first), 1)
    return {"accuracy": sum(first) / n, f"pass@{num_samples}": sum(any_correct) / n, "scores": first}


def majority_baseline(task, conversations: list, seed: int) -> dict[str, Any]:
    """Chance level of a task: the accuracy, on ``conversations``, of always giving the most
    common reference answer of the *training* split (a reply that ignores the question).
    Scored by the task's own scorer, so a lenient scorer raises the baseline too."""
    from collections import Counter

    train = task.generate(BASELINE_TRAIN_PROBLEMS, seed=seed, split="train")
    answer, _ = Counter(reference_final_text(c) for c in train).most_common(1)[0]
    scores = [task.score(c, answer) for c in conversations]
    return {"answer": answer, "accuracy": sum(scores) / max(len(scores), 1)}


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability, if neither side were better, of a split of
    ``wins + losses`` discordant examples at least this uneven."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(task: str, before: list[float], after: list[float]) -> dict[str, Any]:
    """SFT vs RL on the same held-out problems: accuracies, the discordant counts and the
    sign-test p-value (a paired test is far more sensitive than comparing two accuracies)."""
    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same problems (got {len(before)} and {len(after)})")
    right_before = [b >= 1.0 for b in before]
    right_after = [a >= 1.0 for a in after]
    wins = sum(a and not b for a, b in zip(right_after, right_before))
    losses = sum(b and not a for a, b in zip(right_after, right_before))
    n = max(len(before), 1)
    return {"task": task, "examples": len(before), "sft_accuracy": sum(right_before) / n,
            "rl_accuracy": sum(right_after) / n, "rl_only_correct": wins, "sft_only_correct": losses,
            "p_value": round(sign_test_p(wins, losses), 6)}


def run_evaluate(params: Params, root: Path, run) -> dict[str, Any]:
    cfg = params.evaluate
    device = resolve_device(params.run.device)
    tokenizer = Tokenizer.load(root / TOKENIZER)
    token_bytes = load_token_bytes(root)
    rl_task = params.chat_rl.task
    test_sets = {name: get_task(name).generate(max(cfg.num_examples, cfg.rl_task_examples) if name == rl_task
                                               else cfg.num_examples, seed=params.run.seed + 1, split="test")
                 for name in cfg.tasks}
    results: dict[str, Any] = {}
    scores: dict[tuple[str, str], list[float]] = {}  # (stage, task) -> per-problem rewards
    for stage in cfg.stages:
        ckpt = latest_checkpoint(checkpoint_dir(root, STAGE_DIRS[stage]))
        if ckpt is None:
            raise FileNotFoundError(f"{checkpoint_dir(root, STAGE_DIRS[stage])}: no checkpoint to evaluate; "
                                    f"run that stage first or remove {stage!r} from evaluate.stages")
        start = time.monotonic()
        model, config = model_from_checkpoint(ckpt, device)
        model.eval()
        calc = coordinate_calculator(ckpt, tokenizer)
        row: dict[str, float] = {"step": ckpt.step}
        if stage in TEXT_STAGES:
            T = min(config.sequence_len, params.base_train.seq_len)
            batches = get_dataloader(tokenizer, root / DATA, "val", params.base_train.device_batch_size, T,
                                     device=device, coords=calc, prefetch=0, loop=False, seed=params.run.seed)
            # a GPT checkpoint has no calculator: one from the same tokenizer and coords params scores the same targets
            classes = calc or CoordinateCalculator.from_tokenizer(tokenizer, params.coords.n_dim,
                                                                  params.coords.bracket_pairs)
            res = evaluate_bpb_by_class(model, batches, cfg.bpb_tokens, token_bytes, contextlib.nullcontext, classes)
            row["val_bpb"] = res["bpb"]
            row.update({f"val_bpb_{c}": res[f"bpb_{c}"] for c in CLASSES if res[f"bpb_{c}"] is not None})
        if stage in CHAT_STAGES:
            engine = Engine(model, tokenizer, calc)
            for name, convs in test_sets.items():
                if stage not in PAIRED_STAGES:  # the larger RL-task set only serves the SFT-vs-RL test
                    convs = convs[:cfg.num_examples]  # (generation is prefix-stable: the same problems)
                acc = task_accuracy(engine, tokenizer, get_task(name), convs, cfg.max_new_tokens,
                                    temperature=cfg.temperature, batch_size=cfg.batch_size, seed=params.run.seed)
                row[f"{name}_accuracy"] = acc["accuracy"]
                scores[stage, name] = acc["scores"]
        row["seconds"] = round(time.monotonic() - start, 2)
        results[stage] = row
        run.log_metrics({f"eval/{stage}/{k}": v for k, v in row.items()}, flush=True)
        log.info("evaluate %s (step %d): %s", stage, ckpt.step,
                 ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "seconds")))
        del model
    write_eval_csv(root / "metrics" / "eval_by_stage.csv", results)
    if any(stage in CHAT_STAGES for stage in cfg.stages):
        baseline: dict[str, Any] = {}
        for name, convs in test_sets.items():
            b = majority_baseline(get_task(name), convs[:cfg.num_examples], params.run.seed)
            baseline[f"{name}_accuracy"], baseline[f"{name}_answer"] = b["accuracy"], b["answer"]
        baseline["examples"] = cfg.num_examples
        results[BASELINE] = baseline
        log.info("evaluate: majority-answer baseline (chance level): %s", ", ".join(
            f"{k.removesuffix('_accuracy')} {v:.3f}" for k, v in baseline.items() if k.endswith("_accuracy")))
    if ("sft", rl_task) in scores and ("rl", rl_task) in scores:
        cmp = paired_comparison(rl_task, scores["sft", rl_task], scores["rl", rl_task])
        results[RL_VS_SFT] = cmp
        log.info("evaluate: %s held-out accuracy %.3f after SFT, %.3f after RL; %d problems only RL solves, %d only "
                 "SFT solves (sign test p = %.3g)", rl_task, cmp["sft_accuracy"], cmp["rl_accuracy"],
                 cmp["rl_only_correct"], cmp["sft_only_correct"], cmp["p_value"])
    return results


def write_eval_csv(path: Path, results: dict[str, dict[str, float]]) -> None:
    """One row per evaluated checkpoint (DVC plots: ``dvc plots show metrics/eval_by_stage.csv``)."""
    columns = ["stage"] + sorted({k for row in results.values() for k in row})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for stage, row in results.items():
        writer.writerow({"stage": stage, **row})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())
