"""The one place that talks to MLflow.

A :class:`StageRun` is one MLflow run per stage execution, named after the stage. It
nests under a pipeline's parent run when ``RDN_MLFLOW_PARENT_RUN_ID`` is set (the
Prefect flow sets it); otherwise it stands alone. Metrics are buffered and sent with
``log_batch`` (one sqlite write costs ~15 ms, so one call per value would dominate a
fast training step).

Tracking must never stop work: if the backend is unreachable or fails mid-run the
stage warns once, keeps going, and appends everything it could not send to a local
JSONL file under ``mlflow/unsent/`` so no figure is silently lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from rdn.config import TrackingConfig
from rdn.io import git_sha, project_root

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "RDN_MLFLOW_PARENT_RUN_ID"
_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


def resolve_tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else a sqlite file in the project."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    db = (root or project_root()) / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class StageRun:
    """Context manager around one MLflow run; every call is safe when tracking is off or down."""

    def __init__(self, stage: str, cfg: TrackingConfig, run_name_tag: str = "", root: Path | None = None):
        self.stage, self.cfg = stage, cfg
        self.root = root or project_root()
        self.run_name_tag = run_name_tag
        self.client = None
        self.run_id: str | None = None
        self.uri: str | None = None
        self._buffer: list[tuple[str, float, int, int]] = []  # key, value, timestamp ms, step
        self._unsent_path: Path | None = None
        self._warned = False
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle
    def __enter__(self) -> "StageRun":
        if not self.cfg.enabled:
            return self
        self.uri = resolve_tracking_uri(self.cfg, self.root)
        # Fail fast instead of MLflow's default minutes of retries when a server is away;
        # set for this run only (a user's own values win) and restored on exit.
        self._saved_env = {k: os.environ.get(k) for k in _HTTP_ENV}
        for key, value in {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, self.cfg.timeout_s))),
                           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self._guard("start the run", self._start)
        return self

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        for noisy in ("alembic", "mlflow", "urllib3"):  # after import: mlflow sets its own levels
            logging.getLogger(noisy).setLevel(logging.WARNING)
        client = MlflowClient(tracking_uri=self.uri)
        parent = os.environ.get(PARENT_RUN_ENV)
        tags = {"mlflow.runName": self.stage, "rdn.stage": self.stage, "rdn.run_name": self.run_name_tag}
        sha = git_sha(self.root)
        if sha:
            tags["mlflow.source.git.commit"] = sha
        if parent:
            experiment_id = client.get_run(parent).info.experiment_id
            tags["mlflow.parentRunId"] = parent
        else:
            experiment_id = self._experiment_id(client)
        run = client.create_run(experiment_id, run_name=self.stage, tags=tags)
        self.client, self.run_id = client, run.info.run_id
        log.info("MLflow run %s (%s) at %s", self.run_id, self.stage, self.uri)

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri and self.uri.startswith("sqlite:"):
            location = (self.root / "mlflow" / "artifacts").as_uri()
        try:
            return client.create_experiment(self.cfg.experiment, artifact_location=location)
        except Exception:  # another stage created it between our lookup and create
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flush()
        if self.client is not None and self.run_id is not None:
            status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            self._guard("close the run", lambda: self.client.set_terminated(self.run_id, status))
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    # -- failure handling
    def _guard(self, what: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 -- any tracking failure must not stop training
            if not self._warned:
                self._warned = True
                log.warning("MLflow tracking at %s failed to %s (%s: %s); continuing without tracking. "
                            "Unsent metrics go to %s", self.uri, what, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "", self._unsent_file())
            self.client = None
            return False

    def _unsent_file(self) -> Path:
        if self._unsent_path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self._unsent_path = self.root / "mlflow" / "unsent" / f"{self.stage}-{stamp}-{os.getpid()}.jsonl"
        return self._unsent_path

    def _spill(self, records: list[dict[str, Any]]) -> None:
        if not self.cfg.enabled or not records:
            return
        path = self._unsent_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    # -- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:_MAX_PARAM_CHARS]
                for k, v in flatten(params).items()}
        if not self.active:
            self._spill([{"params": flat}])
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            chunk = items[i:i + _MAX_PARAMS_PER_BATCH]
            if not self._guard("log params", lambda c=chunk: self.client.log_batch(self.run_id, params=c)):
                self._spill([{"params": {p.key: p.value for p in items[i:]}}])
                return

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for k, v in tags.items():
                if not self._guard("set a tag", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v))):
                    return

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, flush: bool = False) -> None:
        """Buffer metrics; they are sent every ``_MAX_METRICS_PER_BATCH`` values or on flush()."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._buffer.append((key, float(value), now, int(step)))
        if flush or len(self._buffer) >= _MAX_METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        buffered, self._buffer = self._buffer, []
        if not buffered:
            return
        if self.active:
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, s) for k, v, ts, s in buffered]
            for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
                chunk = metrics[i:i + _MAX_METRICS_PER_BATCH]
                if not self._guard("log metrics", lambda c=chunk: self.client.log_batch(self.run_id, metrics=c)):
                    buffered = buffered[i:]
                    break
            else:
                return
        self._spill([{"key": k, "value": v, "timestamp": ts, "step": s} for k, v, ts, s in buffered])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._guard(f"upload {path}", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))
