"""``rdn serve-chat``: the trained chat model behind an OpenAI-compatible HTTP API and a web page.

Run in the project folder after ``make run``::

    rdn serve-chat                 # the rl checkpoint at http://127.0.0.1:8000/
    rdn serve-chat --stage sft --port 9000 --api-key "$KEY"

It checks the checkpoints and loads the default stage before it listens (a bad checkpoint
is a one-line error, exit 1), prints the URL, and serves until Ctrl-C. See
:mod:`rdn.serve.app` for the routes and limits, :mod:`rdn.serve.batcher` for how concurrent
requests share one forward pass.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

STAGE_CHOICES = ("rl", "sft", "mid", "base")


def serve_chat_main(root: Path, stage: str, host: str, port: int, api_key: str | None, max_tokens: int,
                    max_batch: int, request_timeout: float, max_body_bytes: int, device: str,
                    threads: int | None = None) -> int:
    import os

    import torch
    import uvicorn

    from rdn.inference.load import EngineLoadError
    from rdn.serve.app import Models, ServeConfig, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    config = ServeConfig(root=root, default_stage=stage, api_key=api_key or None, max_tokens_limit=max_tokens,
                         max_batch=max_batch, max_body_bytes=max_body_bytes, request_timeout=request_timeout,
                         device=device)
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        # leave a core to the HTTP side, which turns every decode step into events
        threads = max(1, (os.cpu_count() or 2) - 1)
    if threads is not None:
        torch.set_num_threads(threads)
    models = Models(config)
    if not (root / "artifacts" / "tokenizer").is_dir():
        print(f"rdn serve-chat: {root / 'artifacts' / 'tokenizer'}: no tokenizer here; run `make run` (or "
              "`dvc repro`) in this project first, or pass --project", file=sys.stderr)
        return 1
    if stage not in models.checkpoints:
        have = ", ".join(models.checkpoints) or "none"
        print(f"rdn serve-chat: {root / 'artifacts' / 'checkpoints' / stage}: no checkpoint for stage {stage!r} "
              f"(stages with checkpoints: {have}); train it first (`make run`) or pick one with --stage",
              file=sys.stderr)
        return 1
    try:
        models.batcher(stage)
    except EngineLoadError as e:
        print(f"rdn serve-chat: {e}", file=sys.stderr)
        return 1
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        print(f"rdn serve-chat: cannot listen on {host}:{port}: {e.strerror} (try another --port)", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else shown}:{port}/"
    print(f"rdn serve-chat: {stage}: {models.about[stage]}", flush=True)
    print(f"rdn serve-chat: chat page {url}  OpenAI API {url}v1  (stages: {', '.join(models.checkpoints)}; "
          f"Ctrl-C stops)", flush=True)
    if not _loopback(host) and not api_key:
        print(f"rdn serve-chat: warning: listening on {host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr, flush=True)
    app = create_app(config, models)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        models.close()
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _cmd_serve_chat(args: argparse.Namespace) -> int:
    return serve_chat_main(args.project.resolve(), args.stage, args.host, args.port, args.api_key, args.max_tokens,
                           args.max_batch, args.request_timeout, args.max_body_bytes, args.device, args.threads)


def register(sub) -> None:
    p = sub.add_parser("serve-chat", help="serve a stage's chat model: OpenAI-compatible API + web chat page")
    p.add_argument("--stage", choices=STAGE_CHOICES, default="rl", help="default model (default: rl); every stage "
                   "with a checkpoint is served, chosen by the request's 'model'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = a free one, printed)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per stage (default: 16)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may run (default: 300)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS, else cores - 1, at least 1)")
    p.add_argument("--project", type=Path, default=Path.cwd(), help="project folder (default: current)")
    p.set_defaults(func=_cmd_serve_chat)
