"""Starting the other nodes of a multi-node training stage (``dist.node_launcher``).

``external`` (the default): every node is started by someone else -- Slurm's ``srun``, a
Kubernetes indexed Job (``infra/k8s/train-multinode.yaml``) -- and each runs the same
``torchrun`` command, meeting at ``dist.rdzv_endpoint`` (c10d rendezvous).

``local`` and ``k8s``: *this* process is node 0 and starts nodes ``1 .. nnodes-1`` itself,
then runs its own ``torchrun`` and waits for all of them. That is how a Prefect flow run
(one pod of the cluster work pool, or one process on a workstation) trains across nodes
with no other launcher: DVC runs the stage in the flow's process as usual, so the lock
file, the metrics and the Prefect log are the ones of a single-node run. The nodes use
torchrun's *static* rendezvous with explicit node ranks (node 0 hosts the store at
``master_addr:master_port``), so global rank 0 -- the rank that logs step lines, tracks to
MLflow and writes metrics -- is always in this process's node and its log.

* ``local``: the other nodes are processes on this machine. It exercises the multi-node
  path exactly (separate torchrun agents, a TCP rendezvous) and is what the CPU tests run.
* ``k8s``: the other nodes are one Kubernetes Job (``completionMode: Indexed``, one pod per
  node) made from ``dist.k8s_manifest`` -- the same template as the all-nodes job, with its
  completions set to ``nnodes - 1`` and each pod's command pointed at this pod. Applied
  and deleted with ``kubectl`` (in the image; the pod's service account may create Jobs).

Torchrun's own failure handling still holds: a node that dies breaks the others'
collectives; the launcher stops the remaining nodes and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Environment the other nodes need to act as rank 0 would (tracking) and find the project.
FORWARDED_ENV = ("RDN_PROJECT_ROOT", "MLFLOW_TRACKING_URI", "RDN_MLFLOW_PARENT_RUN_ID", "RDN_LOG_LEVEL")
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


class LaunchError(RuntimeError):
    """A node could not be started, or the manifest is unusable."""


def terminate(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM ``proc`` if it still runs, then SIGKILL after ``grace_s``; reaps it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def master_address(dist_cfg, launcher: str) -> tuple[str, int]:
    """``(host, port)`` node 0 serves the rendezvous on: ``dist.rdzv_endpoint`` when given,
    else loopback and a free port (local) or this pod's IP and 29500 (k8s)."""
    if dist_cfg.rdzv_endpoint:
        host, _, port = dist_cfg.rdzv_endpoint.rpartition(":")
        return host, int(port)
    if launcher == "local":
        return "127.0.0.1", free_port()
    return os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname()), DEFAULT_PORT


def node_argv(nproc_per_node: int, nnodes: int, node_rank: int | str, host: str, port: int, module: str,
              args: list[str], python: str | None = None) -> list[str]:
    """torchrun for one node of a static rendezvous (``node_rank`` may be a shell expression)."""
    return [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
            f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=static",
            f"--master_addr={host}", f"--master_port={port}", "-m", module, *args]


# --------------------------------------------------------------------------- Kubernetes

def render_template(text: str, values: dict[str, str], source: str = "manifest") -> str:
    """Replace ``${NAME}`` (the envsubst syntax the template documents) with ``values``;
    a placeholder without a value is an error naming it."""
    missing = sorted({m for m in _PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise LaunchError(f"{source}: no value for {', '.join('${' + m + '}' for m in missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def k8s_worker_job(template: str, *, job: str, stage: str, nnodes: int, nproc_per_node: int, image: str,
                   host: str, port: int, params_path: str, env: dict[str, str], source: str = "manifest"
                   ) -> dict[str, Any]:
    """The Job for nodes ``1 .. nnodes-1``: the template's Job (pod spec, volumes, GPUs) with
    ``nnodes - 1`` indexed pods, each running torchrun as node ``JOB_COMPLETION_INDEX + 1``
    of a static rendezvous at ``host:port``."""
    import yaml

    text = render_template(template, {"JOB": job, "STAGE": stage, "NNODES": str(nnodes),
                                      "GPUS": str(nproc_per_node), "IMAGE": image}, source)
    jobs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("kind") == "Job"]
    if len(jobs) != 1:
        raise LaunchError(f"{source}: expected exactly one kind: Job document (found {len(jobs)})")
    manifest = jobs[0]
    try:
        spec = manifest["spec"]
        containers = spec["template"]["spec"]["containers"]
    except (KeyError, TypeError):
        raise LaunchError(f"{source}: the Job has no spec.template.spec.containers") from None
    if len(containers) != 1:
        raise LaunchError(f"{source}: the Job's pod must have exactly one container (found {len(containers)})")
    spec.update(completionMode="Indexed", completions=nnodes - 1, parallelism=nnodes - 1)
    container = containers[0]
    cmd = node_argv(nproc_per_node, nnodes, "__NODE_RANK__", host, port, f"stages.{stage}",
                    ["--params", params_path], python="python")
    line = shlex.join(cmd).replace("__NODE_RANK__", "$((JOB_COMPLETION_INDEX + 1))")
    container["command"], container["args"] = ["sh", "-c"], ["exec " + line]
    merged = {e["name"]: e for e in container.get("env", []) if isinstance(e, dict) and "name" in e}
    merged.update({k: {"name": k, "value": v} for k, v in env.items()})
    container["env"] = list(merged.values())
    manifest.setdefault("metadata", {})["name"] = job
    return manifest


def k8s_namespace(configured: str | None) -> str:
    if configured:
        return configured
    try:
        return NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


# --------------------------------------------------------------------------- running the nodes

class Nodes:
    """The other nodes of one run; :meth:`stop` ends them whatever state they are in."""

    K8S_POLL_S = 10.0

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.k8s_job: tuple[str, str] | None = None  # (namespace, name)
        self._polled = time.monotonic()

    def failed(self) -> str | None:
        """A description of the first node seen failing, or None (Kubernetes: polled every 10 s)."""
        for i, p in enumerate(self.procs, start=1):
            if p.poll() not in (None, 0):
                return f"node {i} exited with {p.returncode}"
        if self.k8s_job and time.monotonic() - self._polled > self.K8S_POLL_S:
            self._polled = time.monotonic()
            namespace, name = self.k8s_job
            proc = subprocess.run(["kubectl", "get", "job", name, "-n", namespace, "-o",
                                   "jsonpath={.status.failed}"], capture_output=True, text=True, check=False)
            if proc.returncode == 0 and proc.stdout.strip() not in ("", "0"):
                return f"Kubernetes Job {namespace}/{name} has a failed pod (kubectl logs job/{name} -n {namespace})"
        return None

    def wait(self, timeout: float) -> str | None:
        """Wait for the local nodes to finish; a description of the first failure, or None."""
        deadline = time.monotonic() + timeout
        for i, p in enumerate(self.procs, start=1):
            try:
                rc = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return f"node {i} still running {timeout:.0f} s after node 0 finished"
            if rc != 0:
                return f"node {i} exited with {rc}"
        return None

    def stop(self) -> None:
        for p in self.procs:  # signal all first: they stop in parallel
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            terminate(p)
        if self.k8s_job:
            namespace, name = self.k8s_job
            subprocess.run(["kubectl", "delete", "job", name, "-n", namespace, "--ignore-not-found",
                            "--wait=false"], check=False)
            self.k8s_job = None


def start_nodes(dist_cfg, stage: str, args: list[str], host: str, port: int, root: Path) -> Nodes:
    """Start nodes ``1 .. nnodes-1`` with ``dist_cfg.node_launcher``."""
    nodes = Nodes()
    n = dist_cfg.nnodes
    if dist_cfg.node_launcher == "local":
        for rank in range(1, n):
            cmd = node_argv(dist_cfg.nproc_per_node, n, rank, host, port, f"stages.{stage}", args)
            nodes.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        log.info("%s: started nodes 1..%d on this machine; rendezvous %s:%d", stage, n - 1, host, port)
        return nodes
    template_path = root / dist_cfg.k8s_manifest
    if not template_path.is_file():
        raise LaunchError(f"dist.k8s_manifest: {template_path} does not exist")
    params_path = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--params"), None)
    params_path = str(Path(params_path).resolve()) if params_path else str(root / "params.yaml")
    job = f"rdn-{stage.replace('_', '-')}-{int(time.time())}-{os.getpid()}"[:63]
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env.setdefault("RDN_PROJECT_ROOT", str(root))
    manifest = k8s_worker_job(template_path.read_text(), job=job, stage=stage, nnodes=n,
                              nproc_per_node=dist_cfg.nproc_per_node, image=dist_cfg.k8s_image, host=host,
                              port=port, params_path=params_path, env=env, source=str(template_path))
    namespace = k8s_namespace(dist_cfg.k8s_namespace)
    try:
        proc = subprocess.run(["kubectl", "apply", "-n", namespace, "-f", "-"], input=json.dumps(manifest),
                              text=True, capture_output=True, timeout=120)
    except FileNotFoundError:
        raise LaunchError("dist.node_launcher is k8s but kubectl is not on PATH (install it in the image)") from None
    if proc.returncode != 0:
        raise LaunchError(f"kubectl apply of Job {job} failed ({proc.returncode}): {proc.stderr.strip()}")
    nodes.k8s_job = (namespace, job)
    log.info("%s: Kubernetes Job %s/%s runs nodes 1..%d; rendezvous %s:%d", stage, namespace, job, n - 1, host, port)
    return nodes


def run_as_node_zero(dist_cfg, stage: str, args: list[str], root: Path) -> int:
    """Start the other nodes, run node 0's torchrun here, wait for all; the exit status.
    SIGTERM (Prefect cancelling, ``kill``) unwinds like Ctrl-C and stops every node."""
    from rdn.pipeline.stage import terminate_as_interrupt

    host, port = master_address(dist_cfg, dist_cfg.node_launcher)
    cmd = node_argv(dist_cfg.nproc_per_node, dist_cfg.nnodes, 0, host, port, f"stages.{stage}", args)
    with terminate_as_interrupt(stage):
        nodes = start_nodes(dist_cfg, stage, args, host, port, root)
        proc = None
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            while proc.poll() is None:
                problem = nodes.failed()
                if problem:  # node 0 may be blocked in a collective until its timeout: stop it now
                    log.error("%s: %s; stopping node 0", stage, problem)
                    terminate(proc)
                    return 1
                time.sleep(0.2)
            if proc.returncode != 0:
                return proc.returncode
            problem = nodes.wait(timeout=120) if nodes.procs else None
            if problem:
                log.error("%s: %s", stage, problem)
                return 1
            return 0
        finally:
            if proc is not None:
                terminate(proc)
            nodes.stop()
