"""``rdn``: the console script for what a person types that is not make/dvc/prefect/mlflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_validate(args: argparse.Namespace) -> int:
    from rdn.config import ParamsError, load_params

    try:
        params = load_params(args.path)
    except ParamsError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        n = len(e.problems)
        print(f"{args.path}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return 2
    m = params.model
    variants = [name for name, on in (("MoE", m.moe.enabled), (f"mHC x{m.mhc.streams}", m.mhc.streams > 1),
                                      (f"MTP x{m.mtp.num_future}", m.mtp.num_future > 0),
                                      ("ternary", m.ternary.enabled)) if on]
    print(f"OK {args.path}: {len(type(params).model_fields)} sections valid "
          f"(model depth {m.depth}, width {m.width}, {m.n_head} heads, "
          f"{'RDN coordinates' if m.use_coordinates else 'plain GPT'}"
          f"{', ' + ', '.join(variants) if variants else ''})")
    if args.counts:
        _print_counts(params)
    return 0


def _print_counts(params) -> None:
    """Parameter groups, total and active parameters and FLOPs per token of the params' model,
    built on the meta device (no memory is allocated, no GPU needed)."""
    import torch

    from rdn.model import GPT, GPTConfig

    config = GPTConfig.from_params(params.model, vocab_size=params.tokenizer.vocab_size,
                                   n_coord_dim=params.coords.n_dim)
    with torch.device("meta"):
        model = GPT(config)
    counts = model.num_scaling_params()
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        if key not in ("total", "active"):
            print(f"  {key:<{width}}  {value:>16,}")
    print(f"  {'total':<{width}}  {counts['total']:>16,}  ({counts['total'] / 1e6:,.1f}M)")
    print(f"  {'active':<{width}}  {counts['active']:>16,}  ({counts['active'] / 1e6:,.1f}M per token)")
    print(f"  {'FLOPs/token':<{width}}  {model.estimate_flops():>16,.4g}  (training: forward + backward)")


STAGE_DIRS = {"base": "base", "mid": "mid", "sft": "sft", "rl": "rl"}


def _cmd_ablate(args: argparse.Namespace) -> int:
    import logging

    from rdn.pipeline.ablate import ablate_main

    if args.seeds is not None and args.seeds < 2:
        print(f"rdn ablate: --seeds must be >= 2 (a paired interval needs two pairs) (got {args.seeds})",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return ablate_main(args.name, seeds=args.seeds, jobs=max(1, args.jobs), stages=args.stages, force=args.force)


def _cmd_chat(args: argparse.Namespace) -> int:
    from rdn.cli.chat import chat_main

    root = Path.cwd()
    return chat_main(root / "artifacts" / "checkpoints" / STAGE_DIRS[args.stage], root / "artifacts" / "tokenizer",
                     prompt=args.prompt, temperature=args.temperature, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, device=args.device)


def _cmd_serve(args: argparse.Namespace) -> int:
    from rdn.pipeline.serve import serve

    return serve(args.project, host=args.host, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                 pool=args.pool, mlflow=not args.no_mlflow, state_file=args.state_file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("validate", help="check a params file; print every problem (exit 2) or one OK line")
    p.add_argument("path", nargs="?", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    p.add_argument("--counts", action="store_true",
                   help="also print total and active parameters and FLOPs per token (built on the meta device)")
    p.set_defaults(func=_cmd_validate)
    c = sub.add_parser("chat", help="chat with a checkpoint (interactive, or one-shot with -p)")
    c.add_argument("--stage", choices=list(STAGE_DIRS), default="rl", help="whose newest checkpoint (default: rl)")
    c.add_argument("-p", "--prompt", help="one-shot: answer this and exit")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-k", type=int, default=None)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    c.set_defaults(func=_cmd_chat)
    s = sub.add_parser("serve", help="local Prefect server + worker + MLflow UI on loopback, deployed; Ctrl-C stops all")
    s.add_argument("--project", type=Path, default=Path.cwd(), help="project directory (default: current)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    s.add_argument("--prefect-port", type=int, default=0, help="Prefect server port (default: a free one)")
    s.add_argument("--mlflow-port", type=int, default=0, help="MLflow server port (default: a free one)")
    s.add_argument("--pool", default="rdn-local", help="process work pool to create and serve (default: rdn-local)")
    s.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    s.add_argument("--state-file", type=Path, help="write URLs and pids as JSON here "
                   "(default: $PREFECT_HOME/serve/serve.json)")
    s.set_defaults(func=_cmd_serve)
    from rdn.cli.tracking import register as register_tracking_commands

    register_tracking_commands(sub)  # compare, sweep, tracking flush
    from rdn.cli.export import register as register_export_command

    register_export_command(sub)  # export
    from rdn.cli.serve_chat import register as register_serve_chat_command

    register_serve_chat_command(sub)  # serve-chat
    from rdn.cli.memory import register as register_memory_command

    register_memory_command(sub)  # memory
    a = sub.add_parser("ablate", help="an ablation set x N seeds as DVC experiments, then paired statistics "
                                      "(no name: list the sets in configs/ablations)")
    a.add_argument("name", nargs="?", help="set name in configs/ablations/ (e.g. rdn_vs_gpt)")
    a.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the set's)")
    a.add_argument("--jobs", type=int, default=1, help="experiments at a time, each with cores/jobs threads")
    a.add_argument("--stages", nargs="+", default=None, help="dvc targets instead of the set's")
    a.add_argument("--force", action="store_true", help="rerun every (variant, seed), even finished ones")
    a.set_defaults(func=_cmd_ablate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
