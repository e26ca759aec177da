"""DVC stage entry points: ``python -m stages.<name> [--params FILE]``."""

from __future__ import annotations

import argparse

from rdn.config import Params
from rdn.pipeline.stage import load_params_or_exit


def stage_params(description: str | None, argv: list[str] | None) -> Params:
    """Parse a stage's command line and validate the whole params file (exit 2 on error)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", help="params file (default: $RDN_PARAMS or params.yaml)")
    return load_params_or_exit(ap.parse_args(argv).params)


def run_training_stage(description: str | None, argv: list[str] | None, stage: str, sections: tuple[str, ...],
                       runner: str, metrics_name: str | None = None) -> int:
    """Validate params, then run ``runner`` ("module:function", imported only after validation,
    since it pulls in torch) inside the stage's MLflow run and write ``metrics/<metrics_name
    or stage>.json``.

    When ``dist`` asks for more than one process and this one was not started by torchrun,
    it replaces itself with ``torchrun ... -m stages.<stage> <same args>`` (so DVC and
    Prefect run one command either way); with several nodes and ``dist.node_launcher``
    local or k8s it becomes node 0 and starts the other nodes first (:mod:`rdn.pipeline.launch`).
    Under torchrun every rank trains; only rank 0 tracks to MLflow, logs at INFO and writes
    the metrics file."""
    import importlib
    import logging
    import os
    import sys

    from rdn.dist import launched_by_torchrun, torchrun_argv
    from rdn.io import project_root
    from rdn.pipeline.stage import stage_run, write_metrics

    params = stage_params(description, argv)
    d = params.dist
    if d.world_size > 1 and not launched_by_torchrun():
        args = list(sys.argv[1:] if argv is None else argv)
        if d.nnodes > 1 and d.node_launcher != "external":  # node 0, starting the others itself
            from rdn.pipeline.launch import LaunchError, run_as_node_zero
            from rdn.pipeline.stage import setup_logging

            setup_logging()
            try:
                return run_as_node_zero(d, stage, args, project_root())
            except LaunchError as e:
                print(f"{stage}: {e}", file=sys.stderr)
                return 2
        cmd = torchrun_argv(d.nproc_per_node, d.nnodes, d.rdzv_endpoint, d.rdzv_id, f"stages.{stage}", args)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)

    from torch.distributed.elastic.multiprocessing.errors import record

    from rdn.dist import init_distributed, shutdown_distributed

    info = init_distributed(d.backend, params.run.device, d.timeout_s)
    if launched_by_torchrun() and info.is_main and info.world_size != d.world_size:
        logging.getLogger("rdn").warning(
            "dist asks for %d x %d processes but torchrun started %d: training with %d (set dist.nproc_per_node "
            "and dist.nnodes to match, so DVC records what ran)", d.nproc_per_node, d.nnodes, info.world_size,
            info.world_size)
    if not info.is_main:  # one voice: rank 0 tracks, logs progress and writes metrics
        logging.getLogger("rdn").setLevel(logging.WARNING)
        params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    module, func = runner.split(":")
    run_fn = getattr(importlib.import_module(module), func)

    @record  # torchrun's failure summary then shows this rank's traceback
    def body() -> None:
        with stage_run(stage, params, sections) as run:
            summary = run_fn(params, project_root(), run)
            run.log_metrics({f"{stage}/{k}": float(v) for k, v in summary.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, flush=True)
            if info.is_main:
                write_metrics(metrics_name or stage, summary)

    try:
        body()
    finally:
        shutdown_distributed()
    return 0
