"""Replay of spilled tracking records: what a :class:`~rdn.tracking.run.StageRun` could not
send while MLflow was down, kept in ``mlflow/unsent/<stage>-<time>-<pid>.jsonl``.

The first line of a spill file names the run (id if it was created, stage, tracking URI,
parent, tags, start time, writing process); each further line is one record: a metric
value, a batch of params or tags, a copy of an artifact (kept beside the file in
``<name>.artifacts/``) or the run's final status. :func:`replay_file` sends one file into
the recorded run (creating it if it never was) and moves it to ``unsent/sent/``;
:func:`flush_pending` replays every waiting file (``rdn tracking flush``). A replay claims
its file by renaming it, so two processes never send the same file; replaying twice is
harmless, since MLflow drops metric values it already has.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from rdn.tracking.client import (DVC_EXP_KIND, MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, MAX_TAGS_PER_BATCH,
                                 experiment_id_for, fast_fail_http, mlflow_client)


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


def artifact_dir(spill: Path) -> Path:
    """Where copies of the artifacts a spill file names are kept."""
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


def describe_spill(path: Path) -> str:
    """``"12 unsent metric values (steps 3..14)"``, for a warning."""
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
        if artifact_dir(path).exists():
            shutil.move(str(artifact_dir(path)), str(sent / artifact_dir(path).name))
        result.ok = True
    return result


def _replay(spill: Path, path: Path, header: dict[str, Any], records: list[dict[str, Any]], home: Path,
            result: ReplayResult, client, target_uri: str, run_id: str | None, terminate: bool) -> bool:
    from mlflow.entities import Metric, RunTag

    try:
        if client is None:
            client = mlflow_client(target_uri)
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
        for i in range(0, len(tag_items), MAX_TAGS_PER_BATCH):
            client.log_batch(rid, tags=tag_items[i:i + MAX_TAGS_PER_BATCH])
        result.tags = len(tag_items)
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(rid, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        result.metrics = len(metrics)
        side = artifact_dir(path)
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
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        chunk = items[i:i + MAX_PARAMS_PER_BATCH]
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
