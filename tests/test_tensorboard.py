"""``tracking.tensorboard``: a :class:`~rdn.tracking.run.StageRun` mirrors its metrics and
params to TensorBoard event files under ``<project>/runs/``.

Oracle: the event files read back with TensorBoard's own reader (``EventAccumulator``),
compared with the figures the test logged by hand (TensorBoard stores scalars as float32,
so values are compared after that rounding) and, with MLflow on, with the metric
history MLflow itself returns for the same run. Pinned down:

* MLflow off, TensorBoard on: every key, step, value and wall time arrives, across several
  internal flushes; params are markdown tables, one text tag per top-level section;
* MLflow on (a sqlite store in tmp) and TensorBoard on: both hold the same metrics;
* folder names: ``runs/<run.name>/<stage>``, ``@<DVC experiment>`` or ``@<parent run id[:8]>``
  after the run name, ``<stage>-2`` for a second execution, ``DVC_ROOT`` inside a DVC
  experiment workspace;
* off (the default), or on at a torchrun rank other than 0: nothing is written;
* a ``runs`` that cannot be created warns once and the stage carries on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from rdn.config import TrackingConfig
from rdn.tracking.run import PARENT_RUN_ENV, StageRun
from tests.conftest import store_at

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

TB_ONLY = TrackingConfig(enabled=False, tensorboard=True)


@pytest.fixture(autouse=True)
def _no_outer_run(monkeypatch: pytest.MonkeyPatch):
    """No DVC experiment, parent run or torchrun rank leaks in from the environment."""
    for name in ("DVC_EXP_NAME", "DVC_ROOT", "DVC_EXP_BASELINE_REV", PARENT_RUN_ENV, "RANK"):
        monkeypatch.delenv(name, raising=False)


def read_events(log_dir: Path):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    return float(np.float32(x))


def event_dirs(root: Path) -> list[str]:
    """Folders under ``root/runs`` holding event files, as TensorBoard names its runs."""
    base = root / "runs"
    return sorted(str(p.parent.relative_to(base)) for p in base.rglob("events.out.tfevents.*"))


def test_metrics_and_params_read_back_without_mlflow(project: Path):
    logged: dict[str, list[tuple[int, float]]] = {"train/loss": [], "train/lr": []}
    before = time.time()
    with StageRun("base_train", TB_ONLY, run_name_tag="tiny") as run:
        run.log_params({"model": {"depth": 4, "window": "S|L"}, "run": {"name": "tiny"}, "flags": [1, 2]})
        run.log_params({"hardware": {"device": "cpu"}})
        for step in range(1, 1201):  # > 1000 buffered values: the buffer empties itself mid-run
            loss, lr = 3.0 / step + 0.1, 0.02 * min(1.0, step / 100)
            run.log_metrics({"train/loss": loss, "train/lr": lr, "skipped": None}, step=step)
            logged["train/loss"].append((step, f32(loss)))
            logged["train/lr"].append((step, f32(lr)))
            if step % 250 == 0:
                run.flush()
        run.log_metrics({"base_train/seconds": 12.5}, flush=True)
        logged["base_train/seconds"] = [(0, 12.5)]
        assert not run.active
    after = time.time()

    assert event_dirs(project) == ["tiny/base_train"]
    assert not (project / "mlflow").exists()
    acc = read_events(project / "runs" / "tiny" / "base_train")
    assert scalars(acc) == logged
    assert all(before - 1 <= e.wall_time <= after + 1 for e in acc.Scalars("train/loss"))

    texts = {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    assert texts == {
        "params/model/text_summary": [(0, "| param | value |\n|---|---|\n| model.depth | 4 |\n| model.window | S\\|L |")],
        "params/run/text_summary": [(0, "| param | value |\n|---|---|\n| run.name | tiny |")],
        "params/flags/text_summary": [(0, "| param | value |\n|---|---|\n| flags | [1, 2] |")],
        "params/hardware/text_summary": [(0, "| param | value |\n|---|---|\n| hardware.device | cpu |")],
    }


def test_mlflow_and_tensorboard_hold_the_same_metrics(project: Path, empty_store: Path):
    from mlflow.tracking import MlflowClient

    uri = store_at(empty_store, project / "mlflow" / "mlflow.db")
    with StageRun("mid_train", TrackingConfig(tensorboard=True), run_name_tag="small") as run:
        assert run.active
        for step in range(300):
            run.log_metrics({"train/loss": 5.0 - step * 0.01, "train/tok_per_s": 1000.0 + step}, step=step)
            if step % 100 == 99:
                run.log_metrics({"val/bpb": 2.0 - step / 1000}, step=step, flush=True)
        run_id = run.run_id

    client = MlflowClient(tracking_uri=uri)
    keys = sorted(client.get_run(run_id).data.metrics)
    from_mlflow = {k: sorted((m.step, f32(m.value)) for m in client.get_metric_history(run_id, k)) for k in keys}
    acc = read_events(project / "runs" / "small" / "mid_train")
    assert scalars(acc) == from_mlflow
    assert keys == ["train/loss", "train/tok_per_s", "val/bpb"] and len(from_mlflow["train/loss"]) == 300
    for k in keys:  # the same wall time as MLflow's timestamp (ms)
        wall = sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(run_id, k))
        assert sorted((e.step, pytest.approx(e.wall_time, abs=1e-6)) for e in acc.Scalars(k)) == wall


def test_folder_per_pipeline_run_and_per_execution(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def stage(name: str, run_name: str = "tiny") -> Path:
        with StageRun(name, TB_ONLY, run_name_tag=run_name) as run:
            run.log_metrics({"m": 1.0}, flush=True)
        return run.tensorboard.log_dir

    assert stage("data") == project / "runs" / "tiny" / "data"
    assert stage("data") == project / "runs" / "tiny" / "data-2"  # a rerun is its own line
    assert stage("tokenizer", run_name="my run/v2") == project / "runs" / "my_run_v2" / "tokenizer"
    monkeypatch.setenv(PARENT_RUN_ENV, "0123456789abcdef0123456789abcdef")
    assert stage("data") == project / "runs" / "tiny@01234567" / "data"
    origin = tmp_path / "origin"  # `dvc exp run` in a temp workspace: events go to the project it came from
    origin.mkdir()
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-pads")
    monkeypatch.setenv("DVC_ROOT", str(origin))
    assert stage("base_train") == origin.resolve() / "runs" / "tiny@brisk-pads" / "base_train"
    assert event_dirs(project) == ["my_run_v2/tokenizer", "tiny/data", "tiny/data-2", "tiny@01234567/data"]
    assert event_dirs(origin) == ["tiny@brisk-pads/base_train"]


@pytest.mark.parametrize("cfg, rank", [(TrackingConfig(enabled=False), None), (TB_ONLY, "1")],
                         ids=["off", "rank-1"])
def test_off_or_other_rank_writes_nothing(project: Path, monkeypatch: pytest.MonkeyPatch, cfg: TrackingConfig,
                                          rank: str | None):
    assert TrackingConfig().tensorboard is False
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    with StageRun("base_train", cfg, run_name_tag="tiny") as run:
        run.log_params({"a": {"b": 1}})
        for step in range(50):
            run.log_metrics({"m": float(step)}, step=step)
        run.log_metrics({"m": 0.0}, flush=True)
        assert run.tensorboard is None
    assert list(project.iterdir()) == []


def test_unwritable_runs_warns_once_and_the_stage_goes_on(project: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="rdn.tracking.run")
    (project / "runs").write_text("a file where the folder should be", encoding="utf-8")
    with StageRun("data", TB_ONLY, run_name_tag="tiny") as run:
        run.log_params({"a": 1})
        run.log_metrics({"m": 1.0}, flush=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rdn.tracking.run"]
    assert len(warnings) == 1 and "TensorBoard" in warnings[0]
    assert sorted(p.name for p in project.iterdir()) == ["runs"]
