"""Orchestration integration: the rdn-full-pipeline Prefect flow over real DVC stages.

One `rdn serve` per module (a real Prefect server, a real MLflow server, the process work
pool, `prefect --no-prompt deploy`, a worker; all on free loopback ports) over a temporary
git copy of this project with tiny params. The deployment case goes through the worker
(`prefect deployment run ... --watch`); the other cases call the flow in-process against
the same Prefect server (faster, and their return values and states are at hand). Stage
subset: data, tokenizer, base_train (3 iterations).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from rdn.config import read_params_file
from tests.conftest import REPO, Background, copy_project, head_start, started

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
STAGES = ["data", "tokenizer", "base_train"]


def _git_env(env: dict[str, str]) -> dict[str, str]:
    return dict(env, GIT_AUTHOR_NAME="rdn-test", GIT_AUTHOR_EMAIL="test@rdn.invalid",
                GIT_COMMITTER_NAME="rdn-test", GIT_COMMITTER_EMAIL="test@rdn.invalid")


def _copy_project(work: Path) -> None:
    """Exactly the tracked (and not ignored) files of this checkout, no outputs."""
    copy_project(work, skip=("artifacts/", "metrics/", "reports/"),
                 keep=("artifacts/.gitignore", "metrics/.gitignore"))


def _tiny_params(work: Path) -> None:
    params = read_params_file(work / "configs/smoke.yaml")  # every stage, tiny
    params["tracking"].update(enabled=True, uri=None)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _base_env(tmp: Path) -> dict[str, str]:
    env = _git_env(dict(os.environ))
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"), PREFECT_HOME=str(tmp / "prefect-home"),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="3", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_PREFETCH_SECONDS="5")
    for key in ("RDN_PROJECT_ROOT", "RDN_PROJECT_DIR", "MLFLOW_TRACKING_URI", "PREFECT_API_URL",
                "RDN_MLFLOW_PARENT_RUN_ID", "RDN_PARAMS"):
        env.pop(key, None)
    return env


@head_start("flow-serve", "test_flow.py")
def _start_serve(tmp_path_factory) -> Background:
    """A git copy of the project with tiny params and `rdn serve` on it (Prefect server,
    MLflow server, pool, deployment, worker; free loopback ports), started as the session
    starts (see conftest.head_start), so that it is up by the time this module runs."""
    tmp = tmp_path_factory.mktemp("flow")
    env = _base_env(tmp)
    work = tmp / "repo"
    work.mkdir()
    _copy_project(work)
    _tiny_params(work)
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "test copy"], work, env)
    return Background([str(BIN / "rdn"), "serve", "--project", str(work), "--state-file", str(tmp / "serve.json")],
                      work, env, tmp / "serve.log")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return started("flow-serve", tmp_path_factory).cwd.parent


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    return dict(started("flow-serve", tmp_path_factory).env)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return started("flow-serve", tmp_path_factory).cwd


class Serve:
    def __init__(self, proc: subprocess.Popen, state: dict, log: Path):
        self.proc, self.state, self.log = proc, state, log

    @property
    def api(self) -> str:
        return self.state["prefect_api_url"]

    def alive_pids(self) -> list[int]:
        alive = []
        for pid in self.state["pids"].values():
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return alive


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """`rdn serve` on the clone, once it is ready; stopped (Ctrl-C, then by process group)
    when the module is done."""
    job = started("flow-serve", tmp_path_factory)
    proc, log = job.proc, job.log
    state_file = job.cwd.parent / "serve.json"
    try:
        deadline = time.monotonic() + 300
        while not state_file.exists():
            assert proc.poll() is None, f"rdn serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"rdn serve not ready:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        time.sleep(0.2)
        yield Serve(proc, json.loads(state_file.read_text()), log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if state_file.exists():  # whatever serve left behind (it should leave nothing)
            for pid in json.loads(state_file.read_text())["pids"].values():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture(scope="module")
def api(serve, clone):
    """In-process flow runs report to the served Prefect API; stages track to its MLflow."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "DVC_SITE_CACHE_DIR", "DVC_NO_ANALYTICS")}
    os.environ.update(MLFLOW_TRACKING_URI=serve.state["mlflow_ui"], DVC_NO_ANALYTICS="1",
                      DVC_SITE_CACHE_DIR=str(clone.parent / "dvc-site-cache"))
    try:
        with temporary_settings(updates={PREFECT_API_URL: serve.api}):
            try:
                yield serve
            finally:
                _drain_to_prefect()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _drain_to_prefect() -> None:
    """Send this process's queued flow-run logs and events while the server is still up
    (against a stopped server each drain waits out its 15 s timeout)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=15)


def _flow(**kwargs):
    from flows.pipeline import pipeline

    start = time.monotonic()
    state = pipeline(return_state=True, **kwargs)
    return state, time.monotonic() - start


def _statuses(state) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in state.result()["stages"]}


def _mlflow(serve):
    from mlflow.tracking import MlflowClient

    return MlflowClient(serve.state["mlflow_ui"])


def _children(client, parent_id: str) -> dict[str, object]:
    exp = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["mlflow.runName"]: r for r in runs}


def _task_runs(state) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name: r for r in runs}


# --------------------------------------------------------------------------------- tests

def test_parameter_helpers_validate_and_apply(tmp_path):
    """Pure helpers (no servers): stage subsets, presets, applying a params file."""
    from rdn.pipeline.run import (PipelineError, apply_params, available_presets, check_stages, dvc_stages,
                                  prepare_params)

    stages = dvc_stages(REPO)
    assert stages[:3] == STAGES and stages[-1] == "report"
    assert check_stages(None, stages) == stages
    assert check_stages(["base_train", "data"], stages) == ["data", "base_train"]  # pipeline order
    with pytest.raises(PipelineError, match="unknown stage 'eval'; did you mean 'evaluate'"):
        check_stages(["eval"], stages)
    assert {"d12", "d20", "d26"} <= set(available_presets(REPO))
    assert not any("/" in p for p in available_presets(REPO))  # configs/experiments/ are sweep sets
    with pytest.raises(PipelineError, match="give either preset or params_file"):
        prepare_params(REPO, "d12", "params.yaml")
    data, params, source = prepare_params(REPO, preset="d20")
    assert source == "preset d20" and params.model.depth == 20 and "extends" not in data
    # cluster settings go over the preset's dist section, the rest of it kept
    over, over_params, over_source = prepare_params(REPO, preset="d20", dist={"nnodes": 2, "node_launcher": "local"})
    assert over_source == "preset d20 + dist nnodes=2, node_launcher=local"
    assert over_params.model.depth == 20 and over_params.dist.world_size == 2 * data["dist"]["nproc_per_node"]
    assert {k: v for k, v in over["dist"].items() if k not in ("nnodes", "node_launcher")} == {
        k: v for k, v in data["dist"].items() if k not in ("nnodes", "node_launcher")}
    with pytest.raises(PipelineError, match="dist.k8s_image: required when node_launcher is k8s"):
        prepare_params(REPO, dist={"nnodes": 2, "node_launcher": "k8s"})

    root = tmp_path / "p"
    root.mkdir()
    (root / "params.yaml").write_text("# my comment\n" + (REPO / "params.yaml").read_text())
    backup = apply_params(root, data, source)
    assert backup is not None and backup.read_text().startswith("# my comment")
    text = (root / "params.yaml").read_text()
    assert text.startswith("# Written by the rdn-full-pipeline flow from preset d20")
    assert yaml.safe_load(text) == data
    assert apply_params(root, data, source) is None  # already in place: no rewrite, no backup

    # presets never stack: d12 after another preset is d12 over the user's own params.yaml
    (root / "configs").mkdir()
    shutil.copy2(REPO / "configs" / "d12.yaml", root / "configs" / "d12.yaml")
    (root / "configs" / "few.yaml").write_text("extends: ../params.yaml\nevaluate:\n  num_examples: 7\n")
    few, _, few_source = prepare_params(root, preset="few")
    apply_params(root, few, few_source)
    d12_alone, _, _ = prepare_params(REPO, preset="d12")
    d12_after, _, label = prepare_params(root, preset="d12")
    assert "not over an earlier preset" in label
    assert d12_after["evaluate"]["num_examples"] != 7  # nothing of the earlier preset survives
    assert d12_after == d12_alone



def test_command_line_passes_dist_settings_to_the_flow(monkeypatch):
    """``python -m flows.pipeline --dist KEY=VALUE``: values parsed as YAML scalars; a malformed
    item is a usage error (exit 2) before the flow starts."""
    import flows.pipeline as fp

    seen = {}

    class Done:
        def is_completed(self):
            return True

    def fake_pipeline(**kwargs):  # only the argument parsing is under test here
        seen.update(kwargs)
        return Done()

    monkeypatch.setattr(fp, "pipeline", fake_pipeline)
    assert fp.main(["--stages", "base_train", "--dist", "nnodes=2", "--dist", "node_launcher=local",
                    "--dist", "rdzv_endpoint=10.0.0.1:29500"]) == 0
    assert seen["dist"] == {"nnodes": 2, "node_launcher": "local", "rdzv_endpoint": "10.0.0.1:29500"}
    assert seen["stages"] == ["base_train"]
    fp.main([])
    assert seen["dist"] is None
    # (a subprocess, not capsys: Prefect's log handlers must not bind to a per-test stream)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--dist", "nnodes"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dist 'nnodes': expected KEY=VALUE" in proc.stderr, proc.stderr[-2000:]


def test_bad_flow_parameters_fail_before_any_stage(api, clone):
    params_before = (clone / "params.yaml").read_bytes()
    lock_before = (clone / "dvc.lock").read_bytes() if (clone / "dvc.lock").exists() else None
    bad = clone.parent / "bad-params.yaml"
    bad.write_text(f"extends: {clone / 'params.yaml'}\ntokenizer:\n  vocab_size: -5\n")
    cases = [({"stages": ["data", "tokeniser"]}, ["unknown stage 'tokeniser'", "did you mean 'tokenizer'"]),
             ({"preset": "d13"}, ["unknown preset 'd13'", "d12"]),
             ({"params_file": str(bad)}, ["invalid params file", "tokenizer.vocab_size: must be >= 512 (got -5)"]),
             ({"params_file": "missing.yaml"}, ["params file 'missing.yaml' does not exist"]),
             ({"experiment": "no_such_set"}, ["experiment set 'no_such_set'"]),
             ({"ablation": "no_such_set"}, ["ablation 'no_such_set'", "no such ablation set"]),
             ({"dist": {"nnodes": 2}}, ["dist.rdzv_endpoint: required when nnodes > 1"]),
             ({"dist": {"nproc_per_nodes": 2}}, ["dist.nproc_per_nodes", "nproc_per_node"])]
    for kwargs, expected in cases:
        state, _ = _flow(project=str(clone), **kwargs)
        assert state.is_failed(), kwargs
        for text in expected:
            assert text in state.message, (kwargs, state.message)
        assert _task_runs(state) == {}, f"{kwargs}: a stage ran"
    assert (clone / "params.yaml").read_bytes() == params_before
    assert not (clone / "artifacts" / "data").exists()
    assert ((clone / "dvc.lock").read_bytes() if (clone / "dvc.lock").exists() else None) == lock_before


def test_deployment_run_through_worker_completes_with_mlflow_run_tree(serve, clone, base_env):
    env = dict(base_env, PREFECT_API_URL=serve.api)
    inspect = _run([str(BIN / "prefect"), "deployment", "inspect", "rdn-full-pipeline/local"], clone, env)
    assert "{{ $RDN_PROJECT_DIR }}" in inspect and str(clone) not in inspect  # no machine path baked in

    out = _run([str(BIN / "prefect"), "deployment", "run", "rdn-full-pipeline/local", "--watch",
                "-p", f"stages={json.dumps(STAGES)}"], clone, env, timeout=600)
    assert "Completed" in out, out[-3000:]
    assert (clone / "artifacts/tokenizer/tokenizer.json").exists()
    assert list((clone / "artifacts/checkpoints/base").glob("step_*/model.safetensors"))

    client = _mlflow(serve)
    exp = client.get_experiment_by_name("rdn")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`rdn.kind` = 'pipeline'")
    assert len(parents) == 1, [p.data.tags for p in parents]
    parent = parents[0]
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert tags["rdn.deployment"] == "local" and tags["rdn.preset"] == "none" and tags["rdn.flow_run_id"]
    assert tags["rdn.git_sha"].split("-")[0] == _run(["git", "rev-parse", "HEAD"], clone, env).strip()
    assert {tags[f"rdn.pipeline.stage.{s}"] for s in STAGES} == {"ran"}
    children = _children(client, parent.info.run_id)
    assert set(children) == set(STAGES)
    assert all(c.info.status == "FINISHED" for c in children.values())
    base = children["base_train"]
    history = client.get_metric_history(base.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert {"val/bpb", "memory/peak_mib"} <= set(base.data.metrics), sorted(base.data.metrics)
    assert "tokenizer/vocab_size" in children["tokenizer"].data.metrics
    assert parent.data.metrics["tokenizer/vocab_size"] == 1024  # the summary of metrics/*.json
    assert "metrics/tokenizer.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "metrics")}


def test_second_run_with_nothing_changed_is_all_cached_in_seconds(api, clone):
    state, seconds = _flow(project=str(clone), stages=STAGES)
    assert state.is_completed(), state.message
    assert _statuses(state) == dict.fromkeys(STAGES, "cached")
    assert {r.state.name for r in _task_runs(state).values()} == {"Cached"}
    assert seconds < 60, seconds  # flow incl. MLflow parent run; each stage is one cached `dvc repro -s`
    assert all(r["seconds"] < 10 for r in state.result()["stages"]), state.result()
    client = _mlflow(api)
    parent = state.result()["mlflow_parent_run_id"]
    assert parent and _children(client, parent) == {}  # a child per executed stage: none ran


def test_tokenizer_param_change_reruns_tokenizer_and_downstream_only(api, clone):
    data_manifest = (clone / "artifacts/data/manifest.json").read_bytes()
    override = clone.parent / "vocab-1280.yaml"
    override.write_text(f"extends: {clone / 'params.yaml'}\ntokenizer:\n  vocab_size: 1280\n")
    state, _ = _flow(project=str(clone), stages=STAGES, params_file=str(override))
    assert state.is_completed(), state.message
    assert _statuses(state) == {"data": "cached", "tokenizer": "ran", "base_train": "ran"}
    assert (clone / "artifacts/data/manifest.json").read_bytes() == data_manifest
    assert json.loads((clone / "metrics/tokenizer.json").read_text())["vocab_size"] == 1280
    applied = (clone / "params.yaml").read_text()
    assert applied.startswith("# Written by the rdn-full-pipeline flow from params file")
    assert yaml.safe_load(applied)["tokenizer"]["vocab_size"] == 1280
    assert list((clone / ".dvc/tmp/rdn-params-backup").glob("params-*.yaml"))
    client = _mlflow(api)
    parent = state.result()["mlflow_parent_run_id"]
    assert client.get_run(parent).data.tags["rdn.params_source"] == f"params file {override}"
    assert set(_children(client, parent)) == {"tokenizer", "base_train"}


def test_failing_stage_fails_flow_with_stage_and_key_then_rerun_resumes(api, clone):
    tokenizer_before = (clone / "artifacts/tokenizer/tokenizer.json").read_bytes()
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["base_train"].update(device_batch_size=-3, num_iterations=4)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    state, _ = _flow(project=str(clone), stages=STAGES, retries=2, retry_delay_s=0)
    assert state.is_failed()
    assert "stage 'base_train' failed (exit 2, not retried" in state.message, state.message
    assert "base_train.device_batch_size: must be >= 1 (got -3)" in state.message, state.message
    runs = _task_runs(state)
    assert runs["data"].state.name == runs["tokenizer"].state.name == "Cached"
    assert runs["base_train"].state.is_failed() and runs["base_train"].run_count == 1  # invalid params: no retry
    assert (clone / "artifacts/tokenizer/tokenizer.json").read_bytes() == tokenizer_before

    params["base_train"]["device_batch_size"] = 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state, _ = _flow(project=str(clone), stages=STAGES)
    assert state.is_completed(), state.message
    assert _statuses(state) == {"data": "cached", "tokenizer": "cached", "base_train": "ran"}
    assert json.loads((clone / "metrics/base_train.json").read_text())["steps"] == 4


def test_experiment_set_runs_every_variant_as_a_dvc_experiment(api, clone, base_env):
    sets = clone / "configs" / "experiments"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "tiny_vocab.yaml").write_text(yaml.safe_dump({
        "description": "two tokenizer sizes", "stages": ["tokenizer"],
        "variants": {"v600": {"tokenizer.vocab_size": 600}, "v700": {"tokenizer.vocab_size": 700}}}))
    (sets / "bad_vocab.yaml").write_text(yaml.safe_dump({
        "stages": ["tokenizer"], "variants": {"tiny": {"tokenizer.vocab_size": 5}}}))
    params_before = (clone / "params.yaml").read_bytes()

    bad, _ = _flow(project=str(clone), experiment="bad_vocab")
    assert bad.is_failed() and "tokenizer.vocab_size" in bad.message and _task_runs(bad) == {}

    state, _ = _flow(project=str(clone), experiment="tiny_vocab")
    assert state.is_completed(), state.message
    assert [r["stage"] for r in state.result()["stages"]] == ["tiny_vocab-v600", "tiny_vocab-v700"]
    assert (clone / "params.yaml").read_bytes() == params_before  # variants ran in DVC's temporary copies
    shown = _run([str(BIN / "dvc"), "exp", "show", "--md"], clone, base_env)
    assert "tiny_vocab-v600" in shown and "tiny_vocab-v700" in shown, shown


def test_ablation_parameter_runs_rdn_ablate(api, clone):
    """The flow's ``ablation`` parameter is `rdn ablate`: here every (variant, seed) already has
    its record (the runs themselves are tests/test_ablate.py's), so the flow validates the set,
    runs nothing, and writes the statistics and the report."""
    sets = clone / "configs" / "ablations"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "flowset.yaml").write_text(yaml.safe_dump({
        "description": "flow wiring", "baseline": "a", "seeds": 3, "stages": ["base_train"],
        "variants": {"a": {}, "b": {"base_train.matrix_lr": 0.03}}}))
    runs = clone / "metrics/ablations/flowset/runs"
    runs.mkdir(parents=True, exist_ok=True)
    values = {"a": [2.00, 2.10, 1.95], "b": [1.90, 1.99, 1.86]}   # b lower by 0.10, 0.11, 0.09
    for variant, bpbs in values.items():
        for seed, bpb in enumerate(bpbs, start=1):
            (runs / f"{variant}-s{seed}.json").write_text(json.dumps({
                "variant": variant, "seed": seed, "experiment": f"abl-flowset-{variant}-s{seed}",
                "metrics": {"val_bpb": bpb, "flops_per_token": 1.0, "tokens_seen": 100},
                "curve": [[0, 4.0], [100, bpb]]}))
    params_before = (clone / "params.yaml").read_bytes()
    state, _ = _flow(project=str(clone), ablation="flowset")
    assert state.is_completed(), state.message
    assert state.result()["ablation"]["verdicts"]["b/val_bpb"] == "better"   # [-0.125, -0.075] excludes 0
    result = json.loads((clone / "metrics/ablations/flowset.json").read_text())
    assert [c["verdict"] for c in result["comparisons"] if c["metric"] == "val_bpb"] == ["better"]
    assert (clone / "reports/ablations/flowset.md").exists()
    assert (clone / "params.yaml").read_bytes() == params_before


@pytest.fixture(scope="module")
def mini(tmp, base_env) -> Path:
    """A two-stage DVC project: `flaky` fails on its first run (transient), `after` depends on it."""
    work = tmp / "mini"
    work.mkdir()
    (work / "flaky.py").write_text(
        "import pathlib, sys\n"
        "marker = pathlib.Path('tries.txt')\n"
        "n = int(marker.read_text()) + 1 if marker.exists() else 1\n"
        "marker.write_text(str(n))\n"
        "if n == 1:\n    sys.exit('flaky: simulated transient failure (exit 1)')\n"
        "pathlib.Path('out.txt').write_text('ok')\n")
    (work / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "flaky": {"cmd": "python flaky.py", "deps": ["flaky.py"], "outs": [{"out.txt": {"cache": False}}]},
        "after": {"cmd": "python -c \"open('after.txt','w').write(open('out.txt').read())\"", "deps": ["out.txt"],
                  "outs": [{"after.txt": {"cache": False}}]}}}, sort_keys=False))
    (work / "params.yaml").write_text("tracking:\n  enabled: false\n")
    (work / ".gitignore").write_text("tries.txt\nout.txt\nafter.txt\n")
    _run(["git", "init", "-q", "-b", "main"], work, base_env)
    _run([str(BIN / "dvc"), "init", "-q"], work, base_env)
    _run(["git", "add", "-A"], work, base_env)
    _run(["git", "commit", "-qm", "mini"], work, base_env)
    return work


def test_transient_stage_failure_is_retried(api, mini):
    state, _ = _flow(project=str(mini), retries=1, retry_delay_s=0)
    assert state.is_completed(), state.message
    assert _statuses(state) == {"flaky": "ran", "after": "ran"}
    assert (mini / "tries.txt").read_text() == "2"
    assert _task_runs(state)["flaky"].run_count == 2


def test_lock_refuses_then_waits_for_a_concurrent_run(api, mini):
    from rdn.pipeline.run import PipelineLock

    (mini / "flaky.py").write_text((mini / "flaky.py").read_text() + "# changed\n")  # make both stages stale
    holder = PipelineLock(mini, owner="test holder").acquire()
    try:
        state, seconds = _flow(project=str(mini))
        assert state.is_failed()
        assert "another pipeline run is using" in state.message and "test holder" in state.message, state.message
        assert f"pid {os.getpid()}" in state.message
        assert _task_runs(state) == {} and (mini / "tries.txt").read_text() == "2"

        threading.Timer(2.0, holder.release).start()
        state, seconds = _flow(project=str(mini), lock_wait_s=60)
        assert state.is_completed(), state.message
        assert _statuses(state) == {"flaky": "ran", "after": "cached"}  # same out.txt: DVC skips `after`
    finally:
        holder.release()


def test_tracking_server_down_does_not_fail_the_pipeline(api, mini, monkeypatch):
    from rdn.pipeline.serve import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    good = (mini / "params.yaml").read_text()
    (mini / "params.yaml").write_text("tracking:\n  enabled: true\n  timeout_s: 1.0\n")
    try:
        state, seconds = _flow(project=str(mini))
    finally:
        (mini / "params.yaml").write_text(good)
    assert state.is_completed(), state.message
    assert state.result()["mlflow_parent_run_id"] is None
    assert set(_statuses(state).values()) == {"cached"}


def test_cron_schedule_when_activated_creates_scheduled_runs(serve, clone, base_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {k: v for k, v in dict(base_env, PREFECT_API_URL=serve.api).items() if k != "RDN_PROJECT_DIR"}
    _run([str(clone / "infra/prefect/create-pools.sh"), "gpu"], clone, env)  # kubernetes pool, our job template
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "cluster"], clone, env)
    listing = _run([str(BIN / "prefect"), "deployment", "schedule", "ls", "rdn-full-pipeline/cluster"], clone, env)
    assert "cron: 0 2 * * 6" in listing and "False" in listing and "True" not in listing  # shipped inactive

    with temporary_settings(updates={PREFECT_API_URL: serve.api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("rdn-full-pipeline/cluster")
        pool = client.read_work_pool("rdn-gpu")
        assert pool.type == "kubernetes"
        resources = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        assert resources["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
        assert deployment.parameters["preset"] == "d20"

        def scheduled() -> list:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))))

        assert scheduled() == []
        schedule_id = deployment.schedules[0].id
        _run([str(BIN / "prefect"), "deployment", "schedule", "resume", "rdn-full-pipeline/cluster",
              str(schedule_id)], clone, env)
        # The scheduler service visits deployments every 3 s here (PREFECT_SERVER_SERVICES_
        # SCHEDULER_LOOP_SECONDS in _base_env), so runs normally appear within seconds; under
        # load its SQLite writes can wait on the database lock for tens of seconds (seen: 78 s).
        # The bound only says how long to wait before calling it broken, not how fast it must be.
        deadline = time.monotonic() + 240
        runs = scheduled()
        while not runs and time.monotonic() < deadline:
            time.sleep(1)
            runs = scheduled()
        assert runs, "no scheduled runs 240 s after activating the cron schedule"
        times = sorted(r.expected_start_time for r in runs)
        assert all(t.weekday() == 5 and (t.hour, t.minute) == (2, 0) for t in times), times  # Saturdays 02:00 UTC
        _run([str(BIN / "prefect"), "deployment", "schedule", "pause", "rdn-full-pipeline/cluster",
              str(schedule_id)], clone, env)


def test_flow_passes_cluster_settings_to_the_training_stages(api, clone, base_env):
    """The flow's ``dist`` parameter: two nodes (node 0 = the stage DVC runs in the flow,
    node 1 started by it on this machine), recorded in params.yaml and dvc.lock."""
    two = {"nnodes": 2, "node_launcher": "local"}
    state, _ = _flow(project=str(clone), stages=["base_train"], dist=two)
    assert state.is_failed() and _task_runs(state) == {}  # the global batch does not split over 2 ranks
    assert "base_train.total_batch_size: must be divisible by device_batch_size * seq_len * ranks" in state.message
    batch = clone.parent / "two-ranks.yaml"
    batch.write_text(f"extends: {clone / 'params.yaml'}\n" + "".join(
        f"{name}:\n  total_batch_size: 256\n" for name in ("base_train", "mid_train", "chat_sft")))
    state, _ = _flow(project=str(clone), stages=["base_train"], params_file=str(batch), dist=two)
    try:
        assert state.is_completed(), state.message
        assert _statuses(state) == {"base_train": "ran"}
        assert "dist nnodes=2, node_launcher=local" in state.result()["params_source"]
        ckpt = max((clone / "artifacts/checkpoints/base").glob("step_*"))
        assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
        assert sorted(f.name for f in ckpt.glob("optim_rank*.pt")) == ["optim_rank0.pt", "optim_rank1.pt"]
        lock = yaml.safe_load((clone / "dvc.lock").read_text())
        assert lock["stages"]["base_train"]["params"]["params.yaml"]["dist.nnodes"] == 2
    finally:
        _run(["git", "checkout", "params.yaml"], clone, base_env)


def test_serve_stops_everything_on_ctrl_c(serve):
    assert serve.proc.poll() is None and len(serve.alive_pids()) == 3
    _drain_to_prefect()  # the in-process flow runs' last logs, before the server goes
    os.killpg(serve.proc.pid, signal.SIGINT)
    assert serve.proc.wait(timeout=60) == 0, serve.log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while serve.alive_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert serve.alive_pids() == [], serve.log.read_text()[-3000:]
    assert "stopping" in serve.log.read_text()
