"""Base pretraining: build the model and the text loaders from params, then the shared trainer."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from rdn.artifacts import CHECKPOINTS, DATA, METRICS, TOKENIZER, load_token_bytes
from rdn.config import Params
from rdn.coords import CoordinateCalculator
from rdn.data.loader import get_dataloader
from rdn.device import resolve_device
from rdn.inference.engine import greedy_text
from rdn.model import GPT, GPTConfig
from rdn.tokenizer import Tokenizer
from rdn.train.lm import run_lm_stage, trajectory_config
from rdn.train.trainer import code_sha256

log = logging.getLogger(__name__)

OUT = f"{CHECKPOINTS}/base"


def build_model(params: Params, tokenizer: Tokenizer, device: torch.device) -> tuple[GPT, GPTConfig]:
    """A freshly initialised model of ``params.model`` (seeded by ``run.seed``)."""
    config = GPTConfig.from_params(params.model, vocab_size=tokenizer.vocab_size, n_coord_dim=params.coords.n_dim,
                                   bos_token_id=tokenizer.bos_id)
    torch.manual_seed(params.run.seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model, config


def run_base_train(params: Params, root: Path, run) -> dict[str, Any]:
    cfg = params.base_train
    device = resolve_device(params.run.device)
    tokenizer = Tokenizer.load(root / TOKENIZER)
    model, config = build_model(params, tokenizer, device)
    calc = (CoordinateCalculator.from_tokenizer(tokenizer, params.coords.n_dim, params.coords.bracket_pairs)
            if config.use_coordinates else None)
    # The final val bpb over closing-bracket targets and targets at depth >= 2 needs the bracket
    # table in GPT mode too: both modes are scored on the same targets (rdn.eval.bpb).
    bpb_classes = calc or CoordinateCalculator.from_tokenizer(tokenizer, params.coords.n_dim,
                                                              params.coords.bracket_pairs)
    seed = params.run.seed

    def train_batches(state):
        return get_dataloader(tokenizer, root / DATA, "train", cfg.device_batch_size, cfg.seq_len, device=device,
                              coords=calc, state=state, buffer_docs=cfg.loader_buffer_docs, seed=seed,
                              prefetch=cfg.prefetch)

    def val_batches():
        return get_dataloader(tokenizer, root / DATA, "val", cfg.device_batch_size, cfg.seq_len, device=device,
                              coords=calc, buffer_docs=cfg.loader_buffer_docs, seed=seed, prefetch=0, loop=False)

    compat = {"model_config": dataclasses.asdict(config), "tokenizer_sha256": tokenizer.hash,
              "coords": params.coords.model_dump(mode="json"), "seed": seed,
              "train_config": trajectory_config(cfg), "code_sha256": code_sha256()}
    summary = run_lm_stage(
        "base_train", cfg, params.optim, model, device, root / OUT, train_batches, val_batches,
        load_token_bytes(root), compat, run, log_every=params.tracking.log_every,
        sample=lambda m: greedy_text(m, tokenizer, calc, "def main("),
        history_path=root / METRICS / "base_train_history.csv", bpb_classes=bpb_classes)
    summary["checkpoint"] = str(Path(summary["checkpoint"]).relative_to(root))
    return summary
