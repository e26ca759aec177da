"""``rdn serve``: the local orchestration stack on loopback, for as long as it runs.

Starts a Prefect server, an MLflow tracking server (UI included), creates the process work
pool, deploys ``rdn-full-pipeline/local`` from ``prefect.yaml`` and starts a worker for the
pool; then prints the URLs and the exact ``prefect deployment run`` command. Ctrl-C (or
SIGTERM) stops everything it started, each child by its process group.

Only the command-line tools are used (``prefect``, ``mlflow``): the rdn library never
imports prefect. State stays in the project: ``.prefect/`` (Prefect's database, logs of
the servers) and ``mlflow/`` (runs and artifacts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

FLOW_NAME = "rdn-full-pipeline"
PROJECT_ENV = "RDN_PROJECT_DIR"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed in this environment")
    return found


def wait_http(url: str, proc: subprocess.Popen | None, timeout_s: float, what: str, log_path: Path | None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready"
                               + _tail_hint(log_path))
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready at {url} after {timeout_s:g} s ({last})" + _tail_hint(log_path))


def _tail_hint(log_path: Path | None, n: int = 15) -> str:
    if not log_path or not log_path.exists():
        return ""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return f"; last lines of {log_path}:\n" + "\n".join(lines)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path | None = None
    log_file: IO | None = field(default=None, repr=False)


class Stack:
    """Processes started by ``rdn serve``; :meth:`stop` ends each by its process group."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path | None) -> Child:
        log_file = open(log_path, "ab") if log_path else None  # noqa: SIM115 -- closed in stop()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=log_file if log_file else None,
                                stderr=subprocess.STDOUT if log_file else None,
                                start_new_session=True)  # own process group: stopped as a whole
        child = Child(name, proc, log_path, log_file)
        self.children.append(child)
        return child

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to every group, then SIGKILL after ``timeout_s`` (a Prefect worker can hang in
        its graceful shutdown after the first signal)."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
            _signal_group(child.proc, signal.SIGKILL)  # leftovers of the group (server subprocesses)
            if child.log_file:
                child.log_file.close()
        self.children = []


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def base_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PREFECT_HOME", str(root / ".prefect"))
    for key, value in {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
                       "PREFECT_WORKER_QUERY_SECONDS": "5"}.items():
        env.setdefault(key, value)
    env.pop("PREFECT_API_URL", None)
    return env


def _run_cli(cmd: list[str], env: dict[str, str], cwd: Path, what: str, timeout_s: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out


def serve(root: Path, host: str = "127.0.0.1", prefect_port: int = 0, mlflow_port: int = 0, pool: str = "rdn-local",
          deployment: str = "local", mlflow: bool = True, state_file: Path | None = None,
          startup_timeout_s: float = 180.0, out=print) -> int:
    """Start the stack and block until Ctrl-C/SIGTERM or until a child dies; stop everything
    started here. Returns an exit status (0 after Ctrl-C)."""
    root = Path(root).resolve()
    if not (root / "prefect.yaml").exists() or not (root / "dvc.yaml").exists():
        out(f"rdn serve: {root} has no prefect.yaml/dvc.yaml; run it in the project directory", file=sys.stderr)
        return 2
    env = base_env(root)
    logs = Path(env["PREFECT_HOME"]) / "serve"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_port = prefect_port or free_port(host)
    api = f"http://{host}:{prefect_port}/api"
    ui = f"http://{host}:{prefect_port}"
    stack = Stack()

    def on_signal(signum, frame):  # SIGTERM behaves like Ctrl-C; SIGINT even where a shell ignored it
        raise KeyboardInterrupt

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = stack.start("prefect server", [tool("prefect"), "server", "start", "--host", host,
                                                "--port", str(prefect_port)],
                             env, root, logs / "prefect-server.log")
        mlflow_uri = None
        ml = None
        if mlflow:
            mlflow_port = mlflow_port or free_port(host)
            mlflow_uri = f"http://{host}:{mlflow_port}"
            (root / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
            ml = stack.start("mlflow server", [tool("mlflow"), "server", "--host", host, "--port", str(mlflow_port),
                                               "--workers", "1",
                                               "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
                                               "--artifacts-destination", str(root / "mlflow" / "artifacts")],
                             env, root, logs / "mlflow-server.log")
        out(f"rdn serve: starting Prefect server (pid {server.proc.pid})"
            + (f" and MLflow server (pid {ml.proc.pid})" if ml else "") + f"; logs in {logs}")
        wait_http(f"{api}/health", server.proc, startup_timeout_s, "Prefect server", server.log_path)
        if ml:
            wait_http(f"{mlflow_uri}/health", ml.proc, startup_timeout_s, "MLflow server", ml.log_path)
        cli_env = dict(env, PREFECT_API_URL=api)
        # The deployment must not capture this machine's path: with RDN_PROJECT_DIR unset,
        # prefect.yaml's pull step keeps its `{{ $RDN_PROJECT_DIR }}` placeholder until a
        # worker runs it (the worker below sets it).
        deploy_env = {k: v for k, v in cli_env.items() if k != PROJECT_ENV}
        _run_cli([tool("prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                 cli_env, root, "creating the work pool")
        _run_cli([tool("prefect"), "--no-prompt", "deploy", "--name", deployment, "--pool", pool],
                 deploy_env, root, "deploying")
        worker_env = dict(cli_env, **{PROJECT_ENV: str(root)})
        if mlflow_uri:
            worker_env["MLFLOW_TRACKING_URI"] = mlflow_uri
        worker = stack.start("worker", [tool("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                        "--limit", "1"], worker_env, root, logs / "worker.log")
        state = {"prefect_ui": ui, "prefect_api_url": api, "mlflow_ui": mlflow_uri, "pool": pool,
                 "deployment": f"{FLOW_NAME}/{deployment}", "project": str(root),
                 "pids": {c.name: c.proc.pid for c in stack.children}, "logs": str(logs)}
        state_path = Path(state_file) if state_file else logs / "serve.json"
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        out("\nrdn serve: ready")
        out(f"  Prefect UI   {ui}")
        if mlflow_uri:
            out(f"  MLflow UI    {mlflow_uri}")
        out(f"  worker       pool {pool!r} (pid {worker.proc.pid}); flow-run logs in {worker.log_path}")
        out(f"  pids         {', '.join(f'{c.name} {c.proc.pid}' for c in stack.children)}")
        out("  run the pipeline (another terminal, in this directory):")
        out(f"    PREFECT_API_URL={api} prefect deployment run {FLOW_NAME}/{deployment} --watch")
        out(f"    PREFECT_API_URL={api} prefect deployment run {FLOW_NAME}/{deployment} "
            "-p 'stages=[\"data\",\"tokenizer\"]' --watch")
        out(f"  state        {state_path}")
        out("Ctrl-C stops everything started here.", flush=True)
        while True:
            dead = stack.dead()
            if dead is not None:
                out(f"rdn serve: {dead.name} (pid {dead.proc.pid}) exited with {dead.proc.returncode}; stopping"
                    + _tail_hint(dead.log_path), file=sys.stderr)
                return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        out("\nrdn serve: stopping " + ", ".join(f"{c.name} (pid {c.proc.pid})" for c in stack.children), flush=True)
        return 0
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        out(f"rdn serve: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in old_handlers:  # a second Ctrl-C must not abandon the children half-stopped
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
