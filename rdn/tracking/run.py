"""The one place that talks to MLflow.

A :class:`StageRun` is one MLflow run per stage execution, named after the stage. It
nests under a pipeline's parent run when ``RDN_MLFLOW_PARENT_RUN_ID`` is set (the
Prefect flow sets it). Inside a DVC experiment (``dvc exp run``, which sets
``DVC_EXP_NAME``) without such a parent, the stages of one experiment share a parent
run named after it, so each sweep variant is one row in the MLflow UI and in
``rdn compare``. Otherwise the run stands alone. Metrics are buffered and sent with
``log_batch`` (one sqlite write costs ~15 ms, so one call per value would dominate a
fast training step).

Tracking must never stop work, and no figure may be lost:

* every MLflow HTTP call has a short timeout and one retry (``tracking.timeout_s``),
  so a dead server costs seconds, not MLflow's default minutes of retries;
* on the first failure the stage warns once and carries on; everything it could not
  send (metrics, params, tags, copies of artifacts, the run's final status) is appended
  to ``mlflow/unsent/<stage>-<time>-<pid>.jsonl``, whose first line names the run, the
  tracking URI and the parent;
* while down, the run probes the backend now and then (30 s, doubling to 5 min, and once
  more when the stage ends); when it answers, the spilled records are replayed into the
  same run and live logging resumes;
* what is still unsent when the stage ends is replayed automatically by the next stage
  run that reaches the same tracking URI, or by hand with ``rdn tracking flush``.
  Replayed files move to ``mlflow/unsent/sent/``. Replaying twice is harmless: MLflow
  drops metric values it already has.

Inside a DVC experiment workspace (a temporary copy of the project) the default store
and the spill directory are those of the project the experiment was started from
(``DVC_ROOT``), so nothing is left behind in a deleted temp dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from rdn.config import TrackingConfig
from rdn.io import git_sha, project_root

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "RDN_MLFLOW_PARENT_RUN_ID"
_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
_MAX_PARAMS_PER_BATCH = 100
_MAX_TAGS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
RECONNECT_FIRST_S = 30.0
"""Seconds after a failure before the first probe of the backend; doubles up to RECONNECT_MAX_S."""
RECONNECT_MAX_S = 300.0
HEALTH_TIMEOUT_S = 2.0
DVC_EXP_KIND = "dvc-exp"


# --------------------------------------------------------------------------- locations

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


def _client(uri: str):
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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def dvc_experiment_parent(client, experiment_id: str, name: str, baseline: str) -> str:
    """The parent run grouping the stages of DVC experiment ``name`` (created on first use)."""
    found = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`rdn.kind` = '{DVC_EXP_KIND}' and tags.`rdn.dvc_exp` = '{_escape(name)}'"
                       f" and tags.`rdn.dvc_baseline` = '{_escape(baseline)}'"))
    if found:
        return found[0].info.run_id
    tags = {"rdn.kind": DVC_EXP_KIND, "rdn.dvc_exp": name, "rdn.dvc_baseline": baseline,
            "mlflow.note.content": f"DVC experiment {name} (baseline {baseline[:12]}); one child run per stage"}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


# --------------------------------------------------------------------------- the stage run

class StageRun:
    """Context manager around one MLflow run; every call is safe when tracking is off or down."""

    def __init__(self, stage: str, cfg: TrackingConfig, run_name_tag: str = "", root: Path | None = None):
        self.stage, self.cfg = stage, cfg
        self.root = root or project_root()
        self.home = tracking_home(self.root)
        self.run_name_tag = run_name_tag
        self.client = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self.tags: dict[str, str] = {}
        self.start_time = int(time.time() * 1000)
        self._buffer: list[tuple[str, float, int, int]] = []  # key, value, timestamp ms, step
        self._unsent_path: Path | None = None
        self._warned = False
        self._retry_s = RECONNECT_FIRST_S
        self._next_probe = float("inf")
        self._http = contextlib.ExitStack()
        self._dvc_parent = False
        self._sha: str | None = None
        self.replayed: list[ReplayResult] = []

    # -- lifecycle
    def __enter__(self) -> "StageRun":
        if not self.cfg.enabled:
            return self
        self.uri = resolve_tracking_uri(self.cfg, self.root)
        # Fail fast instead of MLflow's default minutes of retries when a server is away;
        # set for this run only (a user's own values win) and restored on exit.
        self._http.enter_context(fast_fail_http(self.cfg.timeout_s))
        if self._guard("start the run", self._start):
            self._replay_others()
        return self

    def _start(self) -> None:
        client = _client(self.uri)
        parent = os.environ.get(PARENT_RUN_ENV) or None
        tags = self._base_tags()
        dvc_exp = os.environ.get("DVC_EXP_NAME")
        if parent:
            experiment_id = client.get_run(parent).info.experiment_id
        else:
            experiment_id = experiment_id_for(client, self.cfg.experiment, self.home, self.uri)
            if dvc_exp:
                parent = dvc_experiment_parent(client, experiment_id, dvc_exp,
                                               os.environ.get("DVC_EXP_BASELINE_REV", ""))
                client.update_run(parent, status="RUNNING")
                self._dvc_parent = True
        if parent:
            tags["mlflow.parentRunId"] = parent
        self.tags, self.parent_run_id, self.experiment_id = tags, parent, experiment_id
        if self.run_id is None:
            run = client.create_run(experiment_id, run_name=self.stage, tags=tags, start_time=self.start_time)
            self.run_id = run.info.run_id
            log.info("MLflow run %s (%s) at %s", self.run_id, self.stage, self.uri)
        self.client = client

    def _base_tags(self) -> dict[str, str]:
        tags = {"mlflow.runName": self.stage, "rdn.stage": self.stage, "rdn.run_name": self.run_name_tag}
        if self._sha is None:
            self._sha = git_sha(self.root) or ""
        sha = self._sha
        if sha:
            tags["mlflow.source.git.commit"] = sha
        if os.environ.get("DVC_EXP_NAME"):
            tags["rdn.dvc_exp"] = os.environ["DVC_EXP_NAME"]
        return tags

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            if self.cfg.enabled:
                self._probe(force=True)
            self.flush()
            end_time = int(time.time() * 1000)
            closed = False
            if self.active:
                closed = self._guard("close the run", lambda: self.client.set_terminated(self.run_id, status, end_time))
                if closed and self._dvc_parent and self.parent_run_id:
                    self._guard("close the DVC experiment's run", lambda: self.client.set_terminated(
                        self.parent_run_id, status, end_time))
            if not closed and self._unsent_path is not None:
                self._spill([{"end": {"status": status, "end_time": end_time}}])
            if self._unsent_path is not None and self._unsent_path.exists():
                log.warning("MLflow: %s kept in %s; they are sent by the next stage that reaches %s, "
                            "or now with `rdn tracking flush`", _describe_file(self._unsent_path),
                            self._unsent_path, self.uri)
        finally:
            self._http.close()

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
                log.warning("MLflow tracking at %s failed to %s (%s: %s); training continues. Unsent "
                            "metrics go to %s and are retried", self.uri, what, type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "", self._unsent_file())
            if self.client is not None or self._next_probe == float("inf"):
                self._next_probe = time.monotonic() + self._retry_s
            self.client = None
            return False

    def _probe(self, force: bool = False) -> None:
        """While down, try the backend again (on schedule, or now if ``force``); on success replay
        what this run spilled and resume live logging."""
        if self.active or not self.cfg.enabled or self.uri is None:
            return
        if not force and time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, RECONNECT_MAX_S)
        if not backend_answers(self.uri, min(HEALTH_TIMEOUT_S, self.cfg.timeout_s)):
            return
        try:
            self._start()  # creates the run if the first attempt failed; otherwise just reconnects
            if self._unsent_path is not None and self._unsent_path.exists():
                result = replay_file(self._unsent_path, self.home, client=self.client, run_id=self.run_id,
                                     terminate=False)
                self.replayed.append(result)
                if not result.ok:
                    raise RuntimeError(result.error)
                log.warning("MLflow at %s is back: replayed %s into run %s; live logging resumes", self.uri,
                            result.summary(), self.run_id)
                self._unsent_path = None
            self._warned = False  # a later outage warns again
            self._retry_s = RECONNECT_FIRST_S
        except Exception as e:  # noqa: BLE001
            log.info("MLflow at %s still unusable (%s: %s)", self.uri, type(e).__name__, str(e)[:200])
            self.client = None

    def _replay_others(self) -> None:
        """Send what earlier stages (or runs) spilled for this tracking URI."""
        try:
            for path in pending_files(self.home):
                if path == self._unsent_path:
                    continue
                result = replay_file(path, self.home, uri=self.uri, only_uri=self.uri)
                if result.skipped:
                    continue
                self.replayed.append(result)
                if result.ok:
                    log.warning("MLflow: replayed %s from %s into run %s", result.summary(), path.name, result.run_id)
                else:
                    log.warning("MLflow: could not replay %s (%s); kept for `rdn tracking flush`", path, result.error)
        except Exception as e:  # noqa: BLE001 -- replay is best effort; this stage's own run matters more
            log.warning("MLflow: replay of %s failed (%s: %s)", self.home / "unsent", type(e).__name__, e)

    def _unsent_file(self) -> Path:
        if self._unsent_path is None:
            now = time.time()
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}"
            self._unsent_path = self.home / "unsent" / f"{self.stage}-{stamp}-{os.getpid()}.jsonl"
        return self._unsent_path

    def _spill(self, records: list[dict[str, Any]]) -> None:
        if not self.cfg.enabled or not records:
            return
        path = self._unsent_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                header = {"run_id": self.run_id, "uri": self.uri, "stage": self.stage,
                          "experiment": self.cfg.experiment, "parent_run_id": self.parent_run_id
                          or os.environ.get(PARENT_RUN_ENV) or None,
                          "tags": self.tags or self._base_tags(),
                          "start_time": self.start_time, "pid": os.getpid(), "host": socket.gethostname()}
                f.write(json.dumps({"run": header}) + "\n")
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    # -- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:_MAX_PARAM_CHARS]
                for k, v in flatten(params).items()}
        self._probe()
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
        tags = {k: str(v) for k, v in tags.items()}
        self._probe()
        if not self.active:
            self._spill([{"tags": tags}])
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        if not self._guard("set tags", lambda: self.client.log_batch(self.run_id, tags=items)):
            self._spill([{"tags": tags}])

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
        self._probe()
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
        path = Path(path)
        if not self.cfg.enabled or not path.exists():
            return
        self._probe()
        if self.active and self._guard(f"upload {path}",
                                       lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)):
            return
        # keep a copy: the stage may rewrite the file before the backend is back
        spill = self._unsent_file()
        side = _sidecar(spill)
        side.mkdir(parents=True, exist_ok=True)
        n = len(list(side.iterdir()))
        dest = side / f"{n:04d}" / path.name
        dest.parent.mkdir()
        if path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copy2(path, dest)
        self._spill([{"artifact": f"{n:04d}/{path.name}", "artifact_path": artifact_path}])


# --------------------------------------------------------------------------- replay

@dataclass
class ReplayResult:
    path: Path
    run_id: str | None = None
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    status: str | None = None
    ok: bool = False
    skipped: str | None = None
    error: str | None = None
    conflicts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.metrics} metric values", f"{self.params} params"]
        if self.tags:
            parts.append(f"{self.tags} tags")
        if self.artifacts:
            parts.append(f"{self.artifacts} artifacts")
        if self.status:
            parts.append(f"status {self.status}")
        return ", ".join(parts)


def _sidecar(spill: Path) -> Path:
    return spill.with_name(spill.stem + ".artifacts")


def read_spill(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, records) of a spill file; a torn last line (crash mid-write) is ignored."""
    header, records = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "run" in rec and header is None:
            header = rec["run"]
        else:
            records.append(rec)
    return header, records


def _describe_file(path: Path) -> str:
    try:
        _, records = read_spill(path)
    except OSError:
        return "unsent records"
    n = sum("key" in r for r in records)
    steps = sorted({r["step"] for r in records if "key" in r})
    span = f" (steps {steps[0]}..{steps[-1]})" if steps else ""
    return f"{n} unsent metric values{span}"


_CLAIM = ".replaying-"


def pending_files(home: Path) -> list[Path]:
    """Spill files waiting to be sent, oldest first. A file claimed by a replay whose process
    died (``<name>.jsonl.replaying-<pid>``) is put back first."""
    folder = home / "unsent"
    if not folder.is_dir():
        return []
    for claimed in folder.glob(f"*.jsonl{_CLAIM}*"):
        pid = claimed.name.rpartition(_CLAIM)[2]
        if not (pid.isdigit() and _process_alive(int(pid))):
            with contextlib.suppress(OSError):
                os.replace(claimed, claimed.with_name(claimed.name.rpartition(_CLAIM)[0]))
    files = []
    for p in folder.glob("*.jsonl"):
        with contextlib.suppress(OSError):
            files.append((p.stat().st_mtime, p.name, p))
    return [p for *_, p in sorted(files)]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replay_file(path: Path, home: Path, *, client=None, uri: str | None = None, run_id: str | None = None,
                only_uri: str | None = None, terminate: bool = True) -> ReplayResult:
    """Send one spill file to MLflow; on success move it (and its artifact copies) to ``unsent/sent/``.

    ``client``/``uri`` default to the URI recorded in the file; ``run_id`` overrides the
    recorded run (a live StageRun replaying its own spill). A run that never got created
    (or is unknown to the target store) is created now with the recorded name, tags,
    parent and start time, and its id is written back into the file first, so an
    interrupted replay never creates it twice. ``only_uri`` skips files recorded for
    another store. Files of a process that is still running are skipped unless it is
    this one."""
    result = ReplayResult(path)
    try:
        header, records = read_spill(path)
    except OSError as e:
        result.error = str(e)
        return result
    if header is None:
        result.skipped = "no run header (written by an older rdn); inspect by hand"
        return result
    if only_uri is not None and header.get("uri") != only_uri:
        result.skipped = f"recorded for {header.get('uri')}"
        return result
    mine = header.get("pid") == os.getpid() and header.get("host") == socket.gethostname()
    ended = any("end" in r for r in records)
    if (not mine and not ended and header.get("host") == socket.gethostname()
            and isinstance(header.get("pid"), int) and _process_alive(header["pid"])):
        result.skipped = f"process {header['pid']} is still writing it"
        return result
    target_uri = uri or header.get("uri")
    spill = path
    if not mine:  # claim it, so two stages starting together do not both replay it
        spill = path.with_name(f"{path.name}{_CLAIM}{os.getpid()}")
        try:
            os.rename(path, spill)
        except OSError:
            result.skipped = "being replayed by another process"
            return result
    try:
        ok = _replay(spill, path, header, records, home, result, client, target_uri, run_id, terminate)
    finally:
        if spill != path and spill.exists():
            os.replace(spill, path)  # not sent (or sent and moved): give the name back
    if ok:
        sent = path.parent / "sent"
        sent.mkdir(parents=True, exist_ok=True)
        os.replace(path, sent / path.name)
        if _sidecar(path).exists():
            shutil.move(str(_sidecar(path)), str(sent / _sidecar(path).name))
        result.ok = True
    return result


def _replay(spill: Path, path: Path, header: dict[str, Any], records: list[dict[str, Any]], home: Path,
            result: ReplayResult, client, target_uri: str, run_id: str | None, terminate: bool) -> bool:
    from mlflow.entities import Metric, RunTag

    try:
        if client is None:
            client = _client(target_uri)
        rid = run_id or header.get("run_id")
        if rid is not None and run_id is None:
            try:
                client.get_run(rid)
            except Exception as e:  # noqa: BLE001
                if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(e, "error_code", "")) and \
                        "not found" not in str(e).lower():
                    raise
                header.setdefault("replaced_run_id", rid)
                rid = None
        if rid is None:
            parent = header.get("parent_run_id")
            tags = dict(header.get("tags") or {})
            if parent:
                try:
                    experiment_id = client.get_run(parent).info.experiment_id
                    tags["mlflow.parentRunId"] = parent
                except Exception:  # noqa: BLE001 -- parent unknown here: keep the run, unnested
                    parent = None
            if not parent:
                tags.pop("mlflow.parentRunId", None)
                experiment_id = experiment_id_for(client, header.get("experiment") or "rdn", home, target_uri)
            tags["rdn.replayed"] = "true"
            if header.get("replaced_run_id"):
                tags["rdn.replayed_from"] = header["replaced_run_id"]
            run = client.create_run(experiment_id, run_name=header.get("stage"), tags=tags,
                                    start_time=header.get("start_time"))
            rid = run.info.run_id
            header["run_id"] = rid
            if header.get("uri") == target_uri or header.get("uri") is None:
                _rewrite_header(spill, header)
        result.run_id = rid

        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        metrics: list[Metric] = []
        artifacts: list[tuple[str, str | None]] = []
        end = None
        for rec in records:
            if "key" in rec:
                metrics.append(Metric(rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"])))
            elif "params" in rec:
                params.update(rec["params"])
            elif "tags" in rec:
                tags.update(rec["tags"])
            elif "artifact" in rec:
                artifacts.append((rec["artifact"], rec.get("artifact_path")))
            elif "end" in rec:
                end = rec["end"]
        _log_params(client, rid, params, result)
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(tag_items), _MAX_TAGS_PER_BATCH):
            client.log_batch(rid, tags=tag_items[i:i + _MAX_TAGS_PER_BATCH])
        result.tags = len(tag_items)
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            client.log_batch(rid, metrics=metrics[i:i + _MAX_METRICS_PER_BATCH])
        result.metrics = len(metrics)
        side = _sidecar(path)
        for name, artifact_path in artifacts:
            src = side / name
            if src.is_dir():
                client.log_artifacts(rid, str(src), artifact_path)
            elif src.exists():
                client.log_artifact(rid, str(src), artifact_path)
            result.artifacts += 1
        if terminate and end is not None:
            if client.get_run(rid).info.status == "RUNNING":
                client.set_terminated(rid, end.get("status", "FINISHED"), end.get("end_time"))
                result.status = end.get("status", "FINISHED")
            parent = header.get("parent_run_id")
            if parent and header.get("tags", {}).get("rdn.dvc_exp"):
                with contextlib.suppress(Exception):
                    prun = client.get_run(parent)
                    if prun.data.tags.get("rdn.kind") == DVC_EXP_KIND and prun.info.status == "RUNNING":
                        client.set_terminated(parent, end.get("status", "FINISHED"), end.get("end_time"))
    except Exception as e:  # noqa: BLE001
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return False
    return True


def _log_params(client, run_id: str, params: Mapping[str, str], result: ReplayResult) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        chunk = items[i:i + _MAX_PARAMS_PER_BATCH]
        try:
            client.log_batch(run_id, params=chunk)
            result.params += len(chunk)
        except Exception:  # noqa: BLE001 -- one conflicting value (already logged differently) fails the batch
            existing = client.get_run(run_id).data.params
            for p in chunk:
                if p.key in existing:
                    if existing[p.key] != p.value:
                        result.conflicts.append(p.key)
                    continue
                client.log_batch(run_id, params=[p])
                result.params += 1


def _rewrite_header(path: Path, header: dict[str, Any]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        with contextlib.suppress(json.JSONDecodeError):
            if "run" in json.loads(line):
                lines[i] = json.dumps({"run": header}) + "\n"
                break
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def flush_pending(home: Path, uri: str | None = None, timeout_s: float = 10.0,
                  paths: Iterable[Path] | None = None) -> list[ReplayResult]:
    """Replay every pending spill file (``rdn tracking flush``); ``uri`` overrides the recorded one."""
    results = []
    with fast_fail_http(timeout_s):
        for path in (list(paths) if paths is not None else pending_files(home)):
            results.append(replay_file(path, home, uri=uri))
    return results
