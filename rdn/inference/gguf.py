"""A checkpoint as one GGUF file, and a pure-torch loader for it.

``rdn export --format gguf FILE`` (:func:`export_gguf`) writes a single file, with the
``gguf`` package's writer, that holds everything needed to run the model again: the weights,
the tokenizer, the model config and the coordinate settings. :func:`load_gguf` reads it with
``gguf.GGUFReader`` and rebuilds the :class:`~rdn.model.GPT`, the
:class:`~rdn.tokenizer.Tokenizer` and the :class:`~rdn.coords.CoordinateCalculator`; neither the
checkpoint folder nor the tokenizer folder is needed. Stored as F32 (the default), the weights are
the checkpoint's bit for bit, so the rebuilt model's float32 logits equal the checkpoint model's.

llama.cpp and other GGUF runtimes cannot run the file: ``rdn`` is not one of their architectures
(the coordinate embeddings, value embeddings, per-layer residual scalars and the variants have no
counterpart there). It is for archiving and moving a model, read back by this loader.

Key/value metadata (``ARCH`` = ``rdn``):

* ``general.architecture`` = ``rdn``; ``general.type`` = ``model``; ``general.name``;
  ``general.file_type`` (0 all F32, 1 mostly F16, 32 mostly BF16);
* ``rdn.format_version`` (uint32, :data:`FORMAT_VERSION`): what this loader reads;
* ``rdn.config_json`` -- the checkpoint's ``model_config`` as JSON: what the loader builds
  ``GPTConfig`` from (variants included: MoE, mHC, MTP, ternary);
* for other readers, the usual hyperparameter keys, copied from the config:
  ``rdn.context_length`` (sequence_len), ``rdn.embedding_length`` (n_embd), ``rdn.block_count``
  (n_layer), ``rdn.attention.head_count``, ``rdn.attention.head_count_kv``,
  ``rdn.attention.key_length`` / ``rdn.attention.value_length`` / ``rdn.rope.dimension_count``
  (head_dim), ``rdn.vocab_size`` (the tokenizer's ids; the embedding tables are padded to
  ``vocab_pad_multiple`` rows), ``rdn.use_coordinates`` (bool);
* ``rdn.coords_json`` -- the checkpoint's ``coords`` ``{"n_dim", "bracket_pairs"}`` as JSON
  (``null`` when it recorded none), also as ``rdn.coords.n_dim`` (uint32) and
  ``rdn.coords.bracket_pairs`` (string array) when present and non-empty;
* ``rdn.tokenizer_sha256`` -- sha256 of the stored ``tokenizer.huggingface.json`` text (the
  tokenizer's :attr:`~rdn.tokenizer.Tokenizer.hash`, checked against the checkpoint's record at
  export and against the stored text at load);
* ``rdn.tensors_json`` -- ``{name: {"dtype", "shape"}}``: each tensor's dtype and shape in the
  checkpoint, restored at load (0-D tensors are stored with shape ``[1]``, integer and bool
  tensors as the GGUF integer type that holds them);
* ``rdn.source_json`` -- the checkpoint's path, step, stage, creation time and git sha;
* the tokenizer: ``tokenizer.ggml.model`` = ``gpt2`` (byte-level BPE), ``tokenizer.ggml.tokens``
  (every id's string in the byte-level alphabet, special tokens as themselves),
  ``tokenizer.ggml.token_type`` (1 normal, 3 control = special), ``tokenizer.ggml.merges``
  (``"a b"``, in merge order), ``tokenizer.ggml.bos_token_id``, and
  ``tokenizer.huggingface.json`` -- the full ``tokenizer.json`` text, which the loader rebuilds
  the tokenizer from (split pattern, merges and special tokens included).

Tensors: every tensor of the checkpoint's ``model.safetensors`` under its own state-dict name
(``wte.weight``, ``blocks.0.attn.c_q.weight``, ``coord_embed.weight``, ``blocks.1.mlp.w_fc``...);
no renaming, no fused or split matrices. Shapes are PyTorch's (GGUF lists dimensions innermost
first; ``gguf`` reverses them on both sides). Floating tensors are F32; ``dtype="f16"`` or
``"bf16"`` stores floating tensors of two or more dimensions as F16 or BF16 (the scalars and
vectors stay F32, as llama.cpp's converters do), and the loader casts them back to the
checkpoint's dtype. The rotary tables and the other non-persistent buffers are not stored (the
loader recomputes them, as :func:`rdn.checkpoint.model_from_checkpoint` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdn.io import atomic_file

ARCH = "rdn"
FORMAT_VERSION = 1
DTYPES = ("f32", "f16", "bf16")
WEIGHTS = "model.safetensors"
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL
MAX_DIMS = 4         # GGML_MAX_DIMS

KEY_VERSION = f"{ARCH}.format_version"
KEY_CONFIG = f"{ARCH}.config_json"
KEY_COORDS = f"{ARCH}.coords_json"
KEY_TOKENIZER_SHA = f"{ARCH}.tokenizer_sha256"
KEY_TENSORS = f"{ARCH}.tensors_json"
KEY_SOURCE = f"{ARCH}.source_json"
KEY_HF_JSON = "tokenizer.huggingface.json"

# integer/bool dtypes: the GGUF integer type that holds every value exactly
_INT_STORAGE = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
                torch.uint8: np.int16, torch.bool: np.int8}


class GGUFError(ValueError):
    """A checkpoint that cannot be written as GGUF, or a file this loader cannot read; one line."""


# --------------------------------------------------------------------------- export

def export_gguf(ckpt, out_path: str | Path, tokenizer_dir: str | Path | None, dtype: str = "f32") -> dict[str, Any]:
    """Write ``ckpt`` (a :class:`~rdn.checkpoint.Checkpoint`) and the tokenizer in ``tokenizer_dir``
    to the GGUF file ``out_path`` (module docstring), atomically: a temp file beside it, then a
    rename. Returns a summary: path, bytes, tensors, parameters, dtype, source."""
    gguf = _gguf()
    out = Path(out_path)
    if dtype not in DTYPES:
        raise GGUFError(f"dtype {dtype!r}: not one of {', '.join(DTYPES)}")
    if out.is_dir():
        raise GGUFError(f"{out}: is a folder; --format gguf writes one file (e.g. {out / 'model.gguf'})")
    model_config = ckpt.meta.get("model_config")
    config = _config(model_config, f"{ckpt.path}/meta.json")
    tok, tok_json = _tokenizer_for(ckpt, tokenizer_dir)
    state = _checkpoint_state(ckpt, config)

    tensors: dict[str, tuple[np.ndarray, Any]] = {}   # name -> (array, raw GGML type or None)
    records: dict[str, dict[str, Any]] = {}
    n_params = 0
    for name, t in state.items():
        records[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        tensors[name] = _to_storage(name, t, dtype, ckpt.path, gguf)
        n_params += t.numel()

    coords = ckpt.meta.get("coords")
    source = {"path": str(ckpt.path), "step": ckpt.step, "stage": ckpt.meta.get("stage"),
              "created_utc": ckpt.meta.get("created_utc"), "git_sha": ckpt.meta.get("git_sha"),
              "tokenizer_sha256": ckpt.meta.get("tokenizer_sha256")}
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]

    with atomic_file(out) as tmp:
        with _quiet_gguf():
            w = gguf.GGUFWriter(tmp, ARCH)
            w.add_type(gguf.GGUFType.MODEL)
            w.add_name(f"rdn {ckpt.meta.get('stage') or ckpt.path.parent.name} step {ckpt.step}")
            w.add_file_type(int(file_type))
            w.add_uint32(KEY_VERSION, FORMAT_VERSION)
            w.add_string(KEY_CONFIG, json.dumps(model_config, sort_keys=True))
            w.add_context_length(config.sequence_len)
            w.add_embedding_length(config.n_embd)
            w.add_block_count(config.n_layer)
            w.add_head_count(config.n_head)
            w.add_head_count_kv(config.n_kv_head)
            w.add_key_length(config.head_dim)
            w.add_value_length(config.head_dim)
            w.add_rope_dimension_count(config.head_dim)
            w.add_vocab_size(config.vocab_size)
            w.add_bool(f"{ARCH}.use_coordinates", bool(config.use_coordinates))
            w.add_string(KEY_COORDS, json.dumps(coords))
            if isinstance(coords, dict):
                if isinstance(coords.get("n_dim"), int):
                    w.add_uint32(f"{ARCH}.coords.n_dim", coords["n_dim"])
                if coords.get("bracket_pairs"):
                    w.add_array(f"{ARCH}.coords.bracket_pairs", [str(p) for p in coords["bracket_pairs"]])
            w.add_string(KEY_TOKENIZER_SHA, tok.hash)
            w.add_string(KEY_TENSORS, json.dumps(records))
            w.add_string(KEY_SOURCE, json.dumps(source))
            _add_tokenizer(w, tok, tok_json, gguf)
            for name, (array, raw) in tensors.items():
                w.add_tensor(name, array, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(tensors), "parameters": n_params,
            "dtype": dtype, "tokenizer_sha256": tok.hash, "source": source}


def _checkpoint_state(ckpt, config) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against the state dict the config builds."""
    from safetensors.torch import load_file

    from rdn.model import GPT

    path = ckpt.path / WEIGHTS
    if not path.is_file():
        raise GGUFError(f"{path}: missing")
    state = load_file(str(path), device="cpu")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or wrong:
        raise GGUFError(f"{path} does not fit its model_config: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, other shapes {wrong[:5]}")
    return state


def _to_storage(name: str, t: torch.Tensor, dtype: str, where: Path, gguf) -> tuple[np.ndarray, Any]:
    """``t`` as the numpy array GGUF stores, and the raw GGML type (None: from the array's dtype)."""
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise GGUFError(f"{where}/{WEIGHTS}: tensor name {name!r} is longer than GGUF's {MAX_NAME_BYTES} bytes")
    if t.dim() > MAX_DIMS:
        raise GGUFError(f"{where}/{WEIGHTS}: tensor {name} has {t.dim()} dimensions; GGUF holds at most {MAX_DIMS}")
    t = t.detach().cpu().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dtype in _INT_STORAGE:
        return t.to(torch.int64).numpy().astype(_INT_STORAGE[t.dtype]), None
    if not t.is_floating_point():
        raise GGUFError(f"{where}/{WEIGHTS}: tensor {name} has dtype {t.dtype}, which GGUF cannot hold")
    if t.dtype == torch.float64:
        return t.numpy(), None
    if t.dim() >= 2 and dtype == "bf16":
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)  # [..., 2 * last] bytes
        return raw, gguf.GGMLQuantizationType.BF16
    if (t.dim() >= 2 and dtype == "f16") or t.dtype == torch.float16:
        half = t.to(torch.float16)
        if bool((torch.isinf(half) & ~torch.isinf(t)).any()):
            raise GGUFError(f"{where}/{WEIGHTS}: tensor {name} overflows float16; export with --dtype f32 or bf16")
        return half.numpy(), None
    return t.to(torch.float32).numpy(), None   # float32, and bfloat16 exactly widened


def _tokenizer_for(ckpt, tokenizer_dir):
    """The tokenizer in ``tokenizer_dir`` and its JSON text; refuses one of another hash than the
    checkpoint recorded."""
    if tokenizer_dir is None:
        raise GGUFError("no tokenizer folder given; a GGUF export holds the tokenizer (pass --tokenizer)")
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{path}: missing; a GGUF export holds the tokenizer (pass --tokenizer)")
    from rdn.inference.load import EngineLoadError, checkpoint_tokenizer

    try:
        tok = checkpoint_tokenizer(ckpt, tokenizer_dir)
    except EngineLoadError as e:
        raise GGUFError(f"{e}; pass --tokenizer") from None
    return tok, tok.to_json()


def _add_tokenizer(w, tok, tok_json: str, gguf) -> None:
    vocab = tok.hf.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise GGUFError("tokenizer ids are not 0..n-1 without gaps; GGUF's token list cannot hold them")
    special = set(tok.special_ids.values())
    merges = json.loads(tok_json)["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([s for s, _ in by_id])
    w.add_token_types([int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for _, i in by_id])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_id)
    w.add_string(KEY_HF_JSON, tok_json)


# --------------------------------------------------------------------------- loading

def load_gguf(path: str | Path, device="cpu"):
    """``(model, tokenizer, coords, meta)`` from a file :func:`export_gguf` wrote.

    ``model``: the :class:`~rdn.model.GPT` on ``device``, in eval mode (built on the meta device,
    non-persistent buffers initialised, every stored tensor loaded, strict); ``tokenizer``: a
    :class:`~rdn.tokenizer.Tokenizer` rebuilt from the stored ``tokenizer.json``; ``coords``: the
    :class:`~rdn.coords.CoordinateCalculator` of an RDN model (None for plain GPT); ``meta``:
    ``model_config``, ``coords``, ``tokenizer_sha256``, ``source``, ``file_type``, ``format_version``."""
    gguf = _gguf()
    from tokenizers import Tokenizer as HFTokenizer

    from rdn.coords import CoordinateCalculator
    from rdn.model import GPT
    from rdn.tokenizer import Tokenizer, TokenizerError

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: missing")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None
    kv = {name: field for name, field in reader.fields.items()}

    def get(key: str, required: bool = True):
        field = kv.get(key)
        if field is None:
            if required:
                raise GGUFError(f"{path}: no {key} key; not an `rdn export --format gguf` file")
            return None
        return field.contents()

    arch = get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; this loader reads {ARCH!r}")
    version = get(KEY_VERSION)
    if version != FORMAT_VERSION:
        raise GGUFError(f"{path}: {KEY_VERSION} is {version!r}; this code reads {FORMAT_VERSION}")
    model_config = _json(get(KEY_CONFIG), path, KEY_CONFIG)
    config = _config(model_config, f"{path} ({KEY_CONFIG})")
    coords_meta = _json(get(KEY_COORDS), path, KEY_COORDS)
    records = _json(get(KEY_TENSORS), path, KEY_TENSORS)
    source = _json(get(KEY_SOURCE, required=False) or "null", path, KEY_SOURCE)

    tok_json = get(KEY_HF_JSON)
    sha = get(KEY_TOKENIZER_SHA)
    if hashlib.sha256(tok_json.encode("utf-8")).hexdigest() != sha:
        raise GGUFError(f"{path}: {KEY_HF_JSON} does not match {KEY_TOKENIZER_SHA} (file damaged?)")
    try:
        tokenizer = Tokenizer(HFTokenizer.from_str(tok_json))
    except TokenizerError as e:
        raise GGUFError(f"{path} ({KEY_HF_JSON}): {e}") from None
    except Exception as e:  # the Rust side raises a plain Exception for bad JSON
        raise GGUFError(f"{path}: {KEY_HF_JSON} is not a valid tokenizer ({e})") from None

    device = torch.device(device)
    state = {}
    for t in reader.tensors:
        rec = records.get(t.name)
        if rec is None:
            raise GGUFError(f"{path}: tensor {t.name} has no entry in {KEY_TENSORS}")
        state[t.name] = _from_storage(t, rec, gguf, path).to(device)
    del reader

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GGUFError(f"{path} does not fit its {KEY_CONFIG}: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")

    calc = None
    if config.use_coordinates:
        if not isinstance(coords_meta, dict) or "n_dim" not in coords_meta or "bracket_pairs" not in coords_meta:
            raise GGUFError(f"{path}: an RDN model needs n_dim and bracket_pairs in {KEY_COORDS} (got {coords_meta!r})")
        calc = CoordinateCalculator.from_tokenizer(tokenizer, coords_meta["n_dim"], coords_meta["bracket_pairs"])
    file_type = kv.get("general.file_type")
    meta = {"format_version": version, "model_config": model_config, "coords": coords_meta,
            "tokenizer_sha256": sha, "source": source,
            "file_type": None if file_type is None else file_type.contents()}
    return model.eval(), tokenizer, calc, meta


def _from_storage(t, rec: dict[str, Any], gguf, path: Path) -> torch.Tensor:
    """A stored tensor back as the checkpoint's dtype and shape (a copy: the reader's memmap is dropped)."""
    try:
        want = getattr(torch, rec["dtype"])
        shape = tuple(int(n) for n in rec["shape"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise GGUFError(f"{path}: tensor {t.name} has a bad {KEY_TENSORS} entry {rec!r}") from None
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        x = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(-1).view(np.int16)).view(torch.bfloat16)
    elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                           gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
                           gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
                           gguf.GGMLQuantizationType.I64):
        x = torch.from_numpy(np.array(t.data))
    else:
        raise GGUFError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}; this loader reads "
                        "F32, F16, BF16, F64 and integer tensors only")
    if x.numel() != int(np.prod(shape, dtype=np.int64)):
        raise GGUFError(f"{path}: tensor {t.name} holds {x.numel()} values, {KEY_TENSORS} says shape {list(shape)}")
    return x.reshape(shape).to(want)


# --------------------------------------------------------------------------- helpers

def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("the `gguf` package is not installed (pip install gguf)") from None
    return gguf


def _config(model_config, where: str):
    from rdn.model import GPTConfig

    if not isinstance(model_config, dict):
        raise GGUFError(f"{where}: no model_config")
    try:
        return GPTConfig(**model_config)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{where}: no usable model_config ({e})") from None


def _json(text, path: Path, key: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"{path}: {key} is not JSON ({e})") from None


@contextlib.contextmanager
def _quiet_gguf():
    """The gguf writer logs each file it opens at INFO; the CLI prints its own one line."""
    logger = logging.getLogger("gguf")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


