"""Build the text corpus as parquet shards: ``<out>/{train,val}/shard_NNNNN.parquet``.

Each shard has one ``text`` column, one row per document, row groups of
``row_group_docs`` documents, zstd-compressed; ``manifest.json`` lists documents,
bytes and a sha256 per shard. Sources:

* ``stdlib``: the running interpreter's standard-library ``.py`` files. Real code,
  rich in nested brackets, and on every machine with Python, so the default pipeline
  needs no network.
* ``folder``: ``.txt``/``.md``/``.py`` files (one document each) and ``.jsonl`` files
  (one document per line: a JSON object with ``text_column`` or a JSON string).
* ``parquet``: existing shards with a text column (FineWeb-edu, ClimbMix, ...).

A document goes to val when a hash of its name falls below ``val_fraction``: the
split is deterministic and does not move when other documents are added. Everything
is written into a temp directory that replaces ``out`` only on success, so a bad
source never destroys a corpus built earlier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rdn.config import DataConfig
from rdn.io import atomic_directory, provenance, sha256_file, write_json
from rdn.progress import ProgressReporter, human_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


class CorpusError(ValueError):
    """A corpus source problem; the message names the file or folder at fault."""


# --------------------------------------------------------------------------- split + sources

def is_val(name: str, val_fraction: float) -> bool:
    """Deterministic split: sha256 of the document name mapped to [0, 1)."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


@dataclass
class Skipped:
    not_utf8: int = 0
    too_short: int = 0
    null_text: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"not_utf8": self.not_utf8, "too_short": self.too_short, "null_text": self.null_text}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(include_tests: bool) -> list[tuple[str, Path]]:
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        keep = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        if not include_tests:
            keep = [d for d in keep if d not in _STDLIB_TEST_DIRS]
        dirnames[:] = sorted(keep)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path))
    return files


def _folder_files(root: Path, extensions: list[str]) -> list[tuple[str, Path]]:
    exts = {e.lower() for e in extensions}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in exts:
                files.append((path.relative_to(root).as_posix(), path))
    return files


def _parquet_files(root: Path) -> list[tuple[str, Path]]:
    return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*.parquet"))]


def _resolve_source(cfg: DataConfig, root: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """Check the source before any work starts; return its root and its file list."""
    if cfg.source == "stdlib":
        src = stdlib_root()
        files = _stdlib_files(cfg.include_tests)
    else:
        src = (root / cfg.path).resolve() if cfg.path else root
        if not src.exists():
            raise CorpusError(f"data.path: {src} does not exist")
        if not src.is_dir():
            raise CorpusError(f"data.path: {src} is not a folder")
        files = _folder_files(src, cfg.extensions) if cfg.source == "folder" else _parquet_files(src)
    if not files:
        what = "parquet files" if cfg.source == "parquet" else f"files with suffix {', '.join(cfg.extensions)}"
        raise CorpusError(f"empty corpus: no {what} under {src}")
    if cfg.source == "parquet":
        for _, path in files:
            _check_parquet(path, cfg.text_column)
    return src, files


def _check_parquet(path: Path, column: str) -> None:
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
    if column not in schema.names:
        raise CorpusError(f"{path}: no column {column!r} (data.text_column); columns are {schema.names}")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {column!r} has type {kind}, expected a string column")


def _documents(cfg: DataConfig, files: list[tuple[str, Path]], skipped: Skipped) -> Iterator[tuple[str, str, int]]:
    """Yield (name, text, files_done) for every document, skipping non-UTF-8 files."""
    for done, (rel, path) in enumerate(files, start=1):
        if cfg.source == "parquet":
            yield from ((n, t, done) for n, t in _parquet_documents(rel, path, cfg.text_column, skipped))
            continue
        try:
            text = path.read_bytes().decode("utf-8-sig")  # a leading byte-order mark is not text
        except UnicodeDecodeError:
            skipped.not_utf8 += 1
            log.debug("skipping %s: not UTF-8", path)
            continue
        except OSError as e:
            raise CorpusError(f"{path}: cannot read ({e})") from None
        if path.suffix.lower() == ".jsonl":
            yield from ((n, t, done) for n, t in _jsonl_documents(rel, path, text, cfg.text_column))
        else:
            yield rel, text, done


def _jsonl_documents(rel: str, path: Path, text: str, key: str) -> Iterator[tuple[str, str]]:
    # split on "\n" only: str.splitlines() would also cut at U+2028/U+2029/U+0085, which
    # JSON allows unescaped inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict):
            if not isinstance(obj.get(key), str):
                raise CorpusError(f"{path}:{lineno}: expected a string under key {key!r} (data.text_column)")
            obj = obj[key]
        elif not isinstance(obj, str):
            raise CorpusError(f"{path}:{lineno}: expected a JSON object or string, got {type(obj).__name__}")
        yield f"{rel}:{lineno}", obj


def _parquet_documents(rel: str, path: Path, column: str, skipped: Skipped) -> Iterator[tuple[str, str]]:
    try:
        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    skipped.null_text += 1
                    continue
                yield f"{rel}:{row}", text
    except CorpusError:
        raise
    except Exception as e:
        raise CorpusError(f"{path}: unreadable parquet data ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- shard writing

@dataclass
class _ShardWriter:
    out: Path
    docs_per_shard: int
    row_group_docs: int
    shards: list[dict] = field(default_factory=list)
    documents: int = 0
    bytes: int = 0
    _rows: list[str] = field(default_factory=list)
    _writer: pq.ParquetWriter | None = None
    _in_shard: int = 0

    SCHEMA = pa.schema([("text", pa.string())])

    def add(self, text: str, nbytes: int) -> None:
        if self._writer is None:
            self._open()
        self._rows.append(text)
        self._in_shard += 1
        self.documents += 1
        self.bytes += nbytes
        self.shards[-1]["documents"] += 1
        self.shards[-1]["bytes"] += nbytes
        if len(self._rows) >= self.row_group_docs:
            self._write_group()
        if self._in_shard >= self.docs_per_shard:
            self._close()

    def _open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"shard_{len(self.shards):05d}.parquet"
        self._writer = pq.ParquetWriter(self.out / name, self.SCHEMA, compression="zstd")
        self.shards.append({"file": name, "documents": 0, "bytes": 0})
        self._in_shard = 0

    def _write_group(self) -> None:
        if self._rows:
            self._writer.write_table(pa.table({"text": self._rows}, schema=self.SCHEMA), row_group_size=len(self._rows))
            self._rows = []

    def _close(self) -> None:
        if self._writer is not None:
            self._write_group()
            self._writer.close()
            self._writer = None
            self.shards[-1]["sha256"] = sha256_file(self.out / self.shards[-1]["file"])

    def finish(self) -> dict:
        self._close()
        return {"documents": self.documents, "bytes": self.bytes, "shards": self.shards}


# --------------------------------------------------------------------------- entry points

def build_corpus(cfg: DataConfig, out_dir: str | Path, seed: int, root: str | Path) -> dict:
    """Build the train/val shards under ``out_dir`` and return the manifest dict.

    The source is fully checked (paths, parquet schemas) before anything is read;
    ``out_dir`` is replaced only when the new corpus is complete."""
    out_dir, root = Path(out_dir), Path(root)
    src, files = _resolve_source(cfg, root)
    random.Random(seed).shuffle(files)  # mixes shards; the split depends on names only
    skipped = Skipped()
    start = time.monotonic()
    log.info("data: reading %d %s files from %s", len(files), cfg.source, src)
    with atomic_directory(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp / s, cfg.docs_per_shard, cfg.row_group_docs) for s in SPLITS}
        total_bytes = 0
        last_done = 0
        with ProgressReporter("data", total=len(files), unit="files") as progress:
            for name, text, done in _documents(cfg, files, skipped):
                if done > last_done:
                    progress.advance(done - last_done)
                    last_done = done
                if len(text) < cfg.min_chars:
                    skipped.too_short += 1
                    continue
                nbytes = len(text.encode("utf-8"))
                writers["val" if is_val(name, cfg.val_fraction) else "train"].add(text, nbytes)
                progress.advance(0, documents=1, bytes=nbytes)
                total_bytes += nbytes
                if cfg.max_total_bytes is not None and total_bytes >= cfg.max_total_bytes:
                    log.info("data: reached data.max_total_bytes=%d; stopping early", cfg.max_total_bytes)
                    break
            progress.advance(len(files) - last_done)
        splits = {s: w.finish() for s, w in writers.items()}
        for split, info in splits.items():
            if info["documents"] == 0:
                raise CorpusError(f"empty corpus: no {split} documents from {src} "
                                  f"(skipped: {skipped.as_dict()}; check data.val_fraction and data.min_chars)")
        manifest = {
            "source": cfg.source,
            "source_path": str(src),
            "python_version": sys.version.split()[0] if cfg.source == "stdlib" else None,
            "seed": seed,
            "config": cfg.model_dump(mode="json"),
            "splits": splits,
            "skipped": skipped.as_dict(),
            "seconds": round(time.monotonic() - start, 3),
            **provenance(),
        }
        write_json(tmp / "manifest.json", manifest)
    t, v = splits["train"], splits["val"]
    log.info("data: %d train docs (%s), %d val docs (%s) in %d+%d shards; skipped %s; %.1fs",
             t["documents"], human_bytes(t["bytes"]), v["documents"], human_bytes(v["bytes"]),
             len(t["shards"]), len(v["shards"]), skipped.as_dict(), manifest["seconds"])
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise CorpusError(f"{path}: missing; run the data stage first (dvc repro data)")
    return json.loads(path.read_text(encoding="utf-8"))


def iter_documents(data_dir: str | Path, split: str) -> Iterator[str]:
    """Every document of one split, shard by shard, row group by row group."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    manifest = read_manifest(data_dir)
    for shard in manifest["splits"][split]["shards"]:
        pf = pq.ParquetFile(Path(data_dir) / split / shard["file"])
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=["text"]).column(0).to_pylist()
