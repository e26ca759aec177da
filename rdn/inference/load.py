"""The engine for a stage's newest checkpoint, checked against the tokenizer it was trained with
(used by ``rdn chat`` and ``rdn serve-chat``)."""

from __future__ import annotations

from pathlib import Path

from rdn.checkpoint import CheckpointError, coordinate_calculator, latest_checkpoint, model_from_checkpoint
from rdn.device import resolve_device
from rdn.inference.engine import Engine
from rdn.tokenizer import Tokenizer, TokenizerError


class EngineLoadError(ValueError):
    """A checkpoint or tokenizer that cannot be served; its message is one line naming the path."""


def checkpoint_tokenizer(ckpt, tokenizer_dir: Path) -> Tokenizer:
    """The tokenizer in ``tokenizer_dir``, refused (EngineLoadError) when it is not the one the
    checkpoint ``ckpt`` recorded (by sha256)."""
    try:
        tok = Tokenizer.load(tokenizer_dir)
    except TokenizerError as e:
        raise EngineLoadError(str(e)) from None
    want = ckpt.meta.get("tokenizer_sha256")
    if want is not None and want != tok.hash:
        raise EngineLoadError(f"{ckpt.path} was trained with a different tokenizer than {tokenizer_dir} "
                              f"(sha256 {want[:12]}... vs {tok.hash[:12]}...)")
    return tok


def load_engine(checkpoint_dir: Path, tokenizer_dir: Path, device: str) -> tuple[Engine, str]:
    """The engine for the newest checkpoint in ``checkpoint_dir`` and a one-line description of it."""
    ckpt = latest_checkpoint(checkpoint_dir)
    if ckpt is None:
        try:  # a broken tokenizer is the first thing to say
            Tokenizer.load(tokenizer_dir)
        except TokenizerError as e:
            raise EngineLoadError(str(e)) from None
        raise EngineLoadError(f"{checkpoint_dir}: no checkpoint here (expected step_NNNNNN/ folders with "
                              "model.safetensors and meta.json); train the stage first, e.g. `dvc repro chat_sft`")
    tok = checkpoint_tokenizer(ckpt, tokenizer_dir)
    dev = resolve_device(device)
    try:
        model, config = model_from_checkpoint(ckpt, dev)
        calc = coordinate_calculator(ckpt, tok)
    except CheckpointError as e:
        raise EngineLoadError(str(e)) from None
    model.eval()
    mode = "RDN coordinates" if config.use_coordinates else "plain GPT"
    about = (f"{ckpt.path} (step {ckpt.step}, {config.n_layer} layers x {config.n_embd}, {mode}, "
             f"{dev.type})")
    return Engine(model, tok, calc), about
