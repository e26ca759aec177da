"""The MLflow client and what every tracking module shares: where the store is, short
HTTP timeouts, the experiment lookup, MLflow's batch limits.

:func:`mlflow_client` is the one client factory of rdn (stage runs, their replay, the
pipeline's parent run, ``rdn compare``). Nothing here imports MLflow at module level.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from rdn.config import TrackingConfig
from rdn.io import project_root

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
HEALTH_TIMEOUT_S = 2.0
DVC_EXP_KIND = "dvc-exp"
"""``rdn.kind`` tag of the parent run that groups the stages of one DVC experiment."""
PIPELINE_KIND = "pipeline"
"""``rdn.kind`` tag of the parent run a Prefect pipeline run opens."""


def tracking_home(root: Path | None = None) -> Path:
    """Directory holding the default store and ``unsent/``: ``<project>/mlflow``.

    Inside a DVC experiment (``DVC_EXP_NAME`` set) the project is ``DVC_ROOT``, the repo
    the experiment was queued from, not the executor's temporary copy."""
    if os.environ.get("DVC_EXP_NAME") and os.environ.get("DVC_ROOT") and Path(os.environ["DVC_ROOT"]).is_dir():
        return Path(os.environ["DVC_ROOT"]).resolve() / "mlflow"
    return (root or project_root()) / "mlflow"


def resolve_tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else a sqlite file in the project."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    db = tracking_home(root) / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


@contextlib.contextmanager
def fast_fail_http(timeout_s: float) -> Any:
    """Short MLflow HTTP timeouts/retries for the duration (a user's own values win)."""
    saved = {k: os.environ.get(k) for k in _HTTP_ENV}
    for key, value in {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s))),
                       "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _quiet_mlflow() -> None:
    for noisy in ("alembic", "mlflow", "urllib3"):  # after import: mlflow sets its own levels
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # urllib3's "Retrying ..." line per failed request repeats what our one warning says
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri``, with MLflow's and its libraries' chatter turned down."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    return MlflowClient(tracking_uri=uri)


def backend_answers(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Cheap liveness check: ``GET /health`` for HTTP servers; local stores always 'answer'."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def experiment_id_for(client, name: str, home: Path | None, uri: str) -> str:
    """Id of experiment ``name``, created if missing (artifacts next to a sqlite store)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if home is not None and uri.startswith("sqlite:"):
        location = (home / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another stage created it between our lookup and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
