"""Tokenizer benchmark: encode throughput (tiktoken vs HF tokenizers) and training time.

What it measures, on the val split of an existing corpus (``iter_documents``):

1. Encode throughput in tokens/s of the four ways ``rdn`` can encode text with the
   same merges:

   * ``tok.encode_batch(docs, num_threads=T)``   -- tiktoken, the training path;
   * ``[tok.encode(d) for d in docs]``            -- tiktoken, one thread;
   * ``tok.hf.encode_batch(docs)``                -- HF tokenizers' batch (rayon pool
     limited to ``T`` threads via ``RAYON_NUM_THREADS``; ``encode_special_tokens`` is
     already set by :class:`rdn.tokenizer.Tokenizer`);
   * ``[tok.encode_reference(d) for d in docs]``  -- HF tokenizers, one thread.

   Each is run ``--repeats`` times (default 3) and the best wall time is kept. The
   table pairs tiktoken and HF for the batch and the single-thread mode with the
   speedup ratio. All four must give identical ids, or the script exits 1.

2. Training time of a fresh tokenizer with the ``tokenizer:`` section of
   ``params.yaml`` (``--vocab-size`` overrides its vocab size) on the train split,
   written to a temporary directory: wall seconds of ``train_tokenizer`` (which also
   encodes and checks the val split), the trainer's own seconds and chars/s.

Run from the project root after ``dvc repro tokenizer`` (or ``python -m stages.data
&& python -m stages.tokenizer``)::

    python benchmarks/tokenizer.py [--data artifacts/data] [--tokenizer artifacts/tokenizer]
                                   [--vocab-size 4096] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="artifacts/data", help="corpus folder (default: %(default)s)")
    ap.add_argument("--tokenizer", default="artifacts/tokenizer", help="trained tokenizer (default: %(default)s)")
    ap.add_argument("--params", default="params.yaml", help="params file for training (default: %(default)s)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override tokenizer.vocab_size for training")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for the batch encoders (default: CPU count, %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default: %(default)s)")
    ap.add_argument("--skip-train", action="store_true", help="only measure encoding")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    return args


def _cpu_model() -> str:
    """platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _best(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds / 1e6:.2f} M" if n / seconds >= 1e6 else f"{n / seconds / 1e3:.0f} k"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # HF tokenizers sizes its rayon pool from this variable when the pool first starts:
    # set it before the first batch call so both batch encoders get the same threads.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from importlib import metadata

    from rdn.config import load_params
    from rdn.data import CorpusError, iter_documents
    from rdn.tokenizer import Tokenizer, TokenizerError, train_tokenizer

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("tiktoken", "tokenizers"))
    print("# Tokenizer benchmark")
    print(f"date:     {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"device:   {os.cpu_count()} CPUs ({_cpu_model()}), processor={platform.processor() or '?'}, "
          f"machine={platform.machine()}, {platform.platform()}")
    print(f"software: Python {platform.python_version()}, {versions}")

    try:
        tok = Tokenizer.load(args.tokenizer)
        docs = list(iter_documents(args.data, "val"))
    except (CorpusError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"input:    {args.data} val split: {len(docs):,} documents, {n_bytes / 1e6:.2f} MB; "
          f"tokenizer {args.tokenizer} ({tok.vocab_size} ids); best of {args.repeats}")

    hf = tok.hf
    runs = {
        ("batch", "tiktoken"): lambda: tok.encode_batch(docs, num_threads=args.threads),
        ("batch", "hf"): lambda: [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)],
        ("1 thread", "tiktoken"): lambda: [tok.encode(d) for d in docs],
        ("1 thread", "hf"): lambda: [tok.encode_reference(d) for d in docs],
    }
    seconds, ids = {}, {}
    for key, fn in runs.items():
        seconds[key], ids[key] = _best(fn, args.repeats)
    reference = ids[("1 thread", "hf")]
    n_tokens = sum(len(x) for x in reference)
    same = {key: out == reference for key, out in ids.items()}

    print(f"\n{n_tokens:,} tokens ({n_bytes / n_tokens:.3f} bytes/token); encode throughput, tokens/s:\n")
    print("| mode | threads | tiktoken tok/s | HF tokenizers tok/s | speedup |")
    print("|---|---:|---:|---:|---:|")
    for mode, threads in (("batch", args.threads), ("1 thread", 1)):
        t_tt, t_hf = seconds[(mode, "tiktoken")], seconds[(mode, "hf")]
        print(f"| {'encode_batch' if mode == 'batch' else 'encode loop'} | {threads} | "
              f"{_rate(n_tokens, t_tt)} ({t_tt:.3f} s) | {_rate(n_tokens, t_hf)} ({t_hf:.3f} s) | "
              f"{t_hf / t_tt:.1f}x |")
    if not all(same.values()):
        bad = [f"{m}/{e}" for (m, e), ok in same.items() if not ok]
        print(f"\nFAIL: ids differ from the HF reference for {', '.join(bad)}", file=sys.stderr)
        return 1
    print("\nids identical across all four encoders: yes")

    if args.skip_train:
        return 0
    cfg = load_params(args.params).tokenizer
    if args.vocab_size is not None:
        cfg = cfg.model_validate({**cfg.model_dump(), "vocab_size": args.vocab_size})
    print(f"\ntraining: {cfg.model_dump()} on {args.data} train split")
    with tempfile.TemporaryDirectory(prefix="rdn-tokbench-") as tmp:
        start = time.perf_counter()
        meta = train_tokenizer(cfg, iter_documents(args.data, "train"), docs, Path(tmp) / "tokenizer")
        wall = time.perf_counter() - start
    chars, trainer_s = meta["train_chars"], meta["train_seconds"]
    print("\n| what | value |")
    print("|---|---:|")
    print(f"| train chars | {chars:,} |")
    print(f"| BPE training (read + train) | {trainer_s:.2f} s ({_rate(chars, trainer_s)} chars/s) |")
    print(f"| train_tokenizer total (+ val encode/check, write) | {wall:.2f} s ({_rate(chars, wall)} chars/s) |")
    print(f"| vocab size | {meta['vocab_size']} |")
    print(f"| val bytes/token | {meta['val_bytes_per_token']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
