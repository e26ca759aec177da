"""The ``rdn-full-pipeline`` Prefect flow: one task per DVC stage, each ``dvc repro -s <stage>``.

DVC decides what is stale (a stage it finds up to date is reported *cached*); Prefect
schedules, retries transient failures, shows logs, and records the run. Stages run one at
a time in ``dvc.yaml`` order, in the project directory, with their output streamed into the
Prefect log. The flow holds a per-checkout lock for its whole run and opens the MLflow
parent run every stage's run nests under.

Run it directly (``make run`` does; a temporary Prefect API starts on its own)::

    python -m flows.pipeline [--stages data tokenizer] [--preset d12 | --params-file F] [--force]

or deployed (``prefect.yaml``)::

    prefect deployment run rdn-full-pipeline/local -p 'stages=["data","tokenizer"]'
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment as rt_deployment
from prefect.runtime import flow_run as rt_flow_run
from prefect.states import Completed

from rdn.io import git_sha
from rdn.pipeline.launch import terminate
from rdn.pipeline.run import (PipelineError, PipelineLock, apply_params, check_stages, dvc_stages, prepare_params,
                              stage_metrics_files, tracking_config)
from rdn.tracking.client import resolve_tracking_uri
from rdn.tracking.parent import finish_parent_run, metrics_summary, report_artifacts, start_parent_run
from rdn.tracking.run import PARENT_RUN_ENV

PROJECT_ENV = "RDN_PROJECT_DIR"
TAIL_LINES = 40
# Exit codes that mean "the input is wrong" (params validation, usage): a retry cannot help.
DETERMINISTIC_EXIT_CODES = frozenset({2})
_EXIT_RE = re.compile(r"exited with (-?\d+)")


class StageFailed(RuntimeError):
    """A stage's ``dvc repro`` failed; ``transient`` says whether a retry may help."""

    def __init__(self, stage: str, exit_code: int | None, tail: list[str], transient: bool):
        self.stage, self.exit_code, self.tail, self.transient = stage, exit_code, tail, transient
        why = "" if transient else ", not retried: the stage rejected its input"
        code = f"exit {exit_code}" if exit_code is not None else "dvc failed"
        super().__init__(f"stage {stage!r} failed ({code}{why}). Last lines of its log:\n" + "\n".join(tail))


def project_dir(explicit: str | None = None) -> Path:
    """``project`` parameter, else ``$RDN_PROJECT_DIR``, else the checkout holding this file."""
    root = explicit or os.environ.get(PROJECT_ENV) or Path(__file__).resolve().parents[1]
    return Path(root).resolve()


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def stage_env(root: Path, parent_run_id: str | None, uri: str | None) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # `python -m stages.x` = this interpreter
    env.update(RDN_PROJECT_ROOT=str(root), PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.pop(PARENT_RUN_ENV, None)
    env.pop("RDN_PARAMS", None)  # stages must read params.yaml, the file DVC tracks
    if parent_run_id and uri:
        env[PARENT_RUN_ENV] = parent_run_id
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def _retry_transient(task, task_run, state) -> bool:  # Prefect's retry_condition_fn
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if isinstance(exc, StageFailed):
        return exc.transient
    return "not retried" not in (state.message or "")


def _stream(label: str, cmd: list[str], root: str, env: dict[str, str], watch=None) -> float:
    """Run ``cmd`` in ``root``, every output line into the Prefect log (and to ``watch``);
    returns its wall time, or raises :class:`StageFailed` with the last lines of its log."""
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", " ".join(cmd[1:]), root)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            tail.append(line)
            logger.info("%s | %s", label, line)
            if watch is not None:
                watch(line)
        rc = proc.wait()
    finally:
        terminate(proc)  # cancelled or interrupted: stop DVC and its stage
    if rc != 0:
        found = _EXIT_RE.findall("\n".join(tail))
        code = int(found[-1]) if found else None
        transient = code not in DETERMINISTIC_EXIT_CODES and not any("invalid params in" in ln for ln in tail)
        raise StageFailed(label, code if code is not None else rc, list(tail), transient)
    return time.monotonic() - start


@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient)
def run_stage(stage: str, root: str, force: bool, env: dict[str, str]) -> Any:
    """``dvc repro -s <stage> [--force]``; returns ``{"stage", "status": ran|cached, "seconds"}``
    (for a cached stage wrapped in a Completed state named "Cached", as the UI shows it)."""
    logger = get_run_logger()
    cmd = [_dvc(), "repro", "-s", stage] + (["--force"] if force else [])
    ran = skipped = False

    def watch(line: str) -> None:
        nonlocal ran, skipped
        if line.startswith(f"Running stage '{stage}'"):
            ran = True
        elif line.startswith(f"Stage '{stage}' didn't change, skipping") or "is cached - skipping" in line:
            skipped = True

    seconds = _stream(stage, cmd, root, env, watch)
    status = "cached" if skipped and not ran else "ran"
    result = {"stage": stage, "status": status, "seconds": round(seconds, 3)}
    if status == "cached":
        logger.info("stage %s: cached (DVC finds it up to date), %.1f s", stage, seconds)
        return Completed(name="Cached", message="DVC: up to date, not rerun", data=result)
    logger.info("stage %s: ran in %.1f s", stage, seconds)
    return result


@task(name="dvc-experiment", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient)
def run_variant(name: str, cmd: list[str], root: str, env: dict[str, str]) -> dict[str, Any]:
    """One variant of an experiment set: ``dvc exp run --temp -n <set>-<variant> -S ...`` (the
    pipeline in a temporary copy, recorded as a DVC experiment and its own MLflow parent run)."""
    seconds = _stream(name, [_dvc(), *cmd[1:]], root, env)
    get_run_logger().info("experiment %s: done in %.1f s", name, seconds)
    return {"stage": name, "status": "ran", "seconds": round(seconds, 3)}


def _run_experiment_set(name: str, stages: list[str] | None, root: Path, force: bool, retries: int,
                        retry_delay_s: float, logger) -> list[dict[str, Any]]:
    """Every variant of ``configs/experiments/<name>.yaml``, one after another, each validated first."""
    from rdn.pipeline.sweep import SweepError, load_set, validate_set

    try:
        exp = load_set(name, root)
        if stages:
            exp.stages = stages
        validate_set(exp, root / "params.yaml", dvc_stages(root))
    except SweepError as e:
        raise PipelineError(f"experiment set {name!r}: " + "; ".join(e.problems)) from None
    logger.info("experiment set %s: %d variants (%s), MLflow experiment %r", exp.name, len(exp.variants),
                ", ".join(exp.variants), exp.mlflow_experiment)
    env = stage_env(root, None, None)
    env.pop("RDN_PROJECT_ROOT", None)  # each variant runs in DVC's temporary copy, not in the checkout
    results = []
    for variant in exp.variants:
        label = exp.exp_name(variant)
        variant_task = run_variant.with_options(name=label, task_run_name=label, retries=max(0, int(retries)),
                                                retry_delay_seconds=retry_delay_s)
        results.append(variant_task(label, exp.dvc_command(variant, "temp", force=force), str(root), env))
    logger.info("experiment set %s done: compare with `rdn compare --experiment %s` or `dvc exp show --md`",
                exp.name, exp.mlflow_experiment)
    return results


@task(name="ablation", cache_policy=NO_CACHE, persist_result=False)
def run_ablation_set(name: str, root: str, seeds: int | None, jobs: int, stages: list[str] | None,
                     force: bool) -> dict[str, Any]:
    """``rdn ablate NAME``: every (variant, seed) as a DVC experiment, then the paired statistics;
    the log lines (progress, ETA, verdicts) go to the Prefect log."""
    from rdn.pipeline.ablate import AblationError, run_ablation

    logger = get_run_logger()
    handler = _PrefectHandler(logger)
    ablate_log = logging.getLogger("rdn.pipeline.ablate")
    ablate_log.addHandler(handler)
    ablate_log.setLevel(logging.INFO)
    try:
        result = run_ablation(name, Path(root), seeds=seeds, jobs=jobs, stages=stages, force=force)
    except AblationError as e:
        raise PipelineError(f"ablation {name!r}: " + "; ".join(e.problems)) from None
    finally:
        ablate_log.removeHandler(handler)
    create_markdown_artifact((Path(root) / "reports/ablations" / f"{name}.md").read_text(),
                             key=f"rdn-ablation-{name.replace('_', '-')}", description=f"rdn ablation {name}")
    return {"set": name, "runs": len(result["runs"]),
            "verdicts": {f"{c['variant']}/{c['metric']}": c["verdict"] for c in result["comparisons"]}}


class _PrefectHandler(logging.Handler):
    """Forwards library log records to a Prefect run logger."""

    def __init__(self, logger):
        super().__init__()
        self.logger = logger

    def emit(self, record) -> None:
        self.logger.log(record.levelno, record.getMessage())


def _summary_markdown(results: list[dict[str, Any]], source: str, failed: str | None) -> str:
    rows = "\n".join(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in results)
    tail = f"\n\nFailed at stage **{failed}**." if failed else ""
    return f"Params: {source}\n\n| stage | status | seconds |\n|---|---|---|\n{rows}{tail}"


@flow(name="rdn-full-pipeline", log_prints=True, validate_parameters=True)
def pipeline(stages: list[str] | None = None, preset: str | None = None, params_file: str | None = None,
             force: bool = False, retries: int = 0, retry_delay_s: float = 10.0, lock_wait_s: float = 0.0,
             project: str | None = None, experiment: str | None = None,
             dist: dict[str, Any] | None = None, ablation: str | None = None, seeds: int | None = None,
             jobs: int = 1) -> dict[str, Any]:
    """Run the DVC stages of rdn in order.

    Args:
        stages: subset of dvc.yaml stages (default: all), run in pipeline order, each exactly
            (``dvc repro -s``); upstream outputs must already exist.
        preset: a file in ``configs/`` (``d12``, ``d20``, ...) validated and written over
            params.yaml before the run.
        params_file: a params file (may ``extends:`` another) applied the same way.
        force: rerun stages even when DVC finds them up to date.
        retries: retries per stage for transient failures (never for invalid params, exit 2).
        retry_delay_s: seconds between retries.
        lock_wait_s: how long to wait for another pipeline run on this checkout to finish.
        project: project directory (default: $RDN_PROJECT_DIR, else the checkout of this file).
        experiment: an experiment set in ``configs/experiments/`` (e.g. ``rdn_vs_gpt``): every
            variant is validated, then run in turn as ``dvc exp run --temp`` over ``stages`` (or
            the set's own), each its own DVC experiment and MLflow parent run; params.yaml is
            not touched. Not combinable with ``preset``/``params_file``.
        dist: cluster settings for the training stages, set over the ``dist`` section of the
            params (e.g. ``{"nproc_per_node": 8, "nnodes": 2, "node_launcher": "k8s",
            "k8s_image": "registry/rdn:cuda"}``): validated, then written to params.yaml
            like a preset, so DVC records the world size each stage ran with.
        ablation: an ablation set in ``configs/ablations/`` (e.g. ``rdn_vs_gpt``): ``rdn ablate``
            -- every (variant, seed) validated, run as DVC experiments over the set's stages (or
            ``stages``), then compared with the set's baseline, paired by seed; writes
            ``metrics/ablations/<set>.json`` and ``reports/ablations/<set>.md``. params.yaml is
            not touched. Not combinable with ``preset``/``params_file``/``experiment``.
        seeds: seeds per variant for ``ablation`` (default: the set's).
        jobs: experiments of ``ablation`` run at a time.
    """
    logger = get_run_logger()
    root = project_dir(project)
    wanted = check_stages(stages, dvc_stages(root))           # bad parameters fail here,
    data, _, source = prepare_params(root, preset, params_file, dist)  # before anything runs
    if ablation is not None:
        if data is not None or experiment is not None:
            raise PipelineError("ablation runs variants of params.yaml; drop preset/params_file/dist/experiment")
        from rdn.pipeline.ablate import AblationError, load_ablation, validate

        try:  # every (variant, seed), before any task runs
            ab = load_ablation(ablation, root)
            if stages:
                ab.stages = wanted
            validate(ab, ab.seed_values(seeds), root / "params.yaml", dvc_stages(root))
        except AblationError as e:
            raise PipelineError(f"ablation {ablation!r}: " + "; ".join(e.problems)) from None
        lock = PipelineLock(root, owner=f"flow run {rt_flow_run.name or rt_flow_run.id}", wait_s=lock_wait_s,
                            on_wait=logger.warning)
        lock.acquire()
        try:
            summary = run_ablation_set(ablation, str(root), seeds, max(1, int(jobs)), stages and wanted, force)
        finally:
            lock.release()
        return {"stages": [], "params_source": f"ablation {ablation}", "mlflow_parent_run_id": None,
                "ablation": summary}
    if experiment is not None:
        if data is not None:
            raise PipelineError("experiment runs variants of params.yaml; drop preset/params_file/dist "
                                "(or apply it first in a run of its own)")
        lock = PipelineLock(root, owner=f"flow run {rt_flow_run.name or rt_flow_run.id}", wait_s=lock_wait_s,
                            on_wait=logger.warning)
        lock.acquire()
        try:
            variants = _run_experiment_set(experiment, stages and wanted, root, force, retries, retry_delay_s,
                                           logger)
        finally:
            lock.release()
        return {"stages": variants, "params_source": f"experiment {experiment}", "mlflow_parent_run_id": None}
    run_id = str(rt_flow_run.id or "")
    dep_name = rt_deployment.name
    lock = PipelineLock(root, owner=f"flow run {rt_flow_run.name or run_id}", wait_s=lock_wait_s,
                        on_wait=logger.warning)
    lock.acquire()
    results: list[dict[str, Any]] = []
    failed: str | None = None
    parent: str | None = None
    cfg = None
    status = "FAILED"
    try:
        if data is not None:
            backup = apply_params(root, data, source)
            logger.info("applied %s to params.yaml%s", source,
                        f" (previous file saved as {backup})" if backup else " (already in place)")
        logger.info("project %s; params from %s; stages: %s%s", root, source, ", ".join(wanted),
                    " (forced)" if force else "")
        cfg = tracking_config(root)
        sha = os.environ.get("RDN_GIT_SHA") or git_sha(root)
        parent = start_parent_run(cfg, {"rdn.flow_run_id": run_id, "rdn.flow_run_name": rt_flow_run.name,
                                        "rdn.deployment": dep_name or "none", "mlflow.source.git.commit": sha,
                                        "rdn.git_sha": sha, "rdn.preset": preset or "none",
                                        "rdn.params_source": source, "rdn.stages": ",".join(wanted)},
                                  root, run_name=f"pipeline-{rt_flow_run.name or 'local'}",
                                  params={"stages": ",".join(wanted), "force": force, "params_source": source})
        uri = resolve_tracking_uri(cfg, root) if parent else None
        if parent:
            logger.info("MLflow parent run %s at %s", parent, uri)
        env = stage_env(root, parent, uri)
        for stage in wanted:
            stage_task = run_stage.with_options(name=stage, task_run_name=stage, retries=max(0, int(retries)),
                                                retry_delay_seconds=retry_delay_s)
            try:
                results.append(stage_task(stage, str(root), force, env, return_state=True).result())
            except StageFailed:
                failed = stage
                raise
        status = "FINISHED"
        cached = [r["stage"] for r in results if r["status"] == "cached"]
        logger.info("pipeline done: ran %s; cached %s",
                    ", ".join(r["stage"] for r in results if r["status"] == "ran") or "nothing",
                    ", ".join(cached) or "nothing")
        return {"stages": results, "params_source": source, "mlflow_parent_run_id": parent}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            if parent:
                tags = {f"rdn.pipeline.stage.{r['stage']}": r["status"] for r in results}
                if failed:
                    tags[f"rdn.pipeline.stage.{failed}"] = "failed"
                    tags["rdn.failed_stage"] = failed
                # the figures of every stage that completed in this run, ran or cached: a cached
                # stage opens no MLflow run, so for it the parent's copy is the only record
                completed = [r["stage"] for r in results]
                files = stage_metrics_files(root, completed)
                metrics = metrics_summary(root, files)
                metrics.update({f"pipeline/{r['stage']}/seconds": r["seconds"] for r in results})
                finish_parent_run(parent, status, metrics, report_artifacts(root, files, "report" in completed),
                                  tags=tags, tracking_cfg=cfg, root=root)
            try:
                create_markdown_artifact(_summary_markdown(results, source, failed), key="rdn-pipeline-stages",
                                         description="rdn pipeline: stage status")
            except Exception as e:  # noqa: BLE001 -- a summary artifact is not worth failing for
                logger.warning("could not record the stage summary artifact: %s", e)
        finally:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="*", help="subset of dvc.yaml stages (default: all)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--preset", help="configs/<NAME>.yaml applied to params.yaml first")
    group.add_argument("--params-file", help="params file applied to params.yaml first")
    ap.add_argument("--force", action="store_true", help="rerun stages DVC finds up to date")
    ap.add_argument("--retries", type=int, default=0, help="retries per stage for transient failures")
    group.add_argument("--experiment", help="run every variant of configs/experiments/<NAME>.yaml")
    group.add_argument("--ablation", help="rdn ablate configs/ablations/<NAME>.yaml (variants x seeds, statistics)")
    ap.add_argument("--seeds", type=int, default=None, help="--ablation: seeds per variant (default: the set's)")
    ap.add_argument("--jobs", type=int, default=1, help="--ablation: experiments at a time")
    ap.add_argument("--lock-wait", type=float, default=0.0, help="seconds to wait for another run's lock")
    ap.add_argument("--dist", action="append", default=[], metavar="KEY=VALUE",
                    help="a dist setting for the training stages, e.g. --dist nnodes=2 --dist node_launcher=local")
    args = ap.parse_args(argv)
    dist = {}
    for item in args.dist:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--dist {item!r}: expected KEY=VALUE")
        dist[key] = yaml.safe_load(value)
    state = pipeline(stages=args.stages or None, preset=args.preset, params_file=args.params_file,
                     force=args.force, retries=args.retries, lock_wait_s=args.lock_wait,
                     experiment=args.experiment, dist=dist or None, ablation=args.ablation, seeds=args.seeds,
                     jobs=args.jobs, return_state=True)
    if not state.is_completed():
        print(f"rdn-full-pipeline {state.name}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
