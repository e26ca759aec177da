"""The live MLflow run of one stage.

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
  run that reaches the same tracking URI, or by hand with ``rdn tracking flush``
  (:mod:`rdn.tracking.replay` reads and sends spill files). Replayed files move to
  ``mlflow/unsent/sent/``. Replaying twice is harmless: MLflow drops metric values it
  already has.

Inside a DVC experiment workspace (a temporary copy of the project) the default store
and the spill directory are those of the project the experiment was started from
(``DVC_ROOT``), so nothing is left behind in a deleted temp dir.

With ``tracking.tensorboard: true`` every metric the run logs (same key, value, step and
wall time) is also written to TensorBoard event files (:class:`TensorBoardMirror`), with
or without MLflow, so ``tensorboard --logdir runs`` shows one line per stage run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Mapping

from rdn.config import TrackingConfig
from rdn.io import git_sha, project_root
from rdn.tracking.client import (DVC_EXP_KIND, HEALTH_TIMEOUT_S, MAX_METRICS_PER_BATCH, MAX_PARAM_CHARS,
                                 MAX_PARAMS_PER_BATCH, backend_answers, experiment_id_for, fast_fail_http,
                                 mlflow_client, resolve_tracking_uri, tracking_home)
from rdn.tracking.replay import ReplayResult, artifact_dir, describe_spill, pending_files, replay_file

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "RDN_MLFLOW_PARENT_RUN_ID"
RECONNECT_FIRST_S = 30.0
"""Seconds after a failure before the first probe of the backend; doubles up to RECONNECT_MAX_S."""
RECONNECT_MAX_S = 300.0


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


# --------------------------------------------------------------------------- TensorBoard

TENSORBOARD_DIR = "runs"
"""Folder, in the project root, of the TensorBoard event files (``tensorboard --logdir runs``)."""


def _path_part(text: str) -> str:
    """``text`` as one safe path component (no separators, no leading dot)."""
    return re.sub(r"[^A-Za-z0-9._@+=-]+", "_", text).lstrip(".") or "_"


def tensorboard_group(run_name: str) -> str:
    """Folder of one pipeline run under ``runs/``: ``run.name``, then ``@<DVC experiment>``
    inside ``dvc exp run`` (each experiment its own folder), else ``@<first 8 characters of
    the parent run id>`` under a Prefect flow's MLflow parent run, else nothing more."""
    group = run_name or "rdn"
    if os.environ.get("DVC_EXP_NAME"):
        group += "@" + os.environ["DVC_EXP_NAME"]
    elif os.environ.get(PARENT_RUN_ENV):
        group += "@" + os.environ[PARENT_RUN_ENV][:8]
    return _path_part(group)


def tensorboard_home(root: Path | None = None) -> Path:
    """``<project>/runs``; inside a DVC experiment the project it was started from (``DVC_ROOT``),
    like the MLflow store, so a temporary workspace takes nothing away."""
    return tracking_home(root).parent / TENSORBOARD_DIR


def is_rank_zero() -> bool:
    """True unless torchrun started this process as a rank other than 0 (``RANK``)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _markdown_table(params: Mapping[str, str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = "\n".join(f"| {cell(k)} | {cell(v)} |" for k, v in params.items())
    return "| param | value |\n|---|---|\n" + rows


class TensorBoardMirror:
    """TensorBoard event files of one stage run: ``runs/<group>/<stage>`` (see
    :func:`tensorboard_group`); a stage run again in the same group gets ``<stage>-2``,
    ``<stage>-3``..., so each execution is its own line, as each is its own MLflow run.

    Metrics become scalars (TensorBoard stores them as float32; MLflow keeps the doubles).
    Params become markdown tables in the text tab, one tag per top-level section
    (``params/model``, ``params/hardware``...), each written once when it is logged.
    Like MLflow tracking it never stops a stage: the first failure (the ``tensorboard``
    package missing, a full disk) warns once and the mirror turns itself off."""

    def __init__(self, stage: str, run_name: str, root: Path | None = None):
        self.writer = None
        self.log_dir: Path | None = None
        self._text_steps: dict[str, int] = {}
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            group = tensorboard_home(root) / tensorboard_group(run_name)
            group.mkdir(parents=True, exist_ok=True)
            name, n = _path_part(stage), 1
            while True:  # claim a fresh folder (atomic, so concurrent runs never share one)
                try:
                    (group / name).mkdir()
                    break
                except FileExistsError:
                    n += 1
                    name = f"{_path_part(stage)}-{n}"
            self.log_dir = group / name
            self.writer = SummaryWriter(log_dir=str(self.log_dir), max_queue=1000, flush_secs=30)
            log.info("TensorBoard events of %s in %s", stage, self.log_dir)
        except Exception as e:  # noqa: BLE001 -- TensorBoard is a convenience; training goes on
            self._fail("open", e)

    def _fail(self, what: str, e: Exception) -> None:
        log.warning("TensorBoard: could not %s %s (%s: %s); this stage goes on without TensorBoard events",
                    what, self.log_dir or TENSORBOARD_DIR, type(e).__name__, str(e)[:200])
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def scalars(self, records: list[tuple[str, float, int, int]]) -> None:
        """``(key, value, timestamp ms, step)`` records, as :meth:`StageRun.log_metrics` buffers them."""
        if self.writer is None:
            return
        try:
            for key, value, ts, step in records:
                self.writer.add_scalar(key, value, global_step=step, walltime=ts / 1000.0)
        except Exception as e:  # noqa: BLE001
            self._fail("write to", e)

    def params(self, flat: Mapping[str, str]) -> None:
        if self.writer is None or not flat:
            return
        sections: dict[str, dict[str, str]] = {}
        for key, value in flat.items():
            sections.setdefault(key.split(".", 1)[0], {})[key] = value
        try:
            for section, items in sections.items():
                tag = f"params/{section}"
                step = self._text_steps.get(tag, 0)
                self._text_steps[tag] = step + 1
                self.writer.add_text(tag, _markdown_table(items), global_step=step)
        except Exception as e:  # noqa: BLE001
            self._fail("write to", e)

    def flush(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except Exception as e:  # noqa: BLE001
            self._fail("flush", e)

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001
            self._fail("close", e)


# --------------------------------------------------------------------------- the stage run

class StageRun:
    """Context manager around one MLflow run; every call is safe when tracking is off or down.

    ``cfg.tensorboard`` also mirrors the run's metrics and params to TensorBoard
    (:class:`TensorBoardMirror`, rank 0 only), whether or not ``cfg.enabled``; the writer
    opens on entry, is flushed by :meth:`flush` and closed on exit."""

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
        self.tensorboard: TensorBoardMirror | None = None

    # -- lifecycle
    def __enter__(self) -> "StageRun":
        if self.cfg.tensorboard and is_rank_zero():
            self.tensorboard = TensorBoardMirror(self.stage, self.run_name_tag, self.root)
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
        client = mlflow_client(self.uri)
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
                            "or now with `rdn tracking flush`", describe_spill(self._unsent_path),
                            self._unsent_path, self.uri)
        finally:
            self._http.close()
            if self.tensorboard is not None:
                self.tensorboard.close()

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
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:MAX_PARAM_CHARS]
                for k, v in flatten(params).items()}
        if self.tensorboard is not None:
            self.tensorboard.params(flat)
        self._probe()
        if not self.active:
            self._spill([{"params": flat}])
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i:i + MAX_PARAMS_PER_BATCH]
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
        """Buffer metrics; they are sent every ``MAX_METRICS_PER_BATCH`` values or on flush()."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self._buffer.append((key, float(value), now, int(step)))
        if flush or len(self._buffer) >= MAX_METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        buffered, self._buffer = self._buffer, []
        if self.tensorboard is not None:
            self.tensorboard.scalars(buffered)
            self.tensorboard.flush()
        if not buffered:
            return
        self._probe()
        if self.active:
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, s) for k, v, ts, s in buffered]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[i:i + MAX_METRICS_PER_BATCH]
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
        side = artifact_dir(spill)
        side.mkdir(parents=True, exist_ok=True)
        n = len(list(side.iterdir()))
        dest = side / f"{n:04d}" / path.name
        dest.parent.mkdir()
        if path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copy2(path, dest)
        self._spill([{"artifact": f"{n:04d}/{path.name}", "artifact_path": artifact_path}])
