"""DVC stage entry points: ``python -m stages.<name> [--params FILE]``."""

from __future__ import annotations

import argparse

from rdn.config import Params
from rdn.stage import load_params_or_exit


def stage_params(description: str | None, argv: list[str] | None) -> Params:
    """Parse a stage's command line and validate the whole params file (exit 2 on error)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", help="params file (default: $RDN_PARAMS or params.yaml)")
    return load_params_or_exit(ap.parse_args(argv).params)
