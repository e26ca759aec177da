"""Base pretraining: build the model and loaders from params and run the shared loop."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rdn.config import Params
from rdn.coords import CoordinateCalculator
from rdn.data.loader import get_dataloader
from rdn.model import GPT, GPTConfig
from rdn.tokenizer import Tokenizer
from rdn.train.trainer import TrainJob, resolve_device, train, trajectory_config

log = logging.getLogger(__name__)

DATA, TOKENIZER, OUT = "artifacts/data", "artifacts/tokenizer", "artifacts/checkpoints/base"


# Modules whose code shapes the training trajectory: a checkpoint written by other code
# is not resumed (its run would not be the run this code does).
TRAJECTORY_MODULES = ("rdn.coords", "rdn.data.loader", "rdn.model.attention", "rdn.model.gpt",
                      "rdn.optim.muon_adamw", "rdn.optim.dist", "rdn.optim.schedules", "rdn.train.trainer",
                      "rdn.train.pretrain")


def code_sha256(modules=TRAJECTORY_MODULES) -> str:
    h = hashlib.sha256()
    for name in modules:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def build_model(params: Params, tokenizer: Tokenizer, device: torch.device) -> tuple[GPT, GPTConfig]:
    config = GPTConfig.from_params(params.model, vocab_size=tokenizer.vocab_size, n_coord_dim=params.coords.n_dim)
    torch.manual_seed(params.run.seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model, config


def greedy_sample(model: GPT, tokenizer: Tokenizer, calc: CoordinateCalculator | None, prompt: str,
                  max_new_tokens: int = 32) -> str:
    """Short greedy continuation by full recomputation (cheap at the sizes we sample)."""
    device = model.get_device()
    ids = torch.tensor([tokenizer.encode(prompt, prepend="<|bos|>")], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            window = ids[:, -model.config.sequence_len:]
            coords = calc(window) if calc is not None else None
            nxt = model(window, coords=coords)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return tokenizer.decode(ids[0, 1:].tolist())


def run_base_train(params: Params, root: Path, run) -> dict[str, Any]:
    cfg = params.base_train
    device = resolve_device(params.run.device)
    tokenizer = Tokenizer.load(root / TOKENIZER)
    token_bytes = torch.tensor(json.loads((root / TOKENIZER / "token_bytes.json").read_text()), dtype=torch.long)
    model, config = build_model(params, tokenizer, device)
    calc = (CoordinateCalculator.from_tokenizer(tokenizer, params.coords.n_dim, params.coords.bracket_pairs)
            if config.use_coordinates else None)
    seed = params.run.seed

    def train_batches(state):
        return get_dataloader(tokenizer, root / DATA, "train", cfg.device_batch_size, cfg.seq_len, device=device,
                              coords=calc, state=state, buffer_docs=cfg.loader_buffer_docs, seed=seed,
                              prefetch=cfg.prefetch)

    def val_batches():
        return get_dataloader(tokenizer, root / DATA, "val", cfg.device_batch_size, cfg.seq_len, device=device,
                              coords=calc, buffer_docs=cfg.loader_buffer_docs, seed=seed, prefetch=0, loop=False)

    job = TrainJob(
        stage="base_train", cfg=cfg, model=model, out_dir=root / OUT, device=device,
        make_train_batches=train_batches, make_val_batches=val_batches, token_bytes=token_bytes,
        compat={"model_config": dataclasses.asdict(config), "tokenizer_sha256": tokenizer.hash,
                "coords": params.coords.model_dump(mode="json"), "seed": seed,
                "train_config": trajectory_config(cfg), "code_sha256": code_sha256()},
        log_every=params.tracking.log_every,
        sample=lambda m: greedy_sample(m, tokenizer, calc, "def main("),
        history_path=root / "metrics" / "base_train_history.csv",
    )
    summary = train(job, run)
    summary["checkpoint"] = str(Path(summary["checkpoint"]).relative_to(root))
    return summary
