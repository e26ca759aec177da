"""What a pipeline run needs around its stages, without any orchestrator.

The Prefect flow (``flows/pipeline.py``) uses these helpers; they never import prefect:

* :func:`dvc_stages` / :func:`check_stages` / :func:`resolve_preset` / :func:`prepare_params`:
  validate flow parameters (stage subset, preset or params file) before anything runs;
  :func:`stage_metrics_files`: the metrics files a set of stages writes (for the parent run);
* :func:`apply_params`: write a validated preset over ``params.yaml`` (a backup of the old
  file is kept under ``.dvc/tmp/``);
* :class:`PipelineLock`: one pipeline run per checkout (``flock`` on
  ``.dvc/tmp/rdn-pipeline.lock``); a second run waits up to a limit, then refuses, naming the
  holder;
* :func:`tracking_config`: the ``tracking`` section the flow opens its MLflow parent run with
  (the parent run itself is :mod:`rdn.tracking.parent`).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from rdn.config import Params, ParamsError, TrackingConfig, read_params_file, validate_params

log = logging.getLogger(__name__)

LOCK_NAME = "rdn-pipeline.lock"
APPLIED_HEADER = "# Written by the rdn-full-pipeline flow"


class PipelineError(ValueError):
    """A flow parameter or the project is wrong; nothing has run."""


# --------------------------------------------------------------------------- parameters

def dvc_stages(root: Path) -> list[str]:
    """Stage names of ``dvc.yaml`` in file order (the pipeline order)."""
    path = Path(root) / "dvc.yaml"
    if not path.exists():
        raise PipelineError(f"{root} is not an rdn project: no dvc.yaml")
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    return list(stages)


def stage_metrics_files(root: Path, stages: Iterable[str]) -> list[str]:
    """The ``metrics:`` files ``dvc.yaml`` declares for ``stages`` (paths relative to ``root``),
    in pipeline order."""
    path = Path(root) / "dvc.yaml"
    if not path.exists():
        raise PipelineError(f"{root} is not an rdn project: no dvc.yaml")
    specs = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    wanted = set(stages)
    files = []
    for name, spec in specs.items():
        if name in wanted:
            for entry in (spec or {}).get("metrics") or []:
                files.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return files


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_stages(requested: Iterable[str] | str | None, available: list[str]) -> list[str]:
    """The requested subset in pipeline order (all stages for None/empty); unknown names raise."""
    if requested is None:
        return list(available)
    if isinstance(requested, str):
        requested = [s for s in requested.replace(",", " ").split() if s]
    requested = list(requested)
    if not requested:
        return list(available)
    unknown = [s for s in requested if s not in available]
    if unknown:
        raise PipelineError("; ".join(f"unknown stage {s!r}{_suggest(s, available)}" for s in unknown)
                            + f" (stages in dvc.yaml: {', '.join(available)})")
    return [s for s in available if s in set(requested)]


def available_presets(root: Path) -> list[str]:
    base = Path(root) / "configs"
    return sorted(p.stem for p in base.glob("*.yaml")) if base.is_dir() else []


def resolve_preset(name: str, root: Path) -> Path:
    """``configs/<name>.yaml`` (``name`` may end in ``.yaml``). Only the top level of configs/
    holds presets (params files); ``configs/experiments/`` holds sweep sets and
    ``configs/ablations/`` ablation sets, not presets."""
    base = (Path(root) / "configs").resolve()
    stem = name[:-5] if name.endswith(".yaml") else name
    path = (base / f"{stem}.yaml").resolve()
    if path.parent != base or not path.is_file():
        presets = available_presets(root)
        raise PipelineError(f"unknown preset {name!r}{_suggest(stem, presets)} "
                            f"(presets in configs/: {', '.join(presets) or 'none'})")
    return path


def prepare_params(root: Path, preset: str | None = None, params_file: str | None = None,
                   dist: Mapping[str, Any] | None = None) -> tuple[dict[str, Any] | None, Params | None, str]:
    """Validate the preset or params file a run should apply, with ``dist`` (cluster
    settings: ``nproc_per_node``, ``nnodes``, ``node_launcher``, ...) set over its ``dist``
    section.

    Returns ``(resolved dict to write to params.yaml or None, validated Params or None,
    source label)``. Raises :class:`PipelineError` naming every problem."""
    root = Path(root)
    if preset and params_file:
        raise PipelineError("give either preset or params_file, not both")
    if dist is not None and not isinstance(dist, Mapping):
        raise PipelineError(f"dist must be a mapping of dist settings, e.g. {{'nnodes': 2}} (got {dist!r})")
    if dist:
        data, _, label = prepare_params(root, preset, params_file)
        if data is None:
            data, label = read_params_file(root / "params.yaml"), "params.yaml"
        data = {**data, "dist": {**(data.get("dist") or {}), **dist}}
        label += " + dist " + ", ".join(f"{k}={v}" for k, v in dist.items())
        try:
            params = validate_params(data, "the flow's dist parameter")
        except ParamsError as e:
            raise PipelineError(f"invalid {label}: " + "; ".join(e.problems)) from None
        return data, params, label
    if not preset and not params_file:
        return None, None, "params.yaml"
    if preset:
        path, label = resolve_preset(preset, root), f"preset {preset}"
    else:
        path = Path(params_file)
        path = path if path.is_absolute() else root / path
        label = f"params file {params_file}"
        if not path.is_file():
            raise PipelineError(f"params file {params_file!r} does not exist ({path})")
    read_from = _over_defaults(root, path)
    if read_from != path:
        label += " (over the params.yaml it replaced, not over an earlier preset)"
    try:
        data = read_params_file(read_from)
        params = validate_params(data, str(path))
    except ParamsError as e:
        raise PipelineError(f"invalid {label}: " + "; ".join(e.problems).replace(str(read_from), str(path))) from None
    return data, params, label


def _backup_dir(root: Path) -> Path:
    return Path(root) / ".dvc" / "tmp" / "rdn-params-backup"


def _over_defaults(root: Path, path: Path) -> Path:
    """The file to read for ``path`` so that presets never stack.

    A preset says ``extends: ../params.yaml``. Once a run has written a preset over
    params.yaml, a second preset must extend the user's own params.yaml (kept as
    ``base.yaml`` by :func:`apply_params`), not the first preset -- else d12 then d20 would
    give d12+d20. Returns ``path`` itself when nothing needs redirecting, else a staged copy
    whose ``extends`` points at the kept file."""
    current = Path(root) / "params.yaml"
    base = _backup_dir(root) / "base.yaml"
    if not (current.is_file() and base.is_file() and _flow_written(current)):
        return path
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return path  # read_params_file reports it properly
    extends = raw.get("extends") if isinstance(raw, dict) else None
    if not isinstance(extends, str) or (path.parent / extends).resolve() != current.resolve():
        return path
    staged = _backup_dir(root) / "staged" / path.name
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(yaml.safe_dump({**raw, "extends": str(base.resolve())}, sort_keys=False), encoding="utf-8")
    return staged


def _flow_written(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.readline().startswith(APPLIED_HEADER)


def apply_params(root: Path, data: Mapping[str, Any], source: str) -> Path | None:
    """Write ``data`` as ``params.yaml`` (what DVC tracks and the stages read).

    Returns the backup of the previous file (``.dvc/tmp/rdn-params-backup/...``), or None
    when nothing changed."""
    root = Path(root)
    target = root / "params.yaml"
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    if old and yaml.safe_load(old) == dict(data):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = (f"{APPLIED_HEADER} from {source} at {stamp}.\n"
            "# `git checkout params.yaml` restores the committed defaults.\n"
            + yaml.safe_dump(dict(data), sort_keys=False))
    backup = None
    if old:
        backup_dir = _backup_dir(root)
        backup_dir.mkdir(parents=True, exist_ok=True)
        backup = backup_dir / f"params-{stamp.replace(':', '')}.yaml"
        backup.write_text(old, encoding="utf-8")
        if not old.startswith(APPLIED_HEADER):  # the user's own file: what later presets extend
            (backup_dir / "base.yaml").write_text(old, encoding="utf-8")
    tmp = target.with_name(".params.yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return backup


def tracking_config(root: Path) -> TrackingConfig:
    """The ``tracking`` section of ``params.yaml``; defaults when the file is invalid (the
    stages then report the problem themselves)."""
    path = Path(root) / "params.yaml"
    try:
        data = read_params_file(path)
    except (ParamsError, OSError):
        return TrackingConfig()
    try:
        return TrackingConfig.model_validate(data.get("tracking") or {})
    except Exception:  # noqa: BLE001 -- invalid section: stages will say so
        return TrackingConfig()


# --------------------------------------------------------------------------- lock

class LockBusy(RuntimeError):
    """Another pipeline run holds this checkout's lock."""


class PipelineLock:
    """Exclusive ``flock`` on ``<root>/.dvc/tmp/rdn-pipeline.lock`` for one pipeline run.

    ``flock`` locks belong to the open file, so two runs in one process exclude each other
    too, and the kernel releases the lock when a holder dies (no stale lock files)."""

    def __init__(self, root: Path, owner: str = "", wait_s: float = 0.0,
                 on_wait: Callable[[str], None] | None = None, poll_s: float = 0.5):
        self.path = Path(root) / ".dvc" / "tmp" / LOCK_NAME
        self.owner, self.wait_s, self.on_wait, self.poll_s = owner, max(0.0, float(wait_s)), on_wait, poll_s
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return "another pipeline run"
        if not info:
            return "another pipeline run"
        return (f"pid {info.get('pid')} on {info.get('host')} ({info.get('owner') or 'pipeline run'}, "
                f"since {info.get('since')})")

    def acquire(self) -> "PipelineLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                holder = self.holder()
                os.close(fd)
                raise LockBusy(f"another pipeline run is using {self.path.parents[2]}: {holder}. "
                               f"Refusing to start (waited {self.wait_s:g} s; set lock_wait_s to wait longer).")
            if not announced and self.on_wait:
                self.on_wait(f"waiting up to {self.wait_s:g} s for the pipeline lock held by {self.holder()}")
                announced = True
            time.sleep(self.poll_s)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PipelineLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
