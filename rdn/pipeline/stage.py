"""What every stage entry point does around its one call into the library.

``stages/<name>.py`` stays short: it validates params through :func:`load_params_or_exit`
(the whole file, before any data is read), opens :func:`stage_run` (the stage's MLflow
run, with its params sections logged, its wall time measured and SIGTERM unwound like
Ctrl-C), calls one rdn function and writes the figures it returns with
:func:`write_metrics` (training stages do all of this through
``stages.run_training_stage``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from rdn.config import Params, ParamsError, load_params
from rdn.io import project_root, write_json
from rdn.progress import human_seconds
from rdn.tracking.run import StageRun

log = logging.getLogger("rdn")
PARAMS_ENV = "RDN_PARAMS"


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("RDN_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                            stream=sys.stderr)


def params_path(arg: str | None = None) -> Path:
    return Path(arg or os.environ.get(PARAMS_ENV) or "params.yaml")


def load_params_or_exit(path: str | Path | None = None) -> Params:
    """Validate the whole params file; on error print every problem and exit with status 2."""
    path = params_path(str(path) if path else None)
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"invalid params in {path}:", file=sys.stderr)
        for line in e.problems:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def stage_run(stage: str, params: Params, sections: tuple[str, ...]) -> Iterator[StageRun]:
    """An MLflow run for one stage, with its params sections logged and its wall time measured."""
    setup_logging()
    start = time.monotonic()
    log.info("stage %s: starting (project %s)", stage, project_root())
    with terminate_as_interrupt(stage), StageRun(stage, params.tracking, run_name_tag=params.run.name) as run:
        run.log_params(params.section_dict("run", *sections))
        yield run
        run.log_metrics({f"{stage}/seconds": time.monotonic() - start}, flush=True)
    log.info("stage %s: done in %s", stage, human_seconds(time.monotonic() - start))


@contextlib.contextmanager
def terminate_as_interrupt(stage: str) -> Iterator[None]:
    """SIGTERM (a scheduler, ``kill``, Prefect cancelling DVC) unwinds like Ctrl-C: buffered
    metrics are sent and the MLflow run ends KILLED instead of staying RUNNING forever.
    Checkpoints are atomic, so unwinding mid-write leaves the last complete one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"stage {stage}: terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_metrics(stage: str, metrics: Mapping[str, Any]) -> Path:
    """``metrics/<stage>.json``: the small, uncached JSON that DVC shows with ``dvc metrics show``."""
    path = project_root() / "metrics" / f"{stage}.json"
    write_json(path, dict(metrics))
    return path
