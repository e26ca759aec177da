"""Integration tests against a real ``mlflow server`` on a free loopback port.

* The server is killed (SIGKILL, by process group) in the middle of a StageRun's
  training-like loop: the loop never raises and is not stalled, the steps sent before
  the kill are on the server, every later step is in ``mlflow/unsent/``; when the
  server comes back during the run, the run reconnects, replays its spill and logs
  live again; killed again before the end, what is left is replayed by
  ``rdn tracking flush`` (and automatically by the next stage run that reaches the
  server). At the end the run's ``train/loss`` history holds every step exactly once
  and the run is FINISHED.
* The run tree: with ``RDN_MLFLOW_PARENT_RUN_ID`` set to a parent run, the real stage
  entry points (``python -m stages.data|tokenizer|base_train``, tiny params, in a copy
  of the project) each make one child run under that parent carrying the stage's
  params and metrics (``train/loss`` history, ``val/bpb``, ``memory/peak_mib``), and
  ``rdn compare <parent>`` reads them back. Then the server is killed while a real
  ``stages.base_train`` (80 steps) is logging: the stage exits 0 with the right
  metrics file, the spill holds every step from the kill to the end plus the final
  status, and ``rdn tracking flush`` after a restart completes the run (steps 1..80).

The server runs with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (no job runner, so
it starts in ~7 s instead of ~30 s on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rdn.config import TrackingConfig
from rdn.tracking import replay
from rdn.tracking import run as tracking
from rdn.tracking.client import backend_answers
from rdn.tracking.run import PARENT_RUN_ENV, StageRun
from tests.conftest import REPO, copy_project, store_at

pytestmark = pytest.mark.integration
mlflow_tracking = pytest.importorskip("mlflow.tracking")
MlflowClient = mlflow_tracking.MlflowClient
BIN = Path(sys.executable).parent


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class MlflowServer:
    """``mlflow server`` in its own process group (uvicorn is a child), stopped by that group's id."""

    def __init__(self, workdir: Path, port: int | None = None, template: Path | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "server.db"
        self.template = template
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.template is not None and not self.db.exists():  # an empty store: no schema to create
            store_at(self.template, self.db, self.workdir / "art")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        log = open(self.workdir / "server.log", "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.db}", "--default-artifact-root", str(self.workdir / "art")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited {self.proc.returncode}:\n{self.log_tail()}")
            if backend_answers(self.url, 1.0):
                self.starts.append(time.monotonic() - t0)
                return self
            time.sleep(0.25)
        self.kill()
        pytest.fail(f"mlflow server not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and backend_answers(self.url, 0.5):
            time.sleep(0.1)  # uvicorn children die with the group; wait until the port is free

    def log_tail(self) -> str:
        p = self.workdir / "server.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""


@pytest.fixture
def server_factory(tmp_path: Path, empty_store: Path):
    servers: list[MlflowServer] = []

    def make(name: str = "srv") -> MlflowServer:
        srv = MlflowServer(tmp_path / name, template=empty_store)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.kill()


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def pending(project: Path) -> list[Path]:
    return sorted((project / "mlflow" / "unsent").glob("*.jsonl"))


# --------------------------------------------------------------------------- 1. server dies mid-run

def test_server_killed_mid_run_loses_no_step(project: Path, server_factory, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="rdn.tracking.run")
    srv = server_factory().start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    monkeypatch.setattr(tracking, "RECONNECT_FIRST_S", 0.5)
    monkeypatch.setattr(tracking, "RECONNECT_MAX_S", 1.0)
    client = MlflowClient(tracking_uri=srv.url)

    def loss(step: int) -> float:
        return 10.0 / step

    steps, log_every = 90, 5
    phases: dict[str, float] = {}
    with StageRun("base_train", TrackingConfig(timeout_s=2.0)) as run:
        run_id = run.run_id
        run.log_params({"model": {"depth": 2}})
        for step in range(1, steps + 1):
            t0 = time.monotonic()
            run.log_metrics({"train/loss": loss(step)}, step=step)
            if step % log_every == 0:
                run.log_metrics({"memory/peak_mib": 1.0 * step}, step=step, flush=True)
            phases[f"step{step}"] = time.monotonic() - t0
            if step == 20:  # steps 1..20 were flushed live
                assert run.active
                assert len(history(client, run_id, "train/loss")) == 20
                srv.kill()
            if step == 40:  # down since step 21: everything from there is spilled, nothing raised
                assert not run.active
                spilled = [json.loads(x) for f in pending(project) for x in f.read_text().splitlines()]
                assert {r["step"] for r in spilled if r.get("key") == "train/loss"} == set(range(21, 41))
                t_restart = time.monotonic()
                srv.start()
                phases["restart"] = time.monotonic() - t_restart
                time.sleep(1.1)  # past the probe interval
            if step == 45:  # the next flush probed, reconnected and replayed the spill into this run
                assert run.active, caplog.text[-2000:]
                assert pending(project) == []
                assert history(client, run_id, "train/loss") == [(s, loss(s)) for s in range(1, 46)]
                assert any("is back: replayed 24 metric values" in r.getMessage() for r in caplog.records)
            if step == 70:
                srv.kill()
        assert not run.active
    slowest = max(v for k, v in phases.items() if k.startswith("step"))
    assert slowest < 8, f"a dead server stalled one step for {slowest:.1f}s"

    # after the run: steps 71..90 and the final status are waiting in the spill file
    files = pending(project)
    assert len(files) == 1
    header, records = replay.read_spill(files[0])
    assert header["run_id"] == run_id and header["uri"] == srv.url
    assert sorted(r["step"] for r in records if r.get("key") == "train/loss") == list(range(71, 91))
    assert [r["end"]["status"] for r in records if "end" in r] == ["FINISHED"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("24 unsent metric values (steps 71..90)" in m for m in warned), warned
    assert sum("failed to log metrics" in m for m in warned) == 2, warned  # one warning per outage

    # `rdn tracking flush` while the server is still down: reports the failure, keeps the file
    from rdn.cli.main import main as rdn_main

    assert rdn_main(["tracking", "flush"]) == 1
    assert pending(project) == files

    srv.start()
    assert client.get_run(run_id).info.status == "RUNNING"  # the close was lost with the server
    assert rdn_main(["tracking", "flush"]) == 0
    assert pending(project) == []
    assert list((project / "mlflow" / "unsent" / "sent").glob("*.jsonl"))
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert history(client, run_id, "train/loss") == [(s, loss(s)) for s in range(1, steps + 1)]
    assert history(client, run_id, "memory/peak_mib") == [(s, 1.0 * s) for s in range(log_every, steps + 1, log_every)]
    assert got.data.params == {"model.depth": "2"}
    print(f"\nmlflow server starts: {[round(s, 1) for s in srv.starts]} s; slowest step while down "
          f"{slowest:.2f} s; restart {phases['restart']:.1f} s")


def test_next_stage_replays_what_a_dead_server_missed(project: Path, server_factory,
                                                      monkeypatch: pytest.MonkeyPatch):
    """Down from the start: the run is created later, by the next stage that reaches the server,
    nested under the same parent, with its metrics, params, artifact and status."""
    srv = server_factory()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)  # nobody listens yet
    monkeypatch.setattr(tracking, "RECONNECT_FIRST_S", 1000.0)
    parent_id = "0" * 32
    artifact = project / "manifest.json"
    artifact.write_text('{"v": 1}', encoding="utf-8")
    t0 = time.monotonic()
    with StageRun("data", TrackingConfig(timeout_s=2.0)) as run:
        assert not run.active
        run.log_params({"data": {"source": "stdlib"}})
        run.log_metrics({"data/seconds": 1.5}, flush=True)
        run.log_artifact(artifact)
    assert time.monotonic() - t0 < 20
    artifact.write_text('{"v": 2}', encoding="utf-8")  # the stage's file changes; the copy is what was logged

    srv.start()
    client = MlflowClient(tracking_uri=srv.url)
    exp = client.create_experiment("pipelines")
    parent_id = client.create_run(exp, run_name="pipeline").info.run_id
    # the spill recorded no parent (none was set); a file with one nests under it on replay
    spill = pending(project)[0]
    header, _ = replay.read_spill(spill)
    header["parent_run_id"] = parent_id
    replay._rewrite_header(spill, header)

    with StageRun("tokenizer", TrackingConfig(timeout_s=2.0)) as nxt:
        assert nxt.active
        assert [r.ok for r in nxt.replayed] == [True]
        replayed_id = nxt.replayed[0].run_id
    assert pending(project) == []
    got = client.get_run(replayed_id)
    assert got.info.run_name == "data" and got.info.status == "FINISHED"
    assert got.data.tags["mlflow.parentRunId"] == parent_id and got.data.tags["rdn.replayed"] == "true"
    assert got.info.experiment_id == exp
    assert got.data.metrics == {"data/seconds": 1.5}
    assert got.data.params == {"data.source": "stdlib"}
    local = client.download_artifacts(replayed_id, "", str(project / "dl"))
    assert [p.read_text() for p in Path(local).iterdir()] == ['{"v": 1}']


# --------------------------------------------------------------------------- 2. run tree of real stages

def _copy_project(dst: Path) -> Path:
    copy_project(dst, skip=("artifacts/", "metrics/", "mlflow/"))
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["data"].update(include_tests=False, max_total_bytes=1_000_000)
    params["tokenizer"].update(vocab_size=1024, max_chars=500_000)
    params["tracking"].update(enabled=True, log_every=2)
    params["model"].update(depth=2, sequence_len=64)
    params["base_train"].update(device_batch_size=2, seq_len=64, total_batch_size=128, num_iterations=6,
                                eval_every=3, eval_tokens=256, save_every=6)
    for later in ("mid_train", "chat_sft"):
        params[later].update(seq_len=64)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def test_run_tree_real_stages_under_parent(tmp_path: Path, server_factory, capsys):
    srv = server_factory().start()
    client = MlflowClient(tracking_uri=srv.url)
    exp = client.create_experiment("rdn-pipeline")
    parent_id = client.create_run(exp, run_name="rdn-full-pipeline", tags={"rdn.kind": "pipeline"}).info.run_id

    work = _copy_project(tmp_path / "proj")
    env = dict(os.environ, MLFLOW_TRACKING_URI=srv.url, PYTHONPATH=str(work), **{PARENT_RUN_ENV: parent_id})
    env.pop("RDN_PROJECT_ROOT", None)
    times = {}
    for stage in ("data", "tokenizer", "base_train"):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        times[stage] = round(time.monotonic() - t0, 1)
        assert proc.returncode == 0, f"{stage}:\n{proc.stderr[-4000:]}"
        assert "MLflow tracking" not in proc.stderr, proc.stderr[-2000:]  # no tracking warning

    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_stage = {r.info.run_name: r for r in children}
    assert sorted(by_stage) == ["base_train", "data", "tokenizer"] and len(children) == 3
    for name, r in by_stage.items():
        assert r.info.status == "FINISHED", name
        assert r.data.tags["rdn.stage"] == name
        assert r.data.params["run.name"] == "tiny"
    assert client.get_run(parent_id).info.status == "RUNNING", "stages must not close the flow's parent"
    assert not (work / "mlflow").exists() or not list((work / "mlflow").rglob("*.jsonl"))

    data = by_stage["data"].data
    assert data.metrics["data/train_documents"] > 0 and data.params["data.max_total_bytes"] == "1000000"
    tok = by_stage["tokenizer"].data
    assert tok.params["tokenizer.vocab_size"] == "1024"
    assert "tokenizer/seconds" in tok.metrics

    base = by_stage["base_train"]
    bid = base.info.run_id
    loss = history(client, bid, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert all(v > 0 for _, v in loss)
    bpb = history(client, bid, "val/bpb")
    assert [s for s, _ in bpb] == [0, 3, 6] and all(0 < v < 20 for _, v in bpb)
    assert history(client, bid, "memory/peak_mib") and base.data.metrics["memory/peak_mib"] > 0
    assert len(history(client, bid, "train/tok_per_sec")) == 6
    assert base.data.params["model.depth"] == "2" and base.data.params["base_train.num_iterations"] == "6"
    summary = json.loads((work / "metrics" / "base_train.json").read_text())
    assert base.data.metrics["val/bpb"] == pytest.approx(summary["final_val_bpb"])

    # rdn compare reads the tree back: the parent's row carries its children's key metrics
    from rdn.cli.main import main as rdn_main

    capsys.readouterr()
    assert rdn_main(["compare", parent_id, "--uri", srv.url, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    rows = list(__import__("csv").DictReader(out.splitlines()))
    assert len(rows) == 1, out
    assert float(rows[0]["val_bpb"]) == pytest.approx(summary["final_val_bpb"], rel=1e-3)
    assert float(rows[0]["tok_per_sec"]) == pytest.approx(summary["tok_per_sec"], rel=1e-3)
    peaks = [v for r in by_stage.values() for k, v in r.data.metrics.items()
             if k == "memory/peak_mib" or k.endswith("/peak_memory_mib")]
    assert float(rows[0]["peak_mib"]) == pytest.approx(max(peaks), rel=1e-3)  # highest of any stage

    # the server dies in the middle of a real base_train: the stage succeeds, no step is lost
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["base_train"].update(num_iterations=80, eval_every=80, save_every=80, resume="never")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log_path = tmp_path / "base_train_killed.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stages.base_train"], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        live: list = []
        while not live:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - t0 < 300
            runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
            new = [r for r in runs if r.info.run_name == "base_train" and r.info.run_id != bid]
            if new and len(history(client, new[0].info.run_id, "train/loss")) >= 6:
                live = new
            else:
                time.sleep(0.2)
        killed_id = live[0].info.run_id
        srv.kill()
        t_kill = time.monotonic()
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    after_kill = time.monotonic() - t_kill
    output = log_path.read_text()
    assert "MLflow tracking at" in output and "training continues" in output
    spills = list((work / "mlflow" / "unsent").glob("*.jsonl"))
    assert len(spills) == 1, output[-3000:]
    header, records = replay.read_spill(spills[0])
    assert header["run_id"] == killed_id and header["parent_run_id"] == parent_id
    spilled = sorted(r["step"] for r in records if r.get("key") == "train/loss")
    assert spilled and spilled[-1] == 80 and spilled == list(range(spilled[0], 81)), spilled
    assert [r["end"]["status"] for r in records if "end" in r] == ["FINISHED"]
    summary = json.loads((work / "metrics" / "base_train.json").read_text())
    assert summary["steps"] == 80

    srv.start()
    assert rdn_main(["tracking", "flush", "--project", str(work)]) == 0
    got = client.get_run(killed_id)
    assert got.info.status == "FINISHED"
    assert [s for s, _ in history(client, killed_id, "train/loss")] == list(range(1, 81))
    assert got.data.metrics["base_train/final_val_bpb"] == pytest.approx(summary["final_val_bpb"])
    assert [s for s, _ in history(client, killed_id, "val/bpb")] == [0, 80]
    print(f"\nstage times (s): {times}; mlflow server starts {[round(x, 1) for x in srv.starts]} s; "
          f"base_train ran {after_kill:.1f} s after the kill, {len(spilled)} steps spilled and replayed")
