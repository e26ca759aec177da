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


def run_training_stage(description: str | None, argv: list[str] | None, stage: str, sections: tuple[str, ...],
                       runner: str, metrics_name: str | None = None) -> int:
    """Validate params, then run ``runner`` ("module:function", imported only after validation,
    since it pulls in torch) inside the stage's MLflow run and write ``metrics/<metrics_name
    or stage>.json``."""
    import importlib

    from rdn.io import project_root
    from rdn.stage import stage_run, write_metrics

    params = stage_params(description, argv)
    module, func = runner.split(":")
    run_fn = getattr(importlib.import_module(module), func)
    with stage_run(stage, params, sections) as run:
        summary = run_fn(params, project_root(), run)
        run.log_metrics({f"{stage}/{k}": float(v) for k, v in summary.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, flush=True)
        write_metrics(metrics_name or stage, summary)
    return 0
