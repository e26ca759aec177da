"""``rdn export``: a stage's checkpoint in a deployment format.

Two formats: ``ternary`` (a folder: 2-bit packed weights, below) and ``gguf`` (one file:
``rdn export --stage S --format gguf FILE``, or ``--checkpoint PATH``; the weights in float32, or
``--dtype f16``/``bf16``, the tokenizer, the model config and the coordinate settings, written with
the ``gguf`` package and read back by :func:`rdn.inference.gguf.load_gguf`; layout in
:mod:`rdn.inference.gguf`). llama.cpp cannot run the ``rdn`` architecture; the GGUF file is for
archiving and moving a model.

``rdn export --stage S --format ternary DIR`` (or ``--checkpoint PATH``) writes, for a model
trained with ``model.ternary.enabled`` (BitNet b1.58, arXiv:2402.17764; :mod:`rdn.model.ternary`):

* ``DIR/model.safetensors`` -- the weight ``NAME`` of every
  :class:`~rdn.model.ternary.TernaryLinear` the model's config builds (``blocks.<i>.attn.c_q.weight``
  etc.) as ``NAME.codes`` (uint8, 2 bits per weight, :func:`~rdn.model.ternary.pack_ternary`)
  and ``NAME.scale`` (float32, 0-D); every other tensor (embeddings, lm_head, value-embedding
  gates, per-layer scalars, coordinate tables) as stored in the checkpoint (full precision);
* ``DIR/export.json`` -- format, the model config, each packed matrix's shape, the tokenizer
  hash and coordinate settings, the source checkpoint and the sizes;
* ``DIR/tokenizer/`` -- a copy of the tokenizer files when they match the checkpoint's hash.

:func:`load_ternary_export` rebuilds the :class:`~rdn.model.GPT` from ``DIR`` alone, its
ternary layers frozen to the stored codes and scales, so its logits equal the quantised
forward of the checkpoint model bit for bit in float32. The directory is written atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

FORMATS = ("ternary", "gguf")
GGUF_DTYPES = ("f32", "f16", "bf16")  # rdn.inference.gguf.DTYPES (not imported here: it loads torch)
STAGES = ("base", "mid", "sft", "rl")
FORMAT_NAME = "rdn-ternary"
FORMAT_VERSION = 1
EXPORT_JSON = "export.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "token_bytes.json", "meta.json")


class ExportError(ValueError):
    """A checkpoint or export folder that cannot be exported or loaded; printed as one line, exit 1."""


# --------------------------------------------------------------------------- finding the checkpoint

def resolve_checkpoint(stage: str | None, checkpoint: Path | None, root: Path):
    """The checkpoint ``rdn export`` reads: the newest of ``stage`` (as ``rdn chat --stage``), or
    ``checkpoint`` -- a ``step_NNNNNN`` folder, or a folder of them (its newest)."""
    from rdn.artifacts import checkpoint_dir
    from rdn.checkpoint import Checkpoint, latest_checkpoint

    if checkpoint is not None:
        path = Path(checkpoint)
        if (path / "meta.json").is_file() and (path / WEIGHTS).is_file():
            m = re.match(r"^step_(\d+)$", path.name)
            return Checkpoint(path, int(m.group(1)) if m else -1, json.loads((path / "meta.json").read_text()))
        found = latest_checkpoint(path)
        if found is None:
            raise ExportError(f"{path}: not a checkpoint (no meta.json and {WEIGHTS}) and holds no "
                              "step_NNNNNN/ checkpoint folders")
        return found
    folder = checkpoint_dir(root, stage)
    found = latest_checkpoint(folder)
    if found is None:
        raise ExportError(f"{folder}: no checkpoint here (expected step_NNNNNN/ folders with {WEIGHTS} and "
                          "meta.json); train the stage first")
    return found


def ternary_settings(ckpt) -> dict[str, Any]:
    """``model_config.ternary`` of a ternary checkpoint; refuses any other checkpoint."""
    tern = (ckpt.meta.get("model_config") or {}).get("ternary")
    if not isinstance(tern, dict) or tern.get("enabled") is not True:
        raise ExportError(f"{ckpt.path}: not a ternary model (model.ternary.enabled is not true in its "
                          "meta.json model_config); --format ternary packs only a model trained with "
                          "model.ternary.enabled: true")
    return tern


# --------------------------------------------------------------------------- export

def export_ternary(ckpt, out: Path, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Write the ternary export of ``ckpt`` to ``out`` (module docstring); returns export.json's
    content. ``tokenizer_dir`` is copied in when given, present and of the checkpoint's hash."""
    import torch
    from safetensors.torch import load_file, save_file

    from rdn.io import atomic_directory, write_json
    from rdn.model import GPT
    from rdn.model.ternary import TernaryLinear, pack_ternary, ternary_quantize

    ternary_settings(ckpt)
    try:
        config = _gpt_config(ckpt.meta["model_config"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{ckpt.path}/meta.json: no usable model_config ({e})") from None
    with torch.device("meta"):  # the architecture only: which layers are ternary
        names = sorted(f"{n}.weight" for n, m in GPT(config).named_modules() if isinstance(m, TernaryLinear))
    if not names:
        raise ExportError(f"{ckpt.path}: model.ternary.enabled is true but rdn.model.GPT builds no TernaryLinear "
                          "for its model_config")
    tokenizer = _matching_tokenizer(ckpt, tokenizer_dir)
    state = load_file(str(ckpt.path / WEIGHTS), device="cpu")
    absent = [n for n in names if n not in state]
    if absent:
        raise ExportError(f"{ckpt.path}/{WEIGHTS} does not fit the model: ternary weights {absent[:5]} missing")
    tensors: dict[str, torch.Tensor] = {}
    matrices = {}
    n_ternary = packed_bytes = 0
    for name in names:
        codes, scale = ternary_quantize(state.pop(name))
        packed = pack_ternary(codes)
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = packed, scale
        matrices[name] = {"shape": list(codes.shape), "codes": f"{name}.codes", "scale": f"{name}.scale"}
        n_ternary += codes.numel()
        packed_bytes += packed.numel() + scale.numel() * scale.element_size()
    clash = sorted(set(tensors) & set(state))
    if clash:
        raise ExportError(f"{ckpt.path}/{WEIGHTS}: tensor names {clash[:3]} clash with the packed ones")
    tensors.update({k: v.contiguous() for k, v in state.items()})
    fp32_bytes = 4 * n_ternary
    info = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "model_config": ckpt.meta["model_config"],
        "ternary": {
            "activation_bits": config.ternary.activation_bits,
            "packing": "row-major; weight i is code (w + 1) in bits 2*(i%4) of byte i//4 (uint8 NAME.codes); "
                       "weight = w * NAME.scale (float32)",
            "matrices": matrices,
        },
        "tokenizer_sha256": ckpt.meta.get("tokenizer_sha256"),
        "coords": ckpt.meta.get("coords"),
        "tokenizer": "tokenizer" if tokenizer is not None else None,
        "source": {"path": str(ckpt.path), "step": ckpt.step, "stage": ckpt.meta.get("stage"),
                   "created_utc": ckpt.meta.get("created_utc"), "git_sha": ckpt.meta.get("git_sha")},
        "sizes": {
            "ternary_weights": n_ternary, "ternary_fp32_bytes": fp32_bytes, "ternary_packed_bytes": packed_bytes,
            "ternary_ratio": packed_bytes / fp32_bytes,
            "full_precision_bytes": sum(v.numel() * v.element_size() for v in state.values()),
        },
    }
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
        if tokenizer is not None:
            (tmp / "tokenizer").mkdir()
            for f in TOKENIZER_FILES:
                if (tokenizer / f).is_file():
                    shutil.copy2(tokenizer / f, tmp / "tokenizer" / f)
        info["sizes"]["file_bytes"] = (tmp / WEIGHTS).stat().st_size
        write_json(tmp / EXPORT_JSON, info)
    return info


def _matching_tokenizer(ckpt, tokenizer_dir: Path | None) -> Path | None:
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return None
    from rdn.inference.load import EngineLoadError, checkpoint_tokenizer

    try:
        checkpoint_tokenizer(ckpt, tokenizer_dir)
    except EngineLoadError as e:
        raise ExportError(f"{e}; pass --tokenizer") from None
    return Path(tokenizer_dir)


# --------------------------------------------------------------------------- loading an export

def _gpt_config(model_config: dict[str, Any]):
    """``GPTConfig`` from a recorded ``model_config`` (TypeError/ValueError if it does not fit)."""
    from rdn.model import GPTConfig

    return GPTConfig(**model_config)


def load_ternary_export(directory: str | Path, device="cpu"):
    """The :class:`~rdn.model.GPT` of a ternary export folder, on ``device``, in eval mode.

    Built on the meta device, non-persistent buffers initialised, full-precision tensors loaded;
    each packed matrix becomes a frozen :class:`~rdn.model.ternary.TernaryLinear` holding the
    stored codes and scale (whatever the GPT built there). The original checkpoint is not needed.
    A frozen model has no master weights: it is for inference, not for ``init_weights`` or training."""
    import torch
    from safetensors.torch import load_file

    from rdn.model import GPT
    from rdn.model.ternary import TernaryLinear, unpack_ternary

    directory = Path(directory)
    path = directory / EXPORT_JSON
    if not path.is_file():
        raise ExportError(f"{path}: missing; not an `rdn export --format ternary` folder")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format {info.get('format')!r} version {info.get('version')!r}; this code reads "
                          f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
    try:
        config = _gpt_config(info["model_config"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: no usable model_config ({e})") from None
    device = torch.device(device)
    tensors = load_file(str(directory / WEIGHTS), device=str(device))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    bits = info["ternary"]["activation_bits"]
    frozen = set()
    for name, m in info["ternary"]["matrices"].items():
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if tuple(m["shape"]) != (old.out_features, old.in_features):
            raise ExportError(f"{path}: {name} has shape {m['shape']}, the model's is "
                              f"{[old.out_features, old.in_features]}")
        with torch.device("meta"):
            lin = TernaryLinear(old.in_features, old.out_features, bias=old.bias is not None, activation_bits=bits)
        lin.to_empty(device=device)  # the bias (if any) is loaded below; the weight is dropped now
        lin.freeze_(unpack_ternary(tensors.pop(m["codes"]), m["shape"]), tensors.pop(m["scale"]))
        setattr(parent, child, lin)
        frozen |= {f"{module_name}.weight_codes", f"{module_name}.weight_scale"}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if set(missing) != frozen or unexpected:
        raise ExportError(f"{directory / WEIGHTS} does not fit the model: missing {sorted(set(missing) - frozen)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    stray = [n for n, mod in model.named_modules() if isinstance(mod, TernaryLinear) and not mod.frozen]
    if stray:
        raise ExportError(f"{path}: ternary layers {stray[:5]} of the model have no packed matrix in the export")
    return model.eval()


# --------------------------------------------------------------------------- the command

def export_main(out: Path, fmt: str = "ternary", stage: str | None = None, checkpoint: Path | None = None,
                tokenizer_dir: Path | None = None, root: Path | None = None, dtype: str | None = None) -> int:
    """Entry point of ``rdn export``; returns the exit status (1 on a checkpoint problem).
    ``out`` is a folder for ``ternary``, a file for ``gguf``; ``dtype`` (gguf only, default f32)
    is how floating matrices are stored. ``tokenizer_dir`` defaults to ``<root>/artifacts/tokenizer``
    (root: the current folder)."""
    from rdn.artifacts import TOKENIZER
    from rdn.checkpoint import CheckpointError

    if fmt not in FORMATS:
        print(f"rdn export: unknown format {fmt!r} (known: {', '.join(FORMATS)})", file=sys.stderr)
        return 2
    if (stage is None) == (checkpoint is None):
        print("rdn export: give --stage or --checkpoint (one of them)", file=sys.stderr)
        return 2
    if dtype is not None and fmt != "gguf":
        print("rdn export: --dtype applies to --format gguf only", file=sys.stderr)
        return 2
    root = Path.cwd() if root is None else Path(root)
    tokenizer = root / TOKENIZER if tokenizer_dir is None else Path(tokenizer_dir)
    if fmt == "gguf":
        from rdn.inference.gguf import GGUFError, export_gguf

        try:
            ckpt = resolve_checkpoint(stage, checkpoint, root)
            summary = export_gguf(ckpt, Path(out), tokenizer, dtype or "f32")
        except (ExportError, CheckpointError, GGUFError) as e:
            print(f"rdn export: {e}", file=sys.stderr)
            return 1
        print(f"rdn export: {ckpt.path} (step {ckpt.step}) -> {out}: {summary['bytes']:,} bytes, "
              f"{summary['tensors']} tensors, {summary['parameters']:,} parameters ({summary['dtype']}), "
              "tokenizer included")
        return 0
    try:
        ckpt = resolve_checkpoint(stage, checkpoint, root)
        info = export_ternary(ckpt, Path(out), tokenizer)
    except (ExportError, CheckpointError) as e:
        print(f"rdn export: {e}", file=sys.stderr)
        return 1
    s = info["sizes"]
    n = len(info["ternary"]["matrices"])
    print(f"rdn export: {ckpt.path} (step {ckpt.step}) -> {out}: {n} ternary matrices, {s['ternary_weights']:,} "
          f"weights in {s['ternary_packed_bytes']:,} bytes (fp32: {s['ternary_fp32_bytes']:,}, "
          f"1/{1 / s['ternary_ratio']:.2f}); full precision {s['full_precision_bytes']:,} bytes; "
          f"{WEIGHTS} {s['file_bytes']:,} bytes" + ("" if info["tokenizer"] else "; no tokenizer copied"))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    return export_main(args.out, args.format, stage=args.stage, checkpoint=args.checkpoint,
                       tokenizer_dir=args.tokenizer, dtype=args.dtype)


def register(sub) -> None:
    """Add ``rdn export`` to rdn.cli.main's subparsers."""
    e = sub.add_parser("export", help="pack a checkpoint for deployment (ternary: 2 bits per weight; "
                                      "gguf: one file with weights, tokenizer and config)")
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--stage", choices=STAGES, help="the newest checkpoint of this stage")
    where.add_argument("--checkpoint", type=Path, help="a step_NNNNNN folder, or a folder of them (newest)")
    e.add_argument("--format", required=True, choices=FORMATS,
                   help="ternary: BitNet b1.58 packed weights (a folder); gguf: one .gguf file for "
                        "rdn.inference.gguf.load_gguf (llama.cpp cannot run it)")
    e.add_argument("--tokenizer", type=Path, help="tokenizer folder to include (default: artifacts/tokenizer; "
                                                  "gguf requires it)")
    e.add_argument("--dtype", choices=GGUF_DTYPES, default=None,
                   help="gguf: how floating matrices are stored (default f32: bit-exact; vectors stay f32)")
    e.add_argument("out", type=Path, metavar="OUT", help="ternary: folder to write; gguf: file to write "
                                                         "(e.g. model.gguf); either replaced atomically")
    e.set_defaults(func=_cmd_export)
