"""``rdn export --format gguf`` and :func:`rdn.inference.gguf.load_gguf`: a tiny checkpoint written as
one GGUF file reloads, without the checkpoint or the tokenizer folder, to a model whose float32
logits equal the checkpoint model's bit for bit (RDN with coordinates, plain GPT, and every variant
at once), a tokenizer that encodes and decodes like the original, and metadata that the ``gguf``
package's own reader sees as written.

Oracles: the checkpoint model built by :func:`rdn.checkpoint.model_from_checkpoint`, the tokenizer
loaded from its folder, and the raw fields of ``gguf.GGUFReader`` (not the loader under test)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_python, torch_threads

import gguf  # noqa: E402  (a declared dependency: pyproject.toml)

SAMPLE = ("def f(xs):\n    return [x * (x + 1) for x in xs if {'a': x}]  # π ≈ 3.14\n\n"
          "class A(B):\n\tpass\n")
PAIRS = ["()", "[]", "{}"]


def _tokenizer(tok_dir):
    from rdn.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


def _checkpoint(directory: Path, tok, *, step: int = 1, **overrides):
    """A tiny GPT with every parameter perturbed (init leaves c_proj, ve_gate and the coordinate
    tables at zero), saved with the project's checkpoint code; (path, config)."""
    from rdn.checkpoint import save_checkpoint
    from rdn.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(**{**dict(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                                 n_embd=64, head_dim=32, n_coord_dim=2, vocab_pad_multiple=64,
                                 bos_token_id=tok.bos_id), **overrides})
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_sha256": tok.hash, "stage": "sft",
            "coords": {"n_dim": 2, "bracket_pairs": PAIRS}}
    return save_checkpoint(directory, step, model, None, {}, None, meta), config


def _batch(tok) -> torch.Tensor:
    ids = tok.encode(SAMPLE, prepend=tok.bos_id)[:32]
    assert len(ids) == 32
    return torch.stack([torch.tensor(ids), torch.tensor(ids[::-1])])


VARIANTS = {
    "rdn": {},
    "gpt": {"use_coordinates": False},
    "variants": {"n_layer": 3, "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "first_dense_layers": 1},
                 "mhc": {"streams": 2}, "mtp": {"num_future": 1}, "ternary": {"enabled": True},
                 "window_pattern": "SL"},
}


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_reloaded_model_has_bitwise_equal_logits(kind, tiny_artifacts, tmp_path):
    """Pinned to one intra-op thread: bitwise equality needs both models' reductions split alike."""
    from safetensors.torch import load_file

    from rdn.checkpoint import coordinate_calculator, latest_checkpoint, model_from_checkpoint
    from rdn.inference.gguf import export_gguf, load_gguf

    tok = _tokenizer(tiny_artifacts[1])
    ckpt_dir = tmp_path / "ckpts"
    path, config = _checkpoint(ckpt_dir, tok, **VARIANTS[kind])
    ckpt = latest_checkpoint(ckpt_dir)
    ref, _ = model_from_checkpoint(ckpt, torch.device("cpu"))
    ref.eval()
    ref_calc = coordinate_calculator(ckpt, tok)
    out = tmp_path / "model.gguf"
    summary = export_gguf(ckpt, out, tiny_artifacts[1])
    state = load_file(str(path / "model.safetensors"))
    assert summary["bytes"] == out.stat().st_size and summary["tensors"] == len(state)
    assert summary["parameters"] == sum(v.numel() for v in state.values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    shutil.move(ckpt_dir, tmp_path / "moved")  # the loader needs neither the checkpoint nor the tokenizer folder
    model, tok2, calc, meta = load_gguf(out, "cpu")
    assert not model.training and meta["model_config"] == ckpt.meta["model_config"]
    assert meta["coords"] == {"n_dim": 2, "bracket_pairs": PAIRS} and meta["source"]["step"] == 1
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(loaded[k].dtype == state[k].dtype and torch.equal(loaded[k], state[k]) for k in state)

    idx = _batch(tok)
    if config.use_coordinates:
        coords = ref_calc(idx)
        assert calc is not None and torch.equal(calc(idx), coords) and coords.abs().sum() > 0
    else:
        coords = None
        assert calc is None and ref_calc is None
    with torch_threads(1), torch.no_grad():
        a, b = ref(idx, coords=coords), model(idx, coords=coords)
        assert a.dtype == b.dtype == torch.float32 and a.shape == (2, 32, config.padded_vocab_size)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        if config.use_coordinates:  # the coordinates matter: without them the logits differ
            assert not torch.equal(ref(idx, coords=torch.zeros_like(coords)), a)


@pytest.mark.parametrize("dtype, atol", [("f16", 0.02), ("bf16", 0.1)])
def test_half_precision_storage(dtype, atol, tiny_artifacts, tmp_path):
    """Matrices stored as F16/BF16 come back as the checkpoint's values rounded to that type (then
    widened to float32); vectors stay F32; logits agree within ``atol`` (softcap 15: logits in
    [-15, 15]); the file is smaller."""
    from safetensors.torch import load_file

    from rdn.checkpoint import coordinate_calculator, latest_checkpoint, model_from_checkpoint
    from rdn.inference.gguf import export_gguf, load_gguf

    tok = _tokenizer(tiny_artifacts[1])
    path, _ = _checkpoint(tmp_path / "ckpts", tok)
    ckpt = latest_checkpoint(tmp_path / "ckpts")
    full = export_gguf(ckpt, tmp_path / "f32.gguf", tiny_artifacts[1])
    half = export_gguf(ckpt, tmp_path / f"{dtype}.gguf", tiny_artifacts[1], dtype=dtype)
    assert half["bytes"] < 0.6 * full["bytes"]
    want = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / f"{dtype}.gguf").tensors}
    state = load_file(str(path / "model.safetensors"))
    assert all(types[k] == (want if v.dim() >= 2 else gguf.GGMLQuantizationType.F32) for k, v in state.items())

    model, _, calc, meta = load_gguf(tmp_path / f"{dtype}.gguf")
    assert meta["file_type"] == {"f16": 1, "bf16": 32}[dtype]
    rounded = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, state[k].to(rounded).float() if state[k].dim() >= 2 else state[k]), k
    ref, _ = model_from_checkpoint(ckpt, torch.device("cpu"))
    idx = _batch(tok)
    coords = coordinate_calculator(ckpt, tok)(idx)
    with torch.no_grad():
        a, b = ref.eval()(idx, coords=coords), model(idx, coords=calc(idx))
    torch.testing.assert_close(b, a, atol=atol, rtol=0)
    assert not torch.equal(a, b)


def test_tokenizer_round_trip(tiny_artifacts, tmp_path):
    from rdn.checkpoint import latest_checkpoint
    from rdn.inference.gguf import export_gguf, load_gguf

    tok = _tokenizer(tiny_artifacts[1])
    _checkpoint(tmp_path / "ckpts", tok)
    export_gguf(latest_checkpoint(tmp_path / "ckpts"), tmp_path / "m.gguf", tiny_artifacts[1])
    _, tok2, _, meta = load_gguf(tmp_path / "m.gguf")
    assert tok2.hash == tok.hash == meta["tokenizer_sha256"]
    assert tok2.special_ids == tok.special_ids and len(tok.special_ids) == 9
    assert tok2.bos_id == tok.bos_id and tok2.vocab_size == tok.vocab_size
    texts = [SAMPLE, "", "   \n\n", "<|bos|> is text here", "naïve café — ünïcödé 日本語 🙂", "x" * 300]
    for text in texts:
        ids = tok.encode(text)
        assert tok2.encode(text) == ids == tok2.encode_reference(text)
        assert tok2.decode(ids) == text
    assert tok2.encode(SAMPLE, prepend="<|bos|>", append="<|assistant_end|>") == \
        tok.encode(SAMPLE, prepend="<|bos|>", append="<|assistant_end|>")
    assert tok2.token_bytes() == tok.token_bytes()
    assert all(tok2.id_bytes(i) == tok.id_bytes(i) for i in range(tok.vocab_size))


def test_metadata_read_back_with_gguf_reader(tiny_artifacts, tmp_path):
    """The file as any GGUF reader sees it (the ``gguf`` package's reader, fields read directly)."""
    from safetensors.torch import load_file

    from rdn.checkpoint import latest_checkpoint
    from rdn.inference.gguf import export_gguf

    tok = _tokenizer(tiny_artifacts[1])
    path, config = _checkpoint(tmp_path / "ckpts", tok, step=7)
    export_gguf(latest_checkpoint(tmp_path / "ckpts"), tmp_path / "m.gguf", tiny_artifacts[1])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")

    def kv(key):
        return reader.fields[key].contents()

    assert kv("general.architecture") == "rdn" and kv("general.type") == "model"
    assert kv("general.file_type") == 0 and kv("rdn.format_version") == 1
    assert kv("rdn.context_length") == 32 and kv("rdn.embedding_length") == 64 and kv("rdn.block_count") == 2
    assert kv("rdn.attention.head_count") == 2 and kv("rdn.attention.head_count_kv") == 1
    assert kv("rdn.attention.key_length") == kv("rdn.rope.dimension_count") == 32
    assert kv("rdn.vocab_size") == tok.vocab_size and kv("rdn.use_coordinates") is True
    assert json.loads(kv("rdn.config_json")) == dataclasses.asdict(config)
    assert json.loads(kv("rdn.coords_json")) == {"n_dim": 2, "bracket_pairs": PAIRS}
    assert kv("rdn.coords.n_dim") == 2 and kv("rdn.coords.bracket_pairs") == PAIRS
    assert kv("rdn.tokenizer_sha256") == tok.hash
    source = json.loads(kv("rdn.source_json"))
    assert source["step"] == 7 and source["path"] == str(path) and source["stage"] == "sft"

    # the tokenizer, in the standard keys
    assert kv("tokenizer.ggml.model") == "gpt2" and kv("tokenizer.ggml.bos_token_id") == tok.bos_id
    vocab = tok.hf.get_vocab()
    tokens = kv("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and all(vocab[s] == i for i, s in enumerate(tokens))
    types = kv("tokenizer.ggml.token_type")
    assert {i for i, t in enumerate(types) if t == 3} == set(tok.special_ids.values())
    assert all(t in (1, 3) for t in types)
    merges = json.loads(tok.to_json())["model"]["merges"]
    assert kv("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert kv("tokenizer.huggingface.json") == tok.to_json()

    # every checkpoint tensor under its own name, F32, same shape and values
    state = load_file(str(path / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors.keys() == state.keys()
    for name, want in state.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(reversed(t.shape.tolist())) == tuple(want.shape)  # GGUF lists dims innermost first
        assert torch.equal(torch.from_numpy(t.data.copy()), want)
    assert "cos" not in tensors and "coord_offsets" not in tensors  # non-persistent buffers are recomputed


def test_cli_export_gguf(tiny_artifacts, tmp_path):
    """``python -m rdn.cli.main export`` in a project folder: the file, one line with its size;
    no checkpoint: exit 1 and one line naming the path, nothing written."""
    from rdn.inference.gguf import load_gguf

    tok = _tokenizer(tiny_artifacts[1])
    root = tmp_path / "project"
    path, _ = _checkpoint(root / "artifacts" / "checkpoints" / "sft", tok)
    shutil.copytree(tiny_artifacts[1], root / "artifacts" / "tokenizer")

    r = run_python("-m", "rdn.cli.main", "export", "--stage", "sft", "--format", "gguf", "out/model.gguf",
                   cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    out = root / "out" / "model.gguf"
    size = out.stat().st_size
    assert len(lines) == 1 and str(path) in lines[0] and "out/model.gguf" in lines[0] and f"{size:,} bytes" in lines[0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    model, tok2, calc, meta = load_gguf(out)
    assert tok2.hash == tok.hash and calc is not None and meta["source"]["path"] == str(path)

    # bad input: one line naming the path, exit 1, nothing written
    missing = tmp_path / "none"
    r = run_python("-m", "rdn.cli.main", "export", "--checkpoint", str(missing), "--format", "gguf", "bad.gguf",
                   cwd=root, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and str(missing) in r.stderr
    assert not (root / "bad.gguf").exists()


def test_cli_in_process(tiny_artifacts, tmp_path, monkeypatch, capsys):
    """The same command through rdn.cli.main.main (no interpreter start): --checkpoint with
    --dtype f16, and a stage with no checkpoint."""
    from rdn.cli.export import GGUF_DTYPES
    from rdn.cli.main import main
    from rdn.inference.gguf import DTYPES

    assert GGUF_DTYPES == DTYPES  # the CLI's copy (it does not import torch to build its parser)
    tok = _tokenizer(tiny_artifacts[1])
    root = tmp_path / "project"
    path, _ = _checkpoint(root / "artifacts" / "checkpoints" / "sft", tok)
    shutil.copytree(tiny_artifacts[1], root / "artifacts" / "tokenizer")
    monkeypatch.chdir(root)
    assert main(["export", "--checkpoint", str(path), "--format", "gguf", "full.gguf"]) == 0
    assert main(["export", "--checkpoint", str(path.parent), "--format", "gguf", "--dtype", "f16", "half.gguf"]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 2 and "(f32)" in said[0] and "(f16)" in said[1] and all(str(path) in s for s in said)
    assert (root / "half.gguf").stat().st_size < 0.6 * (root / "full.gguf").stat().st_size
    assert f"{(root / 'half.gguf').stat().st_size:,} bytes" in said[1]

    assert main(["export", "--stage", "base", "--format", "gguf", "bad.gguf"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(root / "artifacts" / "checkpoints" / "base") in err
    assert not (root / "bad.gguf").exists()


def test_export_refusals_and_atomic_write(tiny_artifacts, tmp_path, monkeypatch, capsys):
    from rdn.checkpoint import latest_checkpoint
    from rdn.cli.export import export_main
    from rdn.inference.gguf import GGUFError, export_gguf, load_gguf

    tok = _tokenizer(tiny_artifacts[1])
    path, _ = _checkpoint(tmp_path / "ckpts", tok)
    ckpt = latest_checkpoint(tmp_path / "ckpts")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"old")

    # a tokenizer of another hash, no tokenizer, an output folder, --dtype for ternary
    other = dataclasses.replace(ckpt, meta={**ckpt.meta, "tokenizer_sha256": "0" * 64})
    with pytest.raises(GGUFError, match="different tokenizer"):
        export_gguf(other, out, tiny_artifacts[1])
    with pytest.raises(GGUFError, match="tokenizer.json: missing"):
        export_gguf(ckpt, out, tmp_path / "no-tokenizer")
    with pytest.raises(GGUFError, match="is a folder"):
        export_gguf(ckpt, out.parent, tiny_artifacts[1])
    assert export_main(out, "gguf", checkpoint=path, root=tmp_path) == 1  # root has no artifacts/tokenizer
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tokenizer.json: missing" in err
    assert export_main(tmp_path / "t", "ternary", checkpoint=path, root=tmp_path, dtype="f16") == 2

    # a write that fails half way leaves the old file and no temp file
    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(ckpt, out, tiny_artifacts[1])
    assert out.read_bytes() == b"old" and sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
    monkeypatch.undo()

    # the loader refuses what is not its file
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        load_gguf(out)
    with pytest.raises(GGUFError, match="missing"):
        load_gguf(tmp_path / "nothing.gguf")
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="general.architecture is 'llama'"):
        load_gguf(tmp_path / "llama.gguf")


def test_tensor_storage_round_trip_every_dtype(tmp_path):
    """What no current model holds but a state dict may: 0-D, integer, bool, bf16, f16, f64 and
    non-contiguous tensors come back with their dtype, shape and values."""
    from rdn.inference.gguf import GGUFError, _from_storage, _to_storage

    torch.manual_seed(0)
    tensors = {
        "scalar": torch.tensor(1.25), "flags": torch.tensor([True, False, True]),
        "bytes": torch.tensor([[0, 7], [200, 255]], dtype=torch.uint8), "ids": torch.arange(-3, 3),
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "half": torch.randn(4).half(), "f64": torch.randn(2, 2).double(),
        "view": torch.randn(5, 3).t(), "moe": torch.randn(2, 3, 4),
    }
    for dtype in ("f32", "bf16"):
        w = gguf.GGUFWriter(tmp_path / f"{dtype}.gguf", "rdn")
        for name, t in tensors.items():
            array, raw = _to_storage(name, t, dtype, tmp_path, gguf)
            w.add_tensor(name, array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        for t in gguf.GGUFReader(tmp_path / f"{dtype}.gguf").tensors:
            want = tensors[t.name]
            rec = {"dtype": str(want.dtype).removeprefix("torch."), "shape": list(want.shape)}
            got = _from_storage(t, rec, gguf, tmp_path)
            assert got.dtype == want.dtype and got.shape == want.shape, t.name
            exact = dtype == "f32" or want.dim() < 2 or not want.is_floating_point() or want.dtype in (
                torch.bfloat16, torch.float64)
            assert torch.equal(got, want if exact else want.to(torch.bfloat16).to(want.dtype)), (dtype, t.name)
    with pytest.raises(GGUFError, match="longer than"):
        _to_storage("x" * 64, torch.zeros(1), "f32", tmp_path, gguf)
    with pytest.raises(GGUFError, match="cannot hold"):
        _to_storage("c", torch.zeros(2, dtype=torch.complex64), "f32", tmp_path, gguf)
    with pytest.raises(GGUFError, match="overflows float16"):
        _to_storage("big", torch.full((2, 2), 1e6), "f16", tmp_path, gguf)
