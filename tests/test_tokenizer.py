"""Tests for ``rdn.tokenizer`` (byte-level BPE: HF trainer, tiktoken encoder).

One real tokenizer is trained once per module (2048 ids on ~3 M characters of the
interpreter's standard library) and everything below is checked against it:

* round trip ``decode(encode(s)) == s`` on random unicode (hypothesis) and on a
  table of hard cases (emoji ZWJ sequences, RTL scripts, combining marks, control
  characters, a 200 000-character line, long runs of spaces/newlines/digits...);
* the fast encoder (tiktoken) gives exactly the ids of the reference (HF
  tokenizers) on every val document and on random text;
* digits are split in groups of at most two;
* special tokens come only from the explicit API, never from text;
* the artifacts on disk: ``token_bytes.json`` against byte lengths rebuilt from
  ``tokenizer.json`` with a GPT-2 byte table written out here (an oracle that shares
  no code with ``rdn``), the 256 byte tokens, and ``meta.json``'s numbers recomputed;
* training writes atomically and loading reports missing/corrupt files by path;
* a 2048-id BPE compresses Python source to more than 2.5 bytes per token.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rdn.tokenizer.bpe as bpe
from rdn.config import SPECIAL_TOKENS, DataConfig, TokenizerConfig
from rdn.data import build_corpus, iter_documents
from rdn.tokenizer import Tokenizer, TokenizerError, train_tokenizer

VOCAB = 2048
FILES = ("tokenizer.json", "token_bytes.json", "meta.json")


# --------------------------------------------------------------------------- fixture

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A real corpus (stdlib, no tests, 6 MB) and a 2048-id tokenizer trained on it."""
    root = tmp_path_factory.mktemp("tok")
    data = root / "data"
    build_corpus(DataConfig(source="stdlib", include_tests=False, max_total_bytes=6_000_000),
                 out_dir=data, seed=0, root=root)
    val_docs = list(iter_documents(data, "val"))
    out = root / "tokenizer"
    meta = train_tokenizer(TokenizerConfig(vocab_size=VOCAB, max_chars=3_000_000, doc_cap=10_000),
                           iter_documents(data, "train"), val_docs, out)
    return {"root": root, "data": data, "out": out, "meta": meta, "val_docs": val_docs,
            "tok": Tokenizer.load(out)}


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return trained["tok"]


# --------------------------------------------------------------------------- 1+2. round trip, tiktoken == HF

HARD_CASES = {
    "empty": "",
    "family_zwj": "👩‍👩‍👧‍👦",
    "skin_tone": "👍🏽",
    "emoji_mix": "ok 👍🏽👩‍👩‍👧‍👦🏳️‍🌈 done🎉\n",
    "flags": "🇫🇷🇯🇵 regional indicators",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트。",
    "arabic": "مرحبا بالعالم، هذا نص عربي ١٢٣٤٥",
    "hebrew": "שלום עולם, זה טקסט בעברית",
    "bidi_marks": "abc\u202edef\u202c \u200f\u200e",
    "combining_e": "e\u0301",
    "zalgo": "Z̤̈͌",
    "combining_only": "\u0301\u0301\u0301",
    "controls": "\x00\x01\t\r\n\x7f\x1b[31m",
    "all_ascii_controls": "".join(map(chr, range(32))) + "\x7f",
    "c1_controls": "".join(map(chr, range(0x80, 0xA0))),
    "long_line": ("def f(x):  return x**2 + 1  # αβγ 日本 " * 6000)[:200_000],
    "long_word": "a" * 200_000,
    "spaces": " " * 5000,
    "newlines": "\n" * 5000,
    "crlf": "\r\n" * 3000,
    "mixed_ws": " \t \n\r\n  \u00a0\u3000\u2028\u2029\x0b\x0c " * 300,
    "trailing_spaces": "x = 1    \n    \n\n   ",
    "digits": "1234567890" * 1000,
    "unicode_digits": "٣٤٥ ߁߂ ൧൨൩ ①②③ ⅷⅸ 𝟘𝟙𝟚",
    "special_text": "<|bos|>",
    "all_specials_text": "".join(SPECIAL_TOKENS) + " <|bos|> <|nope|>",
    "contractions": "I'm you'll we've they're it's He'D SHE'LL ſ's 's'S",
    "bom_and_nonchars": "\ufeff\ufffe\uffff\U0010ffff\U000e0001",
    "private_use": "\ue000\U000f0000\U00100000",
    "replacement_char": "\ufffd\ufffd",
    "escaped_surrogates": "\\ud83d\\ude00 \\udc80 \\x00 \\u0000 \\N{SNOWMAN}",
    "astral": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 𓀀 🂡",
    "python": 'class A:\n    def __init__(self):\n        self.x = {"k": [1, 2, (3, 4)]}\n',
}


@pytest.mark.parametrize("text", HARD_CASES.values(), ids=HARD_CASES.keys())
def test_round_trip_and_reference_on_hard_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tok.encode_reference(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & set(tok.special_ids.values())


# Characters that stress the split pattern: whitespace kinds, \r\n, apostrophes,
# letters, digits, marks, punctuation, emoji, and the case-folding trap of (?i).
TRICKY = list(" \t\n\r\x0b\x0c\u00a0\u2028\u3000'’aZßſKİıé\u0301\u030819٣①_-.,;:()[]{}<>|#\"\\/😀\u200d🏽日한")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_random_unicode_round_trip_and_reference(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tok.encode_reference(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(TRICKY), max_size=60))
def test_tricky_alphabet_round_trip_and_reference(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == tok.encode_reference(text)


def test_tiktoken_matches_hf_on_every_val_document(trained, tok):
    docs = trained["val_docs"]
    assert len(docs) > 0
    fast = tok.encode_batch(docs, num_threads=2)
    mismatched = [i for i, (doc, ids) in enumerate(zip(docs, fast)) if ids != tok.encode_reference(doc)]
    assert mismatched == []
    assert all(tok.decode(ids) == doc for doc, ids in zip(docs, fast))
    assert fast == [tok.encode(d) for d in docs]


# --------------------------------------------------------------------------- 3. digits

@pytest.mark.parametrize("text", ["1234567890123", "x=1234567890123;", " 1234567890123\n", "٣٤٥٦٧"])
def test_digits_split_in_groups_of_at_most_two(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for i in ids:
        piece = tok.decode([i])
        assert sum(ch.isdigit() for ch in piece) <= 2, (i, piece)


def test_thirteen_digits_give_seven_number_tokens(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567890123")]
    assert "".join(pieces) == "1234567890123"
    assert len(pieces) >= 7  # ceil(13 / 2): no piece may hold three digits


# --------------------------------------------------------------------------- 4. special tokens

def test_special_strings_in_text_are_plain_text(tok):
    text = "<|bos|>hello<|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert ids == tok.encode_reference(text)
    assert tok.decode(ids) == text


def test_prepend_append_by_name_and_id(tok):
    ids = tok.encode("x", prepend="<|bos|>")
    assert ids[0] == tok.bos_id
    assert ids[1:] == tok.encode("x")
    end = tok.special_id("<|assistant_end|>")
    ids = tok.encode("x", prepend=tok.bos_id, append="<|assistant_end|>")
    assert ids == [tok.bos_id] + tok.encode("x") + [end]


def test_encode_batch_prepend_append(tok):
    texts = ["a b", "", "<|bos|>", "12345"]
    end = tok.special_id("<|user_end|>")
    out = tok.encode_batch(texts, prepend="<|bos|>", append=end, num_threads=2)
    assert out == [[tok.bos_id] + tok.encode(t) + [end] for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([], prepend="<|bos|>") == []


def test_unknown_special_raises_key_error_naming_it(tok):
    with pytest.raises(KeyError, match=r"<\|nope\|>"):
        tok.special_id("<|nope|>")
    with pytest.raises(KeyError, match=r"<\|nope\|>"):
        tok.encode("x", prepend="<|nope|>")


# An id outside the vocabulary (or a bool, which is an int in Python) must fail at once,
# not later as a decode KeyError or an embedding index error on the device.
@pytest.mark.parametrize("bad", [VOCAB, -1, 10**9, True], ids=["vocab_size", "negative", "huge", "bool"])
def test_prepend_append_reject_invalid_ids(tok, bad):
    with pytest.raises((ValueError, KeyError, IndexError, TypeError)):
        tok.encode("x", prepend=bad)
    with pytest.raises((ValueError, KeyError, IndexError, TypeError)):
        tok.encode_batch(["x"], append=bad)


def test_all_special_tokens_exist_distinct_and_decode(tok):
    assert len(SPECIAL_TOKENS) == 9
    ids = [tok.special_id(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == 9
    assert tok.bos_id == tok.special_id("<|bos|>")
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert 0 <= i < tok.vocab_size
        assert tok.decode([i]) == s


# --------------------------------------------------------------------------- 5. artifacts

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, written out here as an independent oracle."""
    printable = (list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100)))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def test_artifact_files_exist(trained):
    for name in FILES:
        assert (trained["out"] / name).is_file(), name


def test_token_bytes_against_independent_oracle(trained, tok):
    raw = json.loads((trained["out"] / "tokenizer.json").read_text(encoding="utf-8"))
    token_bytes = json.loads((trained["out"] / "token_bytes.json").read_text(encoding="utf-8"))
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    assert len(char_to_byte) == 256
    specials = {t["content"]: t["id"] for t in raw["added_tokens"]}
    assert set(specials) == set(SPECIAL_TOKENS)
    vocab: dict[str, int] = raw["model"]["vocab"]
    id_to_str = {i: s for s, i in vocab.items()}
    assert sorted(id_to_str) == list(range(VOCAB))

    assert len(token_bytes) == VOCAB
    for i in range(VOCAB):
        if i in specials.values():
            assert token_bytes[i] == 0, i
        else:
            raw_bytes = bytes(char_to_byte[c] for c in id_to_str[i])
            assert token_bytes[i] == len(raw_bytes) > 0, (i, id_to_str[i])
            assert tok.enc.decode_single_token_bytes(i) == raw_bytes
    assert [i for i, n in enumerate(token_bytes) if n == 0] == sorted(specials.values())
    assert token_bytes == tok.token_bytes()


def test_all_256_single_byte_tokens_exist(tok):
    single = {tok.enc.decode_single_token_bytes(i): i for i in range(tok.vocab_size)
              if i not in tok.special_ids.values() and len(tok.enc.decode_single_token_bytes(i)) == 1}
    assert sorted(single) == [bytes([b]) for b in range(256)]
    for b, i in single.items():
        assert tok.enc.encode_single_token(b) == i


def test_meta_numbers(trained, tok):
    out = trained["out"]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta == json.loads(json.dumps(trained["meta"]))
    assert meta["vocab_size"] == VOCAB == len(tok.hf.get_vocab()) == tok.vocab_size
    assert meta["requested_vocab_size"] == VOCAB
    assert meta["special_tokens"] == {s: tok.special_id(s) for s in SPECIAL_TOKENS}
    assert meta["bos_id"] == tok.bos_id

    docs = trained["val_docs"]
    val_bytes = sum(len(d.encode("utf-8")) for d in docs)
    val_tokens = sum(len(tok.encode_reference(d)) for d in docs)
    assert meta["val_bytes"] == val_bytes
    assert meta["val_tokens"] == val_tokens
    assert meta["val_bytes_per_token"] == pytest.approx(val_bytes / val_tokens, abs=1e-4)

    text = (out / "tokenizer.json").read_text(encoding="utf-8")
    assert meta["tokenizer_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest() == tok.hash
    assert meta["config"] == {"vocab_size": VOCAB, "max_chars": 3_000_000, "doc_cap": 10_000}
    assert 0 < meta["train_chars"] <= 3_000_000


# --------------------------------------------------------------------------- 6. atomic writes, load errors

def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_successful_training_leaves_no_temp_dirs(trained):
    siblings = [p.name for p in trained["out"].parent.iterdir() if p.name.startswith(".")]
    assert siblings == []


def test_failed_write_keeps_previous_tokenizer(trained, tmp_path, monkeypatch):
    out = tmp_path / "tokenizer"
    shutil.copytree(trained["out"], out)
    before = _snapshot(out)

    real_write_json = bpe.write_json

    def failing_write_json(path, obj):  # disk fills up while meta.json is written
        if Path(path).name == "meta.json":
            raise OSError(28, "No space left on device")
        real_write_json(path, obj)

    monkeypatch.setattr(bpe, "write_json", failing_write_json)
    docs = iter_documents(trained["data"], "train")
    with pytest.raises(OSError, match="No space left"):
        train_tokenizer(TokenizerConfig(vocab_size=512, max_chars=200_000, doc_cap=10_000), docs,
                        trained["val_docs"][:3], out)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
    assert Tokenizer.load(out).hash == trained["tok"].hash


def test_failed_training_input_keeps_previous_tokenizer(trained, tmp_path):
    out = tmp_path / "tokenizer"
    shutil.copytree(trained["out"], out)
    before = _snapshot(out)

    def broken_docs():
        yield "def f():\n    return 1\n" * 100
        raise RuntimeError("shard read failed")

    with pytest.raises(Exception, match="shard read failed"):
        train_tokenizer(TokenizerConfig(vocab_size=512, max_chars=200_000, doc_cap=10_000), broken_docs(),
                        trained["val_docs"][:3], out)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]


def test_retraining_replaces_atomically(trained, tmp_path):
    out = tmp_path / "tokenizer"
    shutil.copytree(trained["out"], out)
    meta = train_tokenizer(TokenizerConfig(vocab_size=512, max_chars=200_000, doc_cap=10_000),
                           iter_documents(trained["data"], "train"), trained["val_docs"][:3], out)
    assert meta["vocab_size"] == 512
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
    assert Tokenizer.load(out).vocab_size == 512


def test_load_missing_dir(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nowhere")


def test_load_corrupt_json_names_path(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError) as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)


def test_load_tokenizer_without_special_tokens(trained, tmp_path):
    raw = json.loads((trained["out"] / "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<|output_end|>"]
    del raw["model"]["vocab"]["<|output_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"<\|output_end\|>"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------------- 7. compression

def test_bpe_compresses_python_source(trained):
    assert trained["meta"]["val_bytes_per_token"] > 2.5
