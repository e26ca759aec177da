"""Tests for ``rdn.tracking.run.StageRun`` against a real MLflow (sqlite stores, no mocks).

Pinned down, always read back through ``MlflowClient`` and compared with values
written by hand:

* default config: the run lands in ``<project>/mlflow/mlflow.db``, is named after the
  stage, ends FINISHED, has its nested params flattened to ``a.b`` keys, every metric
  value of a 2500-step history (several ``log_batch`` calls) and its artifact (a
  counting wrapper around the real ``log_batch`` checks MLflow's per-batch limits);
* ``RDN_MLFLOW_PARENT_RUN_ID`` nests the run under that parent, in its experiment;
* ``MLFLOW_TRACKING_URI`` beats ``tracking.uri``, which beats the default;
* an unreachable or silent backend costs a few seconds and two warnings (the failure,
  then at the end what was kept where), never an exception, and every unsent figure is
  in ``<project>/mlflow/unsent/*.jsonl``; a backend that fails mid-run keeps what it got
  and the rest is spilled (replay and a real server going away: tests/test_mlflow.py);
* an exception in the ``with`` block marks the run FAILED (KILLED for Ctrl-C) and
  propagates;
* ``tracking.enabled: false`` creates nothing and contacts nothing.

Creating a fresh MLflow sqlite schema takes seconds, so one empty store is made per
session (tests/conftest.py) and copied where a test needs one (the default-location test
makes its own).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from rdn.config import TrackingConfig
from rdn.tracking.run import PARENT_RUN_ENV, StageRun
from tests.conftest import REPO, store_at

mlflow_tracking = pytest.importorskip("mlflow.tracking")
MlflowClient = mlflow_tracking.MlflowClient

# StageRun sets these with os.environ.setdefault; keep each test's view of them clean.
_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture(autouse=True)
def _clean_http_env(monkeypatch: pytest.MonkeyPatch):
    for name in _HTTP_ENV:
        monkeypatch.setenv(name, "placeholder")  # records the original value for restoration
        monkeypatch.delenv(name)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rdn.tracking.run" and r.levelno >= logging.WARNING]


def unsent_records(project: Path) -> list[dict]:
    records = []
    for f in sorted((project / "mlflow" / "unsent").glob("*.jsonl")):
        records.extend(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return records


# --------------------------------------------------------------------------- 1. default store

def test_default_sqlite_store_params_metrics_artifact(project: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    caplog.set_level(logging.WARNING, logger="rdn.tracking.run")
    artifact = project / "notes.txt"
    artifact.write_text("hello artifact\n", encoding="utf-8")
    params = {
        "model": {"depth": 4, "lr": 0.02, "window": "SSL", "inner": {"deep": True}},
        "run": {"name": "tiny"},
        "flags": [1, 2],
        "nothing": None,
        "many": {f"p{i:03d}": i for i in range(150)},  # more than one params batch (100)
    }
    steps = 2500  # more than one metrics batch (1000)
    with StageRun("base_train", TrackingConfig()) as run:
        assert run.active
        batches = []  # spy on the real client: MLflow servers reject > 1000 metrics / 100 params per batch
        real_log_batch = run.client.log_batch

        def counting_log_batch(run_id, metrics=(), params=(), tags=(), **kw):
            batches.append((len(metrics), len(params)))
            return real_log_batch(run_id, metrics=metrics, params=params, tags=tags, **kw)

        run.client.log_batch = counting_log_batch
        run.log_params(params)
        for step in range(steps):
            run.log_metrics({"train/loss": 10.0 / (step + 1)}, step=step)
        run.log_artifact(artifact)
        run_id = run.run_id
    assert all(m <= 1000 and p <= 100 for m, p in batches), batches
    assert sum(m for m, _ in batches) == steps
    assert sum(p for _, p in batches) == 157
    assert sum(1 for m, _ in batches if m) >= 3

    db = project / "mlflow" / "mlflow.db"
    assert db.is_file()
    assert db.resolve().is_relative_to(project.resolve())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    got = client.get_run(run_id)
    assert got.info.run_name == "base_train"
    assert got.info.status == "FINISHED"
    assert got.data.tags["rdn.stage"] == "base_train"
    assert client.get_experiment(got.info.experiment_id).name == "rdn"

    p = got.data.params
    assert p["model.depth"] == "4"
    assert p["model.lr"] == "0.02"
    assert p["model.window"] == "SSL"
    assert p["model.inner.deep"] == "True"
    assert p["run.name"] == "tiny"
    assert p["flags"] == "[1, 2]"
    assert p["nothing"] == "None"
    for i in range(150):
        assert p[f"many.p{i:03d}"] == str(i)
    assert set(p) == {"model.depth", "model.lr", "model.window", "model.inner.deep", "run.name", "flags",
                      "nothing", *(f"many.p{i:03d}" for i in range(150))}

    history = client.get_metric_history(run_id, "train/loss")
    assert len(history) == steps
    history.sort(key=lambda m: m.step)
    assert [m.step for m in history] == list(range(steps))
    assert [m.value for m in history] == [10.0 / (s + 1) for s in range(steps)]
    assert got.data.metrics["train/loss"] == 10.0 / steps

    assert [a.path for a in client.list_artifacts(run_id)] == ["notes.txt"]
    local = client.download_artifacts(run_id, "notes.txt", str(tmp_path))
    assert Path(local).read_text(encoding="utf-8") == "hello artifact\n"

    assert not (project / "mlflow" / "unsent").exists()
    assert warnings_of(caplog) == []


# --------------------------------------------------------------------------- 2. parent nesting

def test_parent_run_nesting(project: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch):
    uri = store_at(empty_store, project / "mlflow" / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    flow_exp = client.create_experiment("pipeline-flows")
    parent = client.create_run(flow_exp, run_name="pipeline")
    parent_id = parent.info.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent_id)

    with StageRun("tokenizer", TrackingConfig()) as run:
        run.log_metrics({"tokenizer/seconds": 1.5}, flush=True)
        run_id = run.run_id
    assert run_id != parent_id

    got = client.get_run(run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent_id
    assert got.info.experiment_id == flow_exp
    assert got.info.run_name == "tokenizer"
    assert got.info.status == "FINISHED"
    children = client.search_runs([flow_exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert [r.info.run_id for r in children] == [run_id]
    assert client.get_run(parent_id).info.status == "RUNNING", "the stage must not close its parent"


# --------------------------------------------------------------------------- 3. URI precedence

def test_uri_precedence_env_over_config_over_default(project: Path, empty_store: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    cfg_db, env_db = tmp_path / "cfg" / "cfg.db", tmp_path / "env" / "env.db"
    cfg_uri = store_at(empty_store, cfg_db)

    # tracking.uri beats the project default
    with StageRun("data", TrackingConfig(uri=cfg_uri)) as run:
        first = run.run_id
    assert MlflowClient(tracking_uri=cfg_uri).get_run(first).info.status == "FINISHED"
    assert not (project / "mlflow" / "mlflow.db").exists()

    # MLFLOW_TRACKING_URI beats tracking.uri
    env_uri = store_at(empty_store, env_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    cfg_before = cfg_db.read_bytes()
    with StageRun("data", TrackingConfig(uri=cfg_uri)) as run:
        run.log_metrics({"x": 1.0}, flush=True)
        second = run.run_id
    got = MlflowClient(tracking_uri=env_uri).get_run(second)
    assert got.info.status == "FINISHED" and got.data.metrics == {"x": 1.0}
    assert cfg_db.read_bytes() == cfg_before, "the config store must not be touched"
    assert [r.info.run_id for r in MlflowClient(tracking_uri=cfg_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=cfg_uri).search_experiments()])] == [first]
    assert not (project / "mlflow" / "mlflow.db").exists()


# --------------------------------------------------------------------------- 4. unreachable backend

def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_unreachable_backend_warns_once_and_spills(project: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch, server: str):
    listener = None
    if server == "refused":
        port = _free_port()  # nobody listens there
    else:  # accepts TCP connections (kernel backlog) but never answers a request
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    caplog.set_level(logging.WARNING, logger="rdn.tracking.run")
    artifact = project / "a.txt"
    artifact.write_text("x", encoding="utf-8")

    expected = set()
    start = time.monotonic()
    try:
        with StageRun("base_train", TrackingConfig(timeout_s=2.0)) as run:
            run.log_params({"model": {"depth": 4}, "run": {"seed": 1}})
            for step in range(1200):  # crosses the 1000-value batch boundary
                run.log_metrics({"train/loss": step * 0.5}, step=step)
                expected.add(("train/loss", step, step * 0.5))
                if step % 100 == 0:
                    run.log_metrics({"val/bpb": 3.0 - step / 1000}, step=step, flush=True)
                    expected.add(("val/bpb", step, 3.0 - step / 1000))
            run.set_tags({"k": "v"})
            run.log_artifact(artifact)
            assert not run.active
    finally:
        if listener is not None:
            listener.close()
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"took {elapsed:.1f}s with timeout_s=2"

    warned = warnings_of(caplog)
    assert len(warned) == 2, [r.getMessage() for r in warned]  # the failure, then what was kept where
    assert uri in warned[0].getMessage()
    spill = next((project / "mlflow" / "unsent").glob("*.jsonl"))
    assert str(spill) in warned[1].getMessage() and f"{len(expected)} unsent metric values" in warned[1].getMessage()

    records = unsent_records(project)
    got = {(r["key"], r["step"], r["value"]) for r in records if "key" in r}
    assert got == expected
    assert sum("key" in r for r in records) == len(expected), "each value spilled once"
    params = {}
    for r in records:
        params.update(r.get("params", {}))
    assert params == {"model.depth": "4", "run.seed": "1"}
    assert not (project / "mlflow" / "mlflow.db").exists()


@pytest.mark.parametrize("first_failure", ["metrics", "params"])
def test_backend_failing_mid_run_keeps_what_was_sent_and_spills_the_rest(project: Path, empty_store: Path,
                                                                         caplog: pytest.LogCaptureFixture,
                                                                         first_failure: str):
    uri = store_at(empty_store, project / "mlflow" / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    caplog.set_level(logging.WARNING, logger="rdn.tracking.run")
    with StageRun("base_train", TrackingConfig()) as run:
        run_id = run.run_id
        run.log_metrics({"loss": 1.0}, step=0, flush=True)
        client.delete_run(run_id)  # from now on the store refuses writes to this run
        if first_failure == "metrics":
            run.log_metrics({"loss": 2.0}, step=1, flush=True)
            run.log_params({"late": {"param": 5}})
        else:
            run.log_params({"late": {"param": 5}})
            run.log_metrics({"loss": 2.0}, step=1, flush=True)
        run.log_metrics({"loss": 3.0}, step=2)  # still buffered at exit
    warned = warnings_of(caplog)
    assert len(warned) == 2 and uri in warned[0].getMessage(), [r.getMessage() for r in warned]
    assert "2 unsent metric values (steps 1..2)" in warned[1].getMessage()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0)]
    records = unsent_records(project)
    assert {(r["key"], r["step"], r["value"]) for r in records if "key" in r} == {("loss", 1, 2.0), ("loss", 2, 3.0)}
    assert [r["params"] for r in records if "params" in r] == [{"late.param": "5"}]


# --------------------------------------------------------------------------- 5. failures mark the run

@pytest.mark.parametrize("exc, status", [(RuntimeError("boom"), "FAILED"), (SystemExit("stage failed"), "FAILED"),
                                         (KeyboardInterrupt(), "KILLED")])
def test_exception_marks_run_and_propagates(project: Path, empty_store: Path, exc: BaseException, status: str):
    uri = store_at(empty_store, project / "mlflow" / "mlflow.db")
    with pytest.raises(type(exc)) as info:
        with StageRun("chat_sft", TrackingConfig()) as run:
            run.log_metrics({"train/loss": 2.5}, step=7)  # buffered, not flushed yet
            run_id = run.run_id
            raise exc
    assert info.value is exc
    got = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert got.info.status == status
    assert got.info.end_time is not None
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(7, 2.5)], "metrics logged before the failure are kept"


def test_sigterm_ends_a_stage_run_as_killed_with_its_metrics(project: Path, empty_store: Path, tmp_path: Path):
    """A stage killed by SIGTERM (a scheduler, `kill`) must not leave its run RUNNING forever."""
    import os
    import signal
    import subprocess
    import sys

    uri = store_at(empty_store, project / "mlflow" / "mlflow.db")
    ready = tmp_path / "ready"
    code = (
        "import pathlib, sys, time\n"
        "from rdn.config import validate_params\n"
        "from rdn.pipeline.stage import stage_run\n"
        "import yaml\n"
        f"params = validate_params(yaml.safe_load(open({str(REPO / 'params.yaml')!r})))\n"
        "with stage_run('data', params, ('data',)) as run:\n"
        "    run.log_metrics({'train/loss': 1.5}, step=3)\n"
        f"    pathlib.Path({str(ready)!r}).write_text(run.run_id)\n"
        "    time.sleep(120)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RDN_PROJECT_ROOT": str(project)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.communicate()[0] if proc.poll() is not None else "stage never started"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert "terminated (SIGTERM)" in out
    run = MlflowClient(tracking_uri=uri).get_run(ready.read_text())
    assert run.info.status == "KILLED" and run.info.end_time is not None
    history = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]


# --------------------------------------------------------------------------- 6. disabled

def test_disabled_creates_and_contacts_nothing(project: Path, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    caplog.set_level(logging.DEBUG, logger="rdn.tracking.run")
    artifact = project / "a.txt"
    artifact.write_text("x", encoding="utf-8")
    start = time.monotonic()
    with StageRun("data", TrackingConfig(enabled=False)) as run:
        run.log_params({"a": {"b": 1}})
        for step in range(1500):
            run.log_metrics({"m": float(step)}, step=step)
        run.log_metrics({"m": 0.0}, flush=True)
        run.set_tags({"k": "v"})
        run.log_artifact(artifact)
        assert not run.active and run.run_id is None
    assert time.monotonic() - start < 5
    assert not (project / "mlflow").exists()
    assert sorted(p.name for p in project.iterdir()) == ["a.txt"]
    assert warnings_of(caplog) == []

    with pytest.raises(ValueError, match="inside"):
        with StageRun("data", TrackingConfig(enabled=False)):
            raise ValueError("inside")
    assert not (project / "mlflow").exists()


# --------------------------------------------------------------------------- 7. replay by hand

def test_flush_replays_a_spill_whose_replay_crashed(project: Path, empty_store: Path, capsys):
    """A spill recorded for a sqlite store, left claimed by a replay whose process died:
    `rdn tracking flush` puts it back, creates the never-created run with the recorded name,
    start time, params, metrics and final status, and moves the file to unsent/sent/."""
    from rdn.cli.main import main as rdn_main

    uri = store_at(empty_store, project / "mlflow" / "mlflow.db")
    unsent = project / "mlflow" / "unsent"
    unsent.mkdir(parents=True)
    header = {"run_id": None, "uri": uri, "stage": "tokenizer", "experiment": "rdn", "parent_run_id": None,
              "tags": {"rdn.stage": "tokenizer"}, "start_time": 1_700_000_000_000, "pid": 999_999_999,
              "host": "elsewhere"}
    lines = [{"run": header}, {"params": {"tokenizer.vocab_size": "600"}},
             *({"key": "tokenizer/loss", "value": 1.0 / s, "timestamp": 1_700_000_000_000 + s, "step": s}
               for s in range(1, 6)),
             {"end": {"status": "FAILED", "end_time": 1_700_000_100_000}}]
    claimed = unsent / "tokenizer-x.jsonl.replaying-999999999"  # that pid does not exist
    claimed.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"key": "torn', encoding="utf-8")

    assert rdn_main(["tracking", "flush", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer-x.jsonl: 5 metric values for run (not created) of stage tokenizer" in out
    assert (unsent / "tokenizer-x.jsonl").exists() and not claimed.exists()

    assert rdn_main(["tracking", "flush"]) == 0
    out = capsys.readouterr().out
    assert "sent tokenizer-x.jsonl: 5 metric values, 1 params, status FAILED -> run " in out
    run_id = out.split("-> run ")[1].split()[0]
    assert not list(unsent.glob("*.jsonl*")) and (unsent / "sent" / "tokenizer-x.jsonl").exists()
    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run_id)
    assert got.info.run_name == "tokenizer" and got.info.status == "FAILED"
    assert got.info.start_time == 1_700_000_000_000 and got.info.end_time == 1_700_000_100_000
    assert got.data.params == {"tokenizer.vocab_size": "600"} and got.data.tags["rdn.replayed"] == "true"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "tokenizer/loss")] == \
        [(s, 1.0 / s) for s in range(1, 6)]
    sent_header = json.loads((unsent / "sent" / "tokenizer-x.jsonl").read_text().splitlines()[0])["run"]
    assert sent_header["run_id"] == run_id  # written back before sending: a retry cannot create it twice

    assert rdn_main(["tracking", "flush"]) == 0
    assert "nothing unsent" in capsys.readouterr().out
