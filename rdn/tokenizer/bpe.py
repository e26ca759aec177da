"""The rdn tokenizer: a byte-level BPE in the GPT-4 style.

Training uses HF ``tokenizers`` (a fast Rust trainer); encoding for training uses
``tiktoken`` built from the very same merges, which measured about 4x faster here (BENCHMARKS.md) and
gives identical ids. Why the ids agree: HF's BPE trainer assigns ids in merge order,
so a token's id is its merge rank, which is exactly the priority tiktoken uses.
The one construction that could break this -- two merges producing the same
string -- is detected at training time and reported (it did not occur on any
corpus we trained on); the tests compare both encoders on the whole val split.

Special tokens exist only through the explicit API (:meth:`Tokenizer.special_id`,
``prepend=``/``append=``): text that merely contains ``<|bos|>`` is encoded as the
ordinary characters ``<``, ``|``, ``bos``... by both encoders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from rdn.config import SPECIAL_TOKENS, TokenizerConfig
from rdn.io import atomic_directory, provenance, write_json
from rdn.progress import ProgressReporter, human_seconds

log = logging.getLogger(__name__)

# GPT-4's split pattern with digits in groups of 1-2 (as nanochat): fewer distinct
# number tokens wasted on a small vocabulary.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
BOS = "<|bos|>"
FILES = ("tokenizer.json", "token_bytes.json", "meta.json")


class TokenizerError(ValueError):
    """A tokenizer directory that is missing, incomplete or inconsistent."""


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes->printable-unicode table used by ByteLevel pre-tokenization."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _new_hf_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    return tok


class Tokenizer:
    """Encode/decode with tiktoken; the HF tokenizer stays available as the reference."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # specials in text are plain text
        vocab = hf.get_vocab()
        self.special_ids = {s: vocab[s] for s in SPECIAL_TOKENS if s in vocab}
        missing = [s for s in SPECIAL_TOKENS if s not in vocab]
        if missing:
            raise TokenizerError(f"tokenizer has no special tokens {missing}")
        u2b = _byte_decoder()
        ranks = {bytes(u2b[ch] for ch in tok): i for tok, i in vocab.items() if tok not in self.special_ids}
        self.enc = tiktoken.Encoding("rdn", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_ids)
        self.vocab_size = len(vocab)
        self.bos_id = self.special_ids[BOS]

    # -- persistence
    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{path}: missing; run the tokenizer stage first (dvc repro tokenizer)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a plain Exception for bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer file ({e})") from None

    def to_json(self) -> str:
        return self.hf.to_str()

    @cached_property
    def hash(self) -> str:
        """sha256 of the serialized tokenizer: checkpoints record it to refuse a mismatch."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    # -- ids
    def special_id(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {list(self.special_ids)}") from None

    def _resolve(self, tok: int | str | None) -> list[int]:
        if tok is None:
            return []
        if isinstance(tok, str):
            return [self.special_id(tok)]
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < self.vocab_size:
            raise ValueError(f"token id must be an int in [0, {self.vocab_size}) or a special token name (got {tok!r})")
        return [tok]

    def encode(self, text: str, prepend: int | str | None = None, append: int | str | None = None) -> list[int]:
        """Ordinary-text encoding (special-token strings are not special here)."""
        return self._resolve(prepend) + self.enc.encode_ordinary(text) + self._resolve(append)

    def encode_batch(self, texts: Sequence[str], prepend: int | str | None = None,
                     append: int | str | None = None, num_threads: int = 8) -> list[list[int]]:
        head, tail = self._resolve(prepend), self._resolve(append)
        out = self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if head or tail:
            out = [head + ids + tail for ids in out]
        return out

    def encode_reference(self, text: str) -> list[int]:
        """The same encoding through HF tokenizers: slow, the oracle for tests."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def id_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one id (a special token's own string for special ids)."""
        for name, sid in self.special_ids.items():
            if sid == token_id:
                return name.encode("utf-8")
        return self.enc.decode_single_token_bytes(token_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each id (0 for special tokens): the bits-per-byte denominator."""
        table = [0] * self.vocab_size
        for i in range(self.vocab_size):
            if i not in self.special_ids.values():
                table[i] = len(self.enc.decode_single_token_bytes(i))
        return table


# --------------------------------------------------------------------------- training

def duplicate_merges(hf: HFTokenizer) -> int:
    """Merges whose result another merge already produced (the case where tiktoken's
    rank-based merging could disagree with HF's pair-based merging)."""
    merges = json.loads(hf.to_str())["model"]["merges"]
    seen: set[str] = set()
    dups = 0
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        dups += (a + b) in seen
        seen.add(a + b)
    return dups


def _training_texts(docs: Iterable[str], cfg: TokenizerConfig, progress: ProgressReporter) -> Iterator[str]:
    remaining = cfg.max_chars
    for doc in docs:
        text = doc[: min(cfg.doc_cap, remaining)]
        remaining -= len(text)
        progress.advance(len(text), documents=1)
        yield text
        if remaining <= 0:
            break


def train_tokenizer(cfg: TokenizerConfig, train_docs: Iterable[str], val_docs: Sequence[str],
                    out_dir: str | Path, source_manifest_sha256: str | None = None,
                    check_chars: int = 4_000_000) -> dict:
    """Train a BPE of ``cfg.vocab_size`` ids on ``train_docs``; write it atomically to ``out_dir``.

    Writes ``tokenizer.json``, ``token_bytes.json`` and ``meta.json``. Returns meta,
    including bytes/token on ``val_docs`` and whether tiktoken matched HF on up to
    ``check_chars`` characters of them."""
    start = time.monotonic()
    hf = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS))
    with ProgressReporter("tokenizer: reading", total=cfg.max_chars, unit="chars") as progress:
        hf.train_from_iterator(_training_texts(train_docs, cfg, progress), trainer=trainer)
        train_chars = int(progress.done)
    train_seconds = time.monotonic() - start
    tok = Tokenizer(hf)
    if tok.vocab_size < cfg.vocab_size:
        log.warning("tokenizer: corpus only supports %d ids (< tokenizer.vocab_size=%d)", tok.vocab_size, cfg.vocab_size)
    dups = duplicate_merges(hf)
    if dups:
        log.warning("tokenizer: %d merges repeat an existing token; tiktoken may differ from HF on rare inputs", dups)

    # bytes/token on val, and a self-check of the two encoders on a prefix of it
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    val_tokens = sum(len(ids) for ids in tok.encode_batch(val_docs))
    checked, mismatched = 0, 0
    for doc in val_docs:
        if checked >= check_chars:
            break
        checked += len(doc)
        mismatched += tok.encode(doc) != tok.encode_reference(doc)
    if mismatched:
        raise TokenizerError(f"tiktoken and HF tokenizers disagree on {mismatched} val documents")

    meta = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.vocab_size,
        "special_tokens": tok.special_ids,
        "bos_id": tok.bos_id,
        "split_pattern": SPLIT_PATTERN,
        "tokenizer_sha256": tok.hash,
        "train_chars": train_chars,
        "train_seconds": round(train_seconds, 3),
        "duplicate_merges": dups,
        "val_bytes": val_bytes,
        "val_tokens": val_tokens,
        "val_bytes_per_token": round(val_bytes / max(val_tokens, 1), 4),
        "encoder_check_chars": checked,
        "data_manifest_sha256": source_manifest_sha256,
        "config": cfg.model_dump(mode="json"),
        **provenance(),
    }
    with atomic_directory(out_dir) as tmp:
        (tmp / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
        write_json(tmp / "token_bytes.json", tok.token_bytes())
        write_json(tmp / "meta.json", meta)
    log.info("tokenizer: %d ids from %s chars in %s; val %.3f bytes/token", tok.vocab_size,
             f"{train_chars:,}", human_seconds(train_seconds), meta["val_bytes_per_token"])
    return meta
