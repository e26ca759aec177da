"""Where the pipeline's artifacts live, relative to the project root, and how a stage finds
the ones an earlier stage wrote.

``artifacts/data`` (corpus shards), ``artifacts/tokenizer`` (tokenizer.json,
token_bytes.json, meta.json) and ``artifacts/checkpoints/<base|mid|sft|rl>/step_NNNNNN``
(see :mod:`rdn.checkpoint`). Training, evaluation and inference all read these names from
here, so none of them needs to import another to find a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rdn.checkpoint import Checkpoint, CheckpointError, latest_checkpoint

DATA = "artifacts/data"
TOKENIZER = "artifacts/tokenizer"
CHECKPOINTS = "artifacts/checkpoints"
METRICS = "metrics"

# checkpoint folder of each training stage (and the short stage names evaluate.stages uses)
CHECKPOINT_DIRS = {"base_train": "base", "mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}


def checkpoint_dir(root: Path, stage_dir: str) -> Path:
    """``<root>/artifacts/checkpoints/<stage_dir>`` (``stage_dir``: base, mid, sft or rl)."""
    return root / CHECKPOINTS / stage_dir


def source_checkpoint(root: Path, stage_dir: str, needed_by: str) -> Checkpoint:
    """The newest checkpoint of an earlier stage, or an error that says which stage to run."""
    ckpt = latest_checkpoint(checkpoint_dir(root, stage_dir))
    if ckpt is None:
        raise CheckpointError(f"{checkpoint_dir(root, stage_dir)}: no checkpoint to start {needed_by} from; "
                              f"run the earlier stage first (dvc repro)")
    return ckpt


def load_token_bytes(root: Path) -> torch.Tensor:
    """Bytes of each token id (0 for special tokens), for bits-per-byte."""
    return torch.tensor(json.loads((root / TOKENIZER / "token_bytes.json").read_text()), dtype=torch.long)
