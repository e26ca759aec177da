"""``rdn export``: write a stage's checkpoint in a deployment format (``--format ternary``)."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("ternary",)
STAGES = ("base", "mid", "sft", "rl")


def _cmd_export(args: argparse.Namespace) -> int:
    raise NotImplementedError


def register(sub) -> None:
    """Add ``rdn export`` to rdn.cli.main's subparsers."""
    e = sub.add_parser("export", help="pack a checkpoint for deployment (ternary: 2 bits per weight)")
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--stage", choices=STAGES, help="the newest checkpoint of this stage")
    where.add_argument("--checkpoint", type=Path, help="a step_NNNNNN folder, or a folder of them (newest)")
    e.add_argument("--format", required=True, choices=FORMATS, help="ternary: BitNet b1.58 packed weights")
    e.add_argument("out", type=Path, metavar="DIR", help="folder to write (replaced atomically)")
    e.set_defaults(func=_cmd_export)
