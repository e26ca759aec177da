"""``rdn serve-chat`` under load: requests/s, tokens/s and latency at concurrency 1, 4 and 16,
with per-step dynamic batching against serving one request at a time, in one run.

Two servers are started as subprocesses on loopback ports, over the same checkpoint:

* ``batched``: the default, ``--max-batch 16`` -- concurrent requests share each decode step;
* ``one at a time``: ``--max-batch 1`` -- the same code serving requests one after another
  (FIFO), which is what a server without batching does.

For each server and concurrency ``c``, ``c`` client threads send the same list of held-out
calculator prompts (``--requests`` in all, greedy, ``max_tokens`` ``--max-tokens``) back to
back through HTTP, non-streaming. Reported: requests/s and completion tokens/s over the
whole wall time, and p50/p95 of the per-request latency. A warm-up request per server comes
first. The model is the project's checkpoint of ``--stage`` if there is one (after
``make run``); otherwise a temporary project with a quickly trained tokenizer and the
params.yaml model at random weights (it never says ``<|assistant_end|>``, so every request
generates exactly ``--max-tokens`` tokens).

    python benchmarks/serve.py                        # 2-core CPU: about 1 minute
    python benchmarks/serve.py --requests 64 --max-tokens 128 --stage sft
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def temp_project(stage: str) -> Path:
    """A project with a tokenizer (trained on 2 MB of stdlib code) and the params.yaml model
    at random weights saved as ``stage``'s checkpoint."""
    import dataclasses

    import torch

    from rdn.checkpoint import save_checkpoint
    from rdn.config import DataConfig, TokenizerConfig, load_params
    from rdn.data import build_corpus, iter_documents
    from rdn.tokenizer import Tokenizer, train_tokenizer
    from rdn.train.pretrain import build_model

    root = Path(tempfile.mkdtemp(prefix="rdn-serve-bench-"))
    params = load_params(ROOT / "params.yaml")
    data, tok_dir = root / "data", root / "artifacts" / "tokenizer"
    build_corpus(DataConfig(source="stdlib", include_tests=False, max_total_bytes=2_000_000, val_fraction=0.1),
                 data, seed=0, root=root)
    train_tokenizer(TokenizerConfig(vocab_size=params.tokenizer.vocab_size, max_chars=2_000_000),
                    iter_documents(data, "train"), list(iter_documents(data, "val"))[:10], tok_dir)
    tok = Tokenizer.load(tok_dir)
    model, config = build_model(params, tok, torch.device("cpu"))
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_sha256": tok.hash,
            "coords": {"n_dim": params.coords.n_dim, "bracket_pairs": list(params.coords.bracket_pairs)}}
    save_checkpoint(root / "artifacts" / "checkpoints" / stage, 1, model, None, {}, None, meta)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, project: Path, stage: str, max_batch: int, log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "rdn.cli.main", "serve-chat", "--project", str(project),
                                      "--stage", stage, "--port", port, "--max-batch", str(max_batch)],
                                     cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"serve-chat exited {self.proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"serve-chat did not start in 120 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, stage: str, questions: list[str], concurrency: int, max_tokens: int) -> dict:
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency))

    def one(q: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = http.post(f"{url}/v1/chat/completions",
                       json={"model": stage, "messages": [{"role": "user", "content": q}], "temperature": 0,
                             "max_tokens": max_tokens})
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, questions))
    wall = time.perf_counter() - t0
    http.close()
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"req_s": len(results) / wall, "tok_s": tokens / wall, "p50": statistics.median(lat),
            "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))], "tokens": tokens, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="rl", help="checkpoint stage to serve (default: rl)")
    ap.add_argument("--requests", type=int, default=32, help="requests per (server, concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--project", type=Path, default=ROOT, help="project whose checkpoint to serve (default: this one)")
    args = ap.parse_args()

    from rdn.artifacts import checkpoint_dir
    from rdn.checkpoint import latest_checkpoint

    project, source, scratch = args.project.resolve(), f"checkpoint artifacts/checkpoints/{args.stage}", None
    if latest_checkpoint(checkpoint_dir(project, args.stage)) is None or not (project / "artifacts/tokenizer").is_dir():
        print(f"# no {args.stage} checkpoint in this project: a params.yaml model at random weights", flush=True)
        project = scratch = temp_project(args.stage)
        source = "params.yaml model, random weights"
    try:
        run(args, project, source)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run(args, project: Path, source: str) -> None:
    from rdn.tasks import get_task

    convs = get_task("calculator").generate(args.requests, seed=7, split="test")
    questions = [c[0]["content"] for c in convs]
    logs = Path(tempfile.mkdtemp(prefix="rdn-serve-bench-logs-"))  # kept: the servers' logs
    print(f"# serve-chat load, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; model: {source}; {args.requests} calculator requests per row, greedy, "
          f"max_tokens {args.max_tokens}, non-streaming", flush=True)
    rows = {}
    for label, max_batch in [("batched", 16), ("one at a time", 1)]:
        server = Server(project, args.stage, max_batch, logs / f"server-{max_batch}.log")
        try:
            load(server.url, args.stage, questions[:1], 1, args.max_tokens)  # warm-up
            for c in args.concurrency:
                rows[label, c] = r = load(server.url, args.stage, questions, c, args.max_tokens)
                print(f"  {label:<14} concurrency {c:>2}: {r['req_s']:6.2f} req/s {r['tok_s']:8.1f} tok/s  "
                      f"p50 {r['p50']:6.2f}s  p95 {r['p95']:6.2f}s  ({r['tokens']} tokens in {r['wall']:.1f}s)",
                      flush=True)
        finally:
            server.stop()
    print()
    print(f"| concurrency | batched req/s | batched tok/s | p50 | p95 | one-at-a-time req/s | tok/s | p50 | p95 "
          f"| throughput x |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        b, o = rows["batched", c], rows["one at a time", c]
        print(f"| {c} | {b['req_s']:.2f} | {b['tok_s']:.0f} | {b['p50']:.2f} s | {b['p95']:.2f} s | {o['req_s']:.2f} "
              f"| {o['tok_s']:.0f} | {o['p50']:.2f} s | {o['p95']:.2f} s | {b['tok_s'] / o['tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
