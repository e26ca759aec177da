"""The MLflow parent run of one pipeline run (the Prefect flow opens and closes it).

Every stage's :class:`~rdn.tracking.run.StageRun` nests under it (``RDN_MLFLOW_PARENT_RUN_ID``).
When the flow ends, the parent gets the pipeline's figures (:func:`metrics_summary`: every
number in the ``metrics/*.json`` files of the stages that completed, ran or cached, named
``<file>/<key>/...`` like the stage runs' own summary metrics), the metrics files and the
report as artifacts, one tag per stage status, and its final status. A cached stage opens
no run of its own, so for a pipeline that DVC found up to date these figures are all
``rdn compare`` has.

Tracking never stops a pipeline: if the server is down these functions warn and return
``None``/``False``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from rdn.config import TrackingConfig
from rdn.tracking.client import (MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS, MAX_PARAMS_PER_BATCH, PIPELINE_KIND,
                                 experiment_id_for, fast_fail_http, mlflow_client, resolve_tracking_uri,
                                 tracking_home)

log = logging.getLogger(__name__)

REPORT_SUFFIXES = (".md", ".png", ".svg", ".html", ".json")


def _warn(what: str, uri: str | None, e: Exception) -> None:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    log.warning("MLflow at %s: could not %s (%s: %s); the pipeline continues without it",
                uri, what, type(e).__name__, first)


def start_parent_run(tracking_cfg: TrackingConfig, tags: Mapping[str, Any], root: Path,
                     run_name: str = "pipeline", params: Mapping[str, Any] | None = None) -> str | None:
    """Create the pipeline's parent run; returns its id, or None (tracking off or unreachable)."""
    if not tracking_cfg.enabled:
        return None
    uri = resolve_tracking_uri(tracking_cfg, Path(root))
    try:
        with fast_fail_http(tracking_cfg.timeout_s):
            client = mlflow_client(uri)
            experiment_id = experiment_id_for(client, tracking_cfg.experiment, tracking_home(Path(root)), uri)
            all_tags = {"mlflow.runName": run_name, "rdn.kind": PIPELINE_KIND}
            all_tags.update({k: str(v) for k, v in tags.items() if v is not None})
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            if params:
                from mlflow.entities import Param

                items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
                for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                    client.log_batch(run.info.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
            log.info("MLflow parent run %s at %s", run.info.run_id, uri)
            return run.info.run_id
    except Exception as e:  # noqa: BLE001 -- tracking never stops the pipeline
        _warn("start the pipeline run", uri, e)
        return None


def metrics_summary(root: Path, files: Iterable[str | Path] | None = None) -> dict[str, float]:
    """Every finite number in ``metrics/*.json`` as ``<file>/<key>/<subkey>`` (eval.json first).

    ``files`` (paths relative to ``root``, e.g. the ``metrics:`` entries dvc.yaml declares for
    the stages that completed) limits the summary to those files: a metrics file left by an
    earlier run of a stage this pipeline did not reach is not this pipeline's figure."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            out[prefix] = float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(float(value)):
                out[prefix] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)

    root = Path(root)
    if files is None:
        paths = list((root / "metrics").glob("*.json"))
    else:
        paths = [root / f for f in files if str(f).endswith(".json") and (root / f).is_file()]
    for path in sorted(paths, key=lambda p: (p.stem != "eval", p.stem)):
        try:
            walk(path.stem, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            log.warning("skipping %s in the metrics summary: %s", path, e)
    return {k.replace(" ", "_"): v for k, v in out.items()}


def report_artifacts(root: Path, files: Iterable[str | Path] | None = None,
                     report: bool = True) -> list[tuple[Path, str]]:
    """(path, artifact folder) pairs for the parent run: metrics JSON (all of ``metrics/``, or
    ``files``), and with ``report`` the report and its plots."""
    root = Path(root)
    if files is None:
        metrics = sorted((root / "metrics").glob("*.json"))
    else:
        metrics = sorted(root / f for f in files if str(f).endswith(".json") and (root / f).is_file())
    items = [(p, "metrics") for p in metrics]
    reports = root / "reports"
    if report and reports.is_dir():
        items += [(p, "report") for p in sorted(reports.iterdir())
                  if p.is_file() and p.suffix.lower() in REPORT_SUFFIXES]
    return items


def finish_parent_run(run_id: str | None, status: str, metrics: Mapping[str, float] | None = None,
                      artifact_paths: Iterable[tuple[Path, str] | Path] = (), tags: Mapping[str, Any] | None = None,
                      tracking_cfg: TrackingConfig | None = None, root: Path | None = None) -> bool:
    """Log the summary metrics, tags and artifacts, then close the run with ``status``
    (FINISHED/FAILED/KILLED). Returns False (after a warning) when MLflow is unreachable."""
    if not run_id:
        return False
    cfg = tracking_cfg or TrackingConfig()
    uri = resolve_tracking_uri(cfg, Path(root or os.getcwd()))
    ok = True
    try:
        with fast_fail_http(cfg.timeout_s):
            client = mlflow_client(uri)
            now = int(time.time() * 1000)
            if tags:
                for k, v in tags.items():
                    client.set_tag(run_id, k, str(v))
            if metrics:
                from mlflow.entities import Metric

                items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
                for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                    client.log_batch(run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])
            for item in artifact_paths:
                path, folder = item if isinstance(item, tuple) else (item, None)
                if Path(path).exists():
                    try:
                        client.log_artifact(run_id, str(path), folder)
                    except Exception as e:  # noqa: BLE001 -- keep closing the run
                        ok = False
                        _warn(f"upload {path}", uri, e)
            client.set_terminated(run_id, status)
    except Exception as e:  # noqa: BLE001
        _warn("finish the pipeline run", uri, e)
        return False
    return ok
