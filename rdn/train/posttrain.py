"""Mid-training and chat SFT: the shared loop on conversations, starting from a checkpoint.

* mid_train: from checkpoints/base, rows are pretraining text (``pretrain_fraction``) or
  task conversations, every token supervised (the chat format and tool use are learned
  here, as in nanochat's midtraining); validation is bits-per-byte on the text val split.
* chat_sft: from checkpoints/mid, rows of whole conversations packed best-fit and padded,
  only assistant tokens supervised; validation is bits-per-byte of the assistant tokens of
  held-out (test-split) conversations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rdn.artifacts import CHECKPOINTS, DATA, METRICS, TOKENIZER, load_token_bytes, source_checkpoint
from rdn.checkpoint import Checkpoint, CheckpointError, coordinate_calculator, model_from_checkpoint
from rdn.config import ChatSFTConfig, MidTrainConfig, Params
from rdn.data.conversations import ConversationRows, MixedRows
from rdn.data.loader import DeviceBatches, PackedRows, PrefetchLoader, get_dataloader
from rdn.device import resolve_device
from rdn.inference.engine import greedy_text
from rdn.tasks import get_task
from rdn.tasks.loaders import load_jsonl_conversations, load_parquet_task
from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import render_conversation
from rdn.train.lm import run_lm_stage, trajectory_config
from rdn.train.trainer import code_sha256

log = logging.getLogger(__name__)


def task_conversations(tasks: dict[str, int], seed: int, split: str, extra_path: Path | None = None,
                       parquet_sets: dict[str, Path] | None = None) -> list:
    convs: list = []
    for name, n in sorted(tasks.items()):
        if n > 0:
            convs += get_task(name).generate(n, seed=seed, split=split)
    if extra_path is not None:
        convs += load_jsonl_conversations(extra_path)
    for kind, path in sorted((parquet_sets or {}).items()):
        convs += load_parquet_task(path, kind)
    return convs


def render_all(tokenizer: Tokenizer, convs: list, full_supervision: bool) -> tuple[list, dict]:
    stats: dict[str, int] = {"conversations": 0, "truncated": 0}
    items = []
    for conv in convs:
        ids, mask = render_conversation(tokenizer, conv, stats=stats)
        if full_supervision:
            mask = [0] + [1] * (len(ids) - 1)
        items.append((ids, mask))
    return items, stats


def _compat(params: Params, cfg, tokenizer: Tokenizer, source: Checkpoint, stage: str) -> dict[str, Any]:
    return {"model_config": source.meta["model_config"], "tokenizer_sha256": tokenizer.hash,
            "coords": source.meta["coords"], "seed": params.run.seed,
            "train_config": trajectory_config(cfg), "code_sha256": code_sha256(),
            "init_from": {"path": f"{source.path.parent.name}/{source.path.name}",
                          "created_utc": source.meta.get("created_utc")},
            "mixture": {"tasks": cfg.tasks, "conversations_path": cfg.conversations_path,
                        "parquet_sets": cfg.parquet_sets}}


def _run(stage: str, params: Params, cfg: MidTrainConfig | ChatSFTConfig, root: Path, run, source_dir: str,
         out_dir: str, lr_scale: float) -> dict[str, Any]:
    device = resolve_device(params.run.device)
    tokenizer = Tokenizer.load(root / TOKENIZER)
    source = source_checkpoint(root, source_dir, stage)
    if source.meta.get("tokenizer_sha256") != tokenizer.hash:
        raise CheckpointError(f"{source.path}: trained with another tokenizer than {root / TOKENIZER}; "
                              f"rerun the earlier stages (dvc repro)")
    model, config = model_from_checkpoint(source, device)
    if cfg.seq_len > config.sequence_len:
        raise ValueError(f"{stage}.seq_len ({cfg.seq_len}) exceeds the model's sequence_len "
                         f"({config.sequence_len}) from {source.path}")
    calc = coordinate_calculator(source, tokenizer)
    seed = params.run.seed
    extra = root / cfg.conversations_path if cfg.conversations_path else None
    mid = stage == "mid_train"
    sets = {kind: root / path for kind, path in cfg.parquet_sets.items()}
    train_items, stats = render_all(tokenizer, task_conversations(cfg.tasks, seed, "train", extra, sets),
                                    full_supervision=mid)
    # held-out conversations from the test split, a tenth of each family's training count
    val_tasks = {name: max(1, n // 10) for name, n in cfg.tasks.items() if n > 0}
    val_items, _ = render_all(tokenizer, task_conversations(val_tasks, seed + 1, "test"), full_supervision=mid)
    log.info("%s: %d training conversations (%d longer than a row), from %s", stage, stats["conversations"],
             sum(len(ids) > cfg.seq_len + 1 for ids, _ in train_items), source.path)
    B, T = cfg.device_batch_size, cfg.seq_len

    def train_batches(state):
        state = state or {}
        conv = ConversationRows(train_items, B, T, tokenizer.bos_id, crop=mid, seed=seed,
                                buffer_items=cfg.loader_buffer_docs, state=state.get("conversations"))
        text = (PackedRows(tokenizer, root / DATA, "train", B, T, buffer_docs=cfg.loader_buffer_docs, seed=seed,
                           state=state.get("text")) if mid and cfg.pretrain_fraction > 0 else None)
        rows = MixedRows(text, conv, cfg.pretrain_fraction if mid else 0.0, seed=seed,
                         state=state if "rows_drawn" in state else None)
        return DeviceBatches(PrefetchLoader(rows, cfg.prefetch) if cfg.prefetch else rows, device, calc)

    def val_batches():
        if mid:  # bits per byte of held-out pretraining text, comparable with base_train
            return get_dataloader(tokenizer, root / DATA, "val", B, T, device=device, coords=calc,
                                  buffer_docs=cfg.loader_buffer_docs, seed=seed, prefetch=0, loop=False)
        rows = ConversationRows(val_items, B, T, tokenizer.bos_id, crop=False, seed=seed, loop=False)
        return DeviceBatches(rows, device, calc)

    summary = run_lm_stage(
        stage, cfg, params.optim, model, device, root / CHECKPOINTS / out_dir, train_batches, val_batches,
        load_token_bytes(root), _compat(params, cfg, tokenizer, source, stage), run, lr_scale=lr_scale,
        log_every=params.tracking.log_every, sample=lambda m: greedy_text(m, tokenizer, calc, "2 + 3 ="),
        history_path=root / METRICS / f"{stage}_history.csv", meta={"mixture_stats": stats})
    summary["checkpoint"] = str(Path(summary["checkpoint"]).relative_to(root))
    summary["training_conversations"] = stats["conversations"]
    return summary


def run_mid_train(params: Params, root: Path, run) -> dict[str, Any]:
    return _run("mid_train", params, params.mid_train, root, run, "base", "mid", lr_scale=1.0)


def run_chat_sft(params: Params, root: Path, run) -> dict[str, Any]:
    return _run("chat_sft", params, params.chat_sft, root, run, "mid", "sft", lr_scale=params.chat_sft.init_lr_frac)
