"""Checkpoints: ``<dir>/step_NNNNNN/`` folders written atomically.

A checkpoint folder holds

* ``model.safetensors`` -- the weights (safetensors: no code runs on load);
* ``optim_rank{r}.pt`` -- optimizer state of rank ``r`` (tensors and plain containers,
  loaded with ``torch.load(weights_only=True)``: nothing arbitrary is unpickled);
* ``trainer.pt`` -- step, RNG states and loop counters (same rules);
* ``loader.json`` -- the data loader's position (see :mod:`rdn.data.loader`);
* ``meta.json`` -- resolved config, step, val bpb, tokenizer hash, git sha, versions.

It is written into a hidden temp folder, fsynced, then renamed into place, so a folder
named ``step_*`` is always complete and a run killed mid-write leaves only a hidden
``.step_*.tmp`` folder that resume ignores (and the next save removes).

Under torchrun (``world_size`` > 1) rank 0 writes everything except the other ranks'
optimizer shards; rank ``r`` writes ``.step_NNNNNN.optim_rank{r}.tmp`` beside the folder,
rank 0 moves those files in before the rename, and barriers order the two. Several
nodes therefore need the checkpoint folder on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rdn.coords import CoordinateCalculator
from rdn.io import atomic_directory, provenance, write_json
from rdn.model import GPT, GPTConfig
from rdn.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match the current run."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]

    def load_model(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        state = load_file(str(self.path / "model.safetensors"), device=str(device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.path}/model.safetensors does not fit the model: "
                                  f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")

    def load_optimizer(self, optimizer: torch.optim.Optimizer, rank: int = 0) -> None:
        path = self.path / f"optim_rank{rank}.pt"
        if not path.exists():
            raise CheckpointError(f"{path}: missing (saved with world size {self.meta.get('world_size')})")
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def trainer_state(self) -> dict[str, Any]:
        return torch.load(self.path / "trainer.pt", map_location="cpu", weights_only=True)

    def history(self) -> list[dict[str, float]]:
        path = self.path / "history.json"
        return json.loads(path.read_text()) if path.exists() else []

    def loader_state(self, rank: int = 0) -> dict[str, Any] | None:
        path = self.path / f"loader_rank{rank}.json"
        return json.loads(path.read_text()) if path.exists() else None


def _shared_tensors_cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; give each its own contiguous copy."""
    return {k: v.detach().contiguous().clone() if v.storage_offset() or not v.is_contiguous() else v.detach()
            for k, v in state.items()}


def _staged_shard(directory: Path, step: int, rank: int) -> Path:
    return directory / f".step_{step:06d}.optim_rank{rank}.tmp"


def save_checkpoint(directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], loader_state: dict | None, meta: dict[str, Any],
                    keep_last: int | None = None, rank: int = 0, history: list | None = None,
                    world_size: int = 1) -> Path:
    """Write ``directory/step_{step:06d}`` atomically; prune to ``keep_last`` complete checkpoints.

    With ``world_size`` > 1 every rank calls this (collectively); only rank 0's model,
    trainer, loader and meta arguments are written (module docstring)."""
    directory = Path(directory)
    final = directory / f"step_{step:06d}"
    if world_size > 1 and rank != 0:
        directory.mkdir(parents=True, exist_ok=True)
        if optimizer is not None:
            part = _staged_shard(directory, step, rank).with_suffix(".part")
            torch.save(optimizer.state_dict(), part)
            part.replace(_staged_shard(directory, step, rank))
        _barrier()  # shard staged
        _barrier()  # checkpoint complete
        return final
    with atomic_directory(final) as tmp:
        save_file(_shared_tensors_cloned(model.state_dict()), str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / f"optim_rank{rank}.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        if loader_state is not None:
            write_json(tmp / f"loader_rank{rank}.json", loader_state)
        if history is not None:
            write_json(tmp / "history.json", history)
        write_json(tmp / "meta.json", {"step": step, **meta, **provenance()})
        if world_size > 1:
            _barrier()
            if optimizer is not None:
                for r in range(1, world_size):
                    _staged_shard(directory, step, r).replace(tmp / f"optim_rank{r}.pt")
    if keep_last is not None:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
    for stale in [*directory.glob(".step_*.tmp"), *directory.glob(".step_*.part")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if world_size > 1:
        _barrier()
    return final


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def list_checkpoints(directory: str | Path) -> list[Checkpoint]:
    """Complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "meta.json").exists() and (child / "model.safetensors").exists():
            found.append(Checkpoint(child, int(m.group(1)), json.loads((child / "meta.json").read_text())))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def check_compatible(ckpt: Checkpoint, expect: dict[str, Any]) -> None:
    """Refuse a checkpoint whose recorded fields differ from ``expect`` (dotted keys of meta),
    naming every field that differs."""
    diffs = []
    for key, want in expect.items():
        got: Any = ckpt.meta
        for part in key.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        if got != want:
            diffs.append(f"{key}: checkpoint has {got!r}, this run has {want!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match this run:\n  " + "\n  ".join(diffs)
                              + "\nmove it away or set resume: never to start fresh")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def clear_checkpoints(directory: Path) -> None:
    """Remove every complete checkpoint folder in ``directory`` (a run starting fresh)."""
    for ckpt in list_checkpoints(directory):
        shutil.rmtree(ckpt.path, ignore_errors=True)


# --------------------------------------------------------------------------- a trained model

def model_from_checkpoint(ckpt: Checkpoint, device: torch.device) -> tuple[GPT, GPTConfig]:
    """The :class:`~rdn.model.GPT` a checkpoint holds, on ``device``, and its config.

    Built on the meta device (no random init of weights that are loaded next), then the
    non-persistent buffers (rotary tables) are initialised and the weights loaded."""
    try:
        config = GPTConfig(**ckpt.meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}/meta.json: no usable model_config ({e})") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    ckpt.load_model(model, device)
    return model, config


def coordinate_calculator(ckpt: Checkpoint, tokenizer: Tokenizer) -> CoordinateCalculator | None:
    """The coordinate calculator the checkpoint's model was trained with (None for plain GPT)."""
    if not ckpt.meta["model_config"].get("use_coordinates", GPTConfig.use_coordinates):
        return None
    coords = ckpt.meta.get("coords") or {}
    if "n_dim" not in coords or "bracket_pairs" not in coords:
        raise CheckpointError(f"{ckpt.path}/meta.json: an RDN model needs coords.n_dim and coords.bracket_pairs")
    return CoordinateCalculator.from_tokenizer(tokenizer, coords["n_dim"], coords["bracket_pairs"])
