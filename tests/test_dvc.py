"""DVC integration: the real `dvc repro` in a temporary git copy of this repo.

Checks the pipeline contract a user relies on: a fresh clone reproduces, a second
repro is a no-op, and a tokenizer param change reruns only the tokenizer stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rdn.config import read_params_file
from tests.conftest import REPO, Background, copy_project, head_start, started

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ALL_STAGES = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"), GIT_AUTHOR_NAME="rdn-test",
               GIT_AUTHOR_EMAIL="test@rdn.invalid", GIT_COMMITTER_NAME="rdn-test",
               GIT_COMMITTER_EMAIL="test@rdn.invalid")
    env.pop("RDN_PROJECT_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _skipped(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Stage '") and "didn't change, skipping" in line}


@head_start("dvc-first-repro", "test_dvc.py")
def _first_repro(tmp_path_factory) -> Background:
    """A git repo holding exactly the tracked files of this checkout, with small params,
    and its first `dvc repro` (started as the session starts: see conftest.head_start)."""
    tmp = tmp_path_factory.mktemp("dvc")
    work = tmp / "repo"
    copy_project(work, skip=("artifacts/",), keep=("artifacts/.gitignore",))
    (work / "artifacts").mkdir(exist_ok=True)
    params = read_params_file(work / "configs/smoke.yaml")  # every stage, tiny
    params["tracking"]["enabled"] = False
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(tmp)
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "test copy"], work, env)
    return Background([str(BIN / "dvc"), "repro"], work, env, tmp / "first-repro.log")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """The repo after its first `dvc repro` (asserted to succeed), and that repro's output."""
    first = started("dvc-first-repro", tmp_path_factory)
    return first.cwd, first.env, first.wait()


def test_repro_then_noop_then_param_change_reruns_only_downstream(clone):
    work, env, first = clone
    dvc = str(BIN / "dvc")

    assert _ran(first) == ALL_STAGES, first
    assert (work / "artifacts/data/manifest.json").exists()
    assert (work / "artifacts/tokenizer/tokenizer.json").exists()
    assert yaml.safe_load((work / "metrics/tokenizer.json").read_text())["vocab_size"] == 1024
    for ckpt in ("base", "mid", "sft", "rl"):
        assert list((work / "artifacts/checkpoints" / ckpt).glob("step_*/model.safetensors")), ckpt
    evals = json.loads((work / "metrics/eval.json").read_text())
    assert set(evals) == {"base", "mid", "sft", "rl", "rl_vs_sft", "baseline"} and "val_bpb" in evals["base"]
    assert set(evals["baseline"]) >= {f"{t}_accuracy" for t in ("calculator", "tictactoe", "brackets", "spelling")}
    assert evals["rl_vs_sft"]["examples"] == 2 and 0 <= evals["rl_vs_sft"]["p_value"] <= 1
    assert "calculator_accuracy" in evals["rl"]
    report = (work / "reports/report.md").read_text()
    assert "![Training loss](loss.png)" in report and "after SFT" in report and (work / "reports/loss.png").stat().st_size > 1000

    second = _run([dvc, "repro"], work, env)
    assert _ran(second) == set(), second
    assert _skipped(second) == ALL_STAGES, second
    assert "are up to date" in _run([dvc, "status"], work, env)

    data_manifest = (work / "artifacts/data/manifest.json").read_bytes()
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 1280
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([dvc, "repro"], work, env)
    assert _ran(third) == ALL_STAGES - {"data"}, third  # the changed stage and everything downstream
    assert _skipped(third) == {"data"}, third
    assert (work / "artifacts/data/manifest.json").read_bytes() == data_manifest
    assert yaml.safe_load((work / "metrics/tokenizer.json").read_text())["vocab_size"] == 1280


def test_invalid_params_fail_the_stage_and_keep_outputs(clone):
    work, env, _ = clone
    _run([str(BIN / "dvc"), "repro"], work, env)
    before = (work / "artifacts/tokenizer/tokenizer.json").read_bytes()
    good = (work / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["tokenizer"]["vocab_size"] = -5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        (work / "params.yaml").write_text(good)
    assert proc.returncode != 0
    assert "tokenizer.vocab_size: must be >= 512 (got -5)" in proc.stdout + proc.stderr
    assert (work / "artifacts/tokenizer/tokenizer.json").read_bytes() == before
