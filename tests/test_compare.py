"""``rdn compare`` against a real MLflow sqlite store holding runs written here by hand.

Three top-level runs in one experiment, each value below is what the table must show:

* ``pipe-a``: a pipeline parent whose stage children were logged through StageRun under
  ``RDN_MLFLOW_PARENT_RUN_ID``: base_train (summary metrics), mid_train (the highest
  peak memory), evaluate (``eval/base/val_bpb`` wins over base_train's bpb; rl accuracy
  wins over sft's);
* ``pipe-b``: a parent with base_train only: bpb from the last ``val/bpb``, tok/s and MFU
  as medians of the per-step history after warm-up;
* ``solo``: a standalone base_train run (plain ``dvc repro``), its own ``eval/<task>/accuracy``.
"""

from __future__ import annotations

import csv
import io

import pytest

from rdn.cli.main import main as rdn_main
from rdn.config import TrackingConfig
from rdn.tracking.run import PARENT_RUN_ENV, StageRun

mlflow_tracking = pytest.importorskip("mlflow.tracking")
MlflowClient = mlflow_tracking.MlflowClient


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ablate", artifact_location=(root / "art").as_uri())
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("RDN_PROJECT_ROOT", str(root))
    ids = {}
    cfg = TrackingConfig(experiment="ablate")
    try:
        # pipe-a: children written through the real StageRun
        a = client.create_run(exp, run_name="pipe-a", tags={"rdn.kind": "pipeline"}).info.run_id
        mp.setenv(PARENT_RUN_ENV, a)
        with StageRun("base_train", cfg) as r:
            r.log_params({"model": {"depth": 4, "use_coordinates": True}, "base_train": {"matrix_lr": 0.02},
                          "run": {"seed": 1}})
            for step in range(1, 11):
                r.log_metrics({"train/loss": 5.0 - 0.1 * step, "train/tok_per_sec": 1000.0 + step,
                               "train/mfu": 0.01 * step}, step=step)
            r.log_metrics({"val/bpb": 2.5}, step=10)
            r.log_metrics({"memory/peak_mib": 300.0}, step=10)
            r.log_metrics({"base_train/final_val_bpb": 2.5, "base_train/final_train_loss": 4.0,
                           "base_train/tok_per_sec": 1234.5}, step=10, flush=True)
        with StageRun("mid_train", cfg) as r:
            r.log_params({"run": {"seed": 1}, "mid_train": {"num_iterations": 60}})
            r.log_metrics({"val/bpb": 1.9, "memory/peak_mib": 512.25}, step=60, flush=True)
        with StageRun("evaluate", cfg) as r:
            r.log_params({"run": {"seed": 1}})
            r.log_metrics({"eval/base/val_bpb": 2.4375, "eval/sft/calculator_accuracy": 0.25,
                           "eval/rl/calculator_accuracy": 0.5, "eval/rl/spelling_accuracy": 0.125,
                           "eval/mid/spelling_accuracy": 0.75}, flush=True)
        ids["pipe-a"] = a

        # pipe-b: base_train only, no summary metrics
        b = client.create_run(exp, run_name="pipe-b").info.run_id
        child = client.create_run(exp, run_name="base_train", tags={"mlflow.parentRunId": b,
                                                                    "rdn.stage": "base_train"}).info.run_id
        for k, v in {"model.depth": "4", "model.use_coordinates": "False", "base_train.matrix_lr": "0.04",
                     "run.seed": "1"}.items():
            client.log_param(child, k, v)
        for step, (tps, mfu) in enumerate([(10.0, 0.9), (20.0, 0.9), (30.0, 0.9), (100.0, 0.2), (300.0, 0.4),
                                           (200.0, 0.3)], start=1):
            client.log_metric(child, "train/tok_per_sec", tps, step=step)
            client.log_metric(child, "train/mfu", mfu, step=step)
        client.log_metric(child, "val/bpb", 3.0, step=0)
        client.log_metric(child, "val/bpb", 2.75, step=6)
        client.log_metric(child, "memory/peak_mib", 100.0, step=6)
        client.set_terminated(child)
        ids["pipe-b"] = b

        # solo: a stage run with no parent
        mp.delenv(PARENT_RUN_ENV)
        with StageRun("base_train", cfg) as r:
            r.log_params({"model": {"depth": 2, "use_coordinates": True}, "base_train": {"matrix_lr": 0.02},
                          "run": {"seed": 1}})
            r.log_metrics({"val/bpb": 3.5, "eval/calculator/accuracy": 0.0625}, step=3, flush=True)
            ids["solo"] = r.run_id
    finally:
        mp.undo()
    return uri, ids


def rows_of(text: str) -> dict[str, dict[str, str]]:
    return {r["run"]: r for r in csv.DictReader(io.StringIO(text))}


def run_compare(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = rdn_main(["compare", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_experiment_table_values(store, capsys, tmp_path, monkeypatch):
    uri, ids = store
    monkeypatch.chdir(tmp_path)  # no params.yaml here: --uri decides
    code, out, err = run_compare(capsys, "--experiment", "ablate", "--uri", uri, "--format", "csv")
    assert code == 0, err
    header = out.splitlines()[0].split(",")
    assert header[:5] == ["run", "run_id", "status", "val_bpb", "train_loss"]
    assert header[5:8] == ["calculator_acc", "spelling_acc", "tok_per_sec"]
    rows = rows_of(out)
    assert set(rows) == {"pipe-a", "pipe-b", "base_train"}  # children are not rows of their own
    a, b, solo = rows["pipe-a"], rows["pipe-b"], rows["base_train"]
    assert a["run_id"] == ids["pipe-a"] and b["run_id"] == ids["pipe-b"] and solo["run_id"] == ids["solo"]

    assert float(a["val_bpb"]) == 2.4375            # evaluate's eval/base/val_bpb
    assert float(a["train_loss"]) == 4.0            # base_train/final_train_loss
    assert float(a["calculator_acc"]) == 0.5        # rl beats sft
    assert float(a["spelling_acc"]) == 0.125        # rl beats mid
    assert float(a["tok_per_sec"]) == 1234.5        # base_train summary
    assert float(a["mfu"]) == pytest.approx(0.07)   # median of steps 4..10
    assert float(a["peak_mib"]) == 512.25           # max over stages

    assert float(b["val_bpb"]) == 2.75              # last val/bpb
    assert b["train_loss"] == "" and b["calculator_acc"] == ""
    assert float(b["tok_per_sec"]) == 200.0         # median of steps 4..6
    assert float(b["mfu"]) == pytest.approx(0.3)
    assert float(b["peak_mib"]) == 100.0

    assert float(solo["val_bpb"]) == 3.5 and float(solo["calculator_acc"]) == 0.0625
    assert solo["mfu"] == "" and solo["peak_mib"] == ""

    # param columns: exactly the params that differ between the runs
    params = [h for h in header if "." in h]
    assert params == ["base_train.matrix_lr", "model.depth", "model.use_coordinates"]
    assert (a["base_train.matrix_lr"], b["base_train.matrix_lr"], solo["base_train.matrix_lr"]) == ("0.02", "0.04", "0.02")
    assert (a["model.use_coordinates"], b["model.use_coordinates"]) == ("True", "False")
    assert "mid_train.num_iterations" not in header  # only pipe-a ran mid_train: not a difference


def test_run_ids_order_formats_and_extra_metric(store, capsys, tmp_path, monkeypatch):
    uri, ids = store
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_compare(capsys, ids["pipe-b"], ids["pipe-a"], "--uri", uri, "--format", "md",
                               "-m", "mid_train:val/bpb", "--params", "none")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("| run | run_id | status | val_bpb | train_loss |")
    assert lines[0].rstrip().endswith("| mid_train:val/bpb |")
    assert set(lines[1]) <= set("|-:")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["pipe-b", "pipe-a"]
    a = [c.strip() for c in lines[3].split("|")]
    assert "2.4375" in a and "0.500" in a and "1,234" in a and "7.00%" in a and "512.2" in a and "1.9000" in a
    assert "base_train.matrix_lr" not in lines[0]

    code, out, _ = run_compare(capsys, ids["pipe-a"], ids["solo"], "--uri", uri)  # rich table
    assert code == 0
    assert "pipe-a" in out and "2.4375" in out and "model.depth" in out


def test_errors_name_the_problem(store, capsys, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.chdir(tmp_path)
    code, _, err = run_compare(capsys, "--experiment", "nope", "--uri", uri)
    assert code == 1 and "no MLflow experiment named 'nope'" in err and "ablate" in err
    code, _, err = run_compare(capsys, "0" * 32, "--uri", uri)
    assert code == 1 and f"run {'0' * 32}" in err
    code, _, err = run_compare(capsys, "abc", "--experiment", "ablate")
    assert code == 2 and "not both" in err


def test_defaults_come_from_params_yaml(store, capsys, tmp_path, monkeypatch):
    """Without --uri/--experiment: tracking.uri and tracking.experiment of ./params.yaml."""
    uri, ids = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"tracking:\n  uri: {uri}\n  experiment: ablate\n")
    code, out, err = run_compare(capsys, "--format", "csv")
    assert code == 0, err
    assert set(rows_of(out)) == {"pipe-a", "pipe-b", "base_train"}


def test_full_and_cached_pipeline_rows_carry_the_same_metrics(tmp_path, capsys, monkeypatch):
    """A pipeline run, then the same pipeline again with every stage cached (DVC finds them
    up to date, so no stage opens a run): both parent rows show every figure the stages
    wrote, taken from the children where they ran and from the parent's summary of the
    metrics files where they did not. Oracle: the metrics files written here."""
    from rdn.io import write_json
    from rdn.tracking.parent import finish_parent_run, metrics_summary, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RDN_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(experiment="rerun")
    base = {"final_val_bpb": 1.875, "final_train_loss": 4.5, "tok_per_sec": 3000.0, "peak_memory_mib": 1250.0}
    evals = {"base": {"val_bpb": 1.8125}, "sft": {"calculator_accuracy": 0.75}, "rl": {"calculator_accuracy": 0.875},
             "baseline": {"calculator_accuracy": 0.125, "examples": 100},
             "rl_vs_sft": {"sft_accuracy": 0.75, "rl_accuracy": 0.875, "p_value": 0.03125}}
    write_json(tmp_path / "metrics" / "base_train.json", base)
    write_json(tmp_path / "metrics" / "eval.json", evals)
    write_json(tmp_path / "metrics" / "chat_rl.json", {"steps": 7})  # left by a stage this pipeline did not run
    files = ["metrics/base_train.json", "metrics/eval.json"]
    summary = metrics_summary(tmp_path, files)
    assert summary["eval/base/val_bpb"] == 1.8125 and summary["base_train/final_train_loss"] == 4.5
    assert not any(k.startswith("chat_rl/") for k in summary)

    full = start_parent_run(cfg, {}, tmp_path, run_name="pipeline-full")
    monkeypatch.setenv(PARENT_RUN_ENV, full)
    with StageRun("base_train", cfg) as r:  # what stages/__init__.py logs for a training stage
        r.log_metrics({"val/bpb": 1.875, "memory/peak_mib": 1250.0}, step=10)
        r.log_metrics({f"base_train/{k}": v for k, v in base.items()}, step=10, flush=True)
    with StageRun("evaluate", cfg) as r:  # rdn.eval.evaluate logs one row per evaluated checkpoint
        r.log_metrics({f"eval/{s}/{k}": v for s in ("base", "sft", "rl") for k, v in evals[s].items()}, flush=True)
    monkeypatch.delenv(PARENT_RUN_ENV)
    assert finish_parent_run(full, "FINISHED", summary, tracking_cfg=cfg, root=tmp_path)
    cached = start_parent_run(cfg, {}, tmp_path, run_name="pipeline-cached")
    assert finish_parent_run(cached, "FINISHED", summary, tracking_cfg=cfg, root=tmp_path)

    code, out, err = run_compare(capsys, "--experiment", "rerun", "--format", "csv", "--params", "none",
                                 "-m", "eval/rl_vs_sft/p_value")
    assert code == 0, err
    header, rows = out.splitlines()[0].split(","), rows_of(out)
    assert set(rows) == {"pipeline-full", "pipeline-cached"}
    assert [h for h in header if h.endswith("_acc")] == ["calculator_acc"]  # baseline, rl_vs_sft: not models
    expected = {"val_bpb": 1.8125, "train_loss": 4.5, "calculator_acc": 0.875, "tok_per_sec": 3000.0,
                "peak_mib": 1250.0, "eval/rl_vs_sft/p_value": 0.03125}
    for name, row in rows.items():
        assert {k: float(row[k]) if row[k] else None for k in expected} == expected, name
        assert row["mfu"] == "", name  # no MFU on CPU: none logged
