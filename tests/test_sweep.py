"""Experiment sets (configs/experiments) and ``rdn sweep``.

* every shipped set validates against params.yaml: each variant's overrides land in the
  validated params, plus the set's MLflow experiment;
* an invalid variant (unknown key, bad value, unknown stage) fails before anything is
  queued, naming the file, the variant and the key;
* the printed ``-S`` values read back through DVC's own (Hydra) override parser as the
  values in the YAML;
* for real: ``rdn sweep <set> --temp --run`` in a temporary git copy of the project runs
  ``dvc exp run --temp`` for two tokenizer variants; each lands in the project's MLflow
  store under the set's experiment as one parent run (named after the DVC experiment)
  with the stage runs as children carrying the variant's param; ``dvc exp show --md``
  lists both experiments and ``rdn compare`` shows the param that differs.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rdn.cli.main import main as rdn_main
from rdn.pipeline.sweep import SweepError, available, format_value, load_set, validate_set
from tests.conftest import REPO, Background, copy_project, head_start, started

BIN = Path(sys.executable).parent
DVC_STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def _get(params, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def test_shipped_experiment_sets_validate():
    names = available(REPO)
    assert {"rdn_vs_gpt", "coord_dims", "window_pattern", "optimizer"} <= set(names)
    for name in names:
        exp = load_set(name, REPO)
        assert exp.description and len(exp.variants) >= 2, name
        valid = validate_set(exp, REPO / "params.yaml", DVC_STAGES)
        assert set(valid) == set(exp.variants)
        for variant, params in valid.items():
            for key, value in exp.overrides(variant).items():
                assert _get(params, key) == value, (name, variant, key)
            assert params.tracking.experiment == exp.mlflow_experiment == f"sweep-{name}"
        cmds = [exp.dvc_command(v) for v in exp.variants]
        assert len({c[c.index("-n") + 1] for c in cmds}) == len(cmds)  # one DVC experiment name per variant


def test_rdn_vs_gpt_prints_queue_commands(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert rdn_main(["sweep", "rdn_vs_gpt"]) == 0
    out = capsys.readouterr().out.splitlines()
    cmds = [line for line in out if not line.startswith("#")]
    assert cmds == [
        "dvc exp run --queue -n rdn_vs_gpt-rdn -S model.use_coordinates=true -S tracking.experiment=sweep-rdn_vs_gpt",
        "dvc exp run --queue -n rdn_vs_gpt-gpt -S model.use_coordinates=false -S tracking.experiment=sweep-rdn_vs_gpt",
        "dvc queue start --jobs 1",
    ]
    assert any("rdn compare --experiment sweep-rdn_vs_gpt" in line for line in out)


BAD_SET = """\
description: broken on purpose
stages: [base_train, tokenise]
variants:
  good:
    model.depth: 2
  typo:
    model.use_coordinatez: false
  negative:
    base_train.matrix_lr: -1.0
  nosection:
    modle.depth: 3
  short:
    model.sequence_len: 256
"""


def test_invalid_variants_fail_naming_file_variant_and_key(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_SET)
    assert rdn_main(["sweep", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "dvc exp run" not in out and "dvc queue" not in out, "nothing may be queued"
    lines = err.splitlines()
    expect = [
        f"{path}: stages: 'tokenise' is not a dvc.yaml stage",
        f"{path}: variant 'typo': model.use_coordinatez: unknown key; did you mean 'use_coordinates'?",
        f"{path}: variant 'negative': base_train.matrix_lr: must be >= 0.0 (got -1.0)",
        f"{path}: variant 'nosection': modle.depth: unknown key ('modle' is not in params.yaml)",
        f"{path}: variant 'short': base_train.seq_len: must be <= model.sequence_len (256) (got 512)",
    ]
    for want in expect:
        assert any(line.startswith(want) for line in lines), (want, err)
    assert not any("'good'" in line for line in lines)
    assert lines[-1] == "rdn sweep: nothing queued (7 problems)"  # short: base_train, mid_train, chat_sft seq_len

    with pytest.raises(SweepError) as info:
        validate_set(load_set(path), REPO / "params.yaml", DVC_STAGES)
    assert len(info.value.problems) == 7

    assert rdn_main(["sweep", "no_such_set"]) == 2
    assert "no such experiment set (available: coord_dims" in capsys.readouterr().err
    (tmp_path / "shape.yaml").write_text("variants:\n  a: 3\n  'b c': {model.depth: 2}\n")
    with pytest.raises(SweepError) as info:
        load_set(tmp_path / "shape.yaml")
    assert any("variant 'a': must be a non-empty mapping" in p for p in info.value.problems)
    assert any("variant name 'b c'" in p for p in info.value.problems)


@pytest.mark.parametrize("value", [True, False, None, 2, 0.02, 1e-05, "L", "SSSL", "true", "0.5", "sweep-x",
                                   ["()", "[]"], {"calculator": 20, "brackets": 10}])
def test_values_survive_dvc_set_parsing(value):
    """What `-S key=<format_value(v)>` gives back through DVC's Hydra override parser."""
    parser_mod = pytest.importorskip("hydra.core.override_parser.overrides_parser")
    override = parser_mod.OverridesParser.create().parse_overrides([f"a.b={format_value(value)}"])[0]
    assert override.value() == value


# --------------------------------------------------------------------------- real dvc exp run

def _git_copy(tmp: Path) -> tuple[Path, dict[str, str]]:
    work = tmp / "repo"
    copy_project(work, skip=("artifacts/", "metrics/", "dvc.lock"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"].update(include_tests=False, max_total_bytes=600_000)
    params["tokenizer"].update(vocab_size=1024, max_chars=300_000)
    params["tracking"].update(enabled=True, uri=None)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "configs" / "experiments" / "tiny_vocab.yaml").write_text(
        "description: tokenizer vocab 600 vs 700\nstages: [tokenizer]\n"
        "variants:\n  v600: {tokenizer.vocab_size: 600}\n  v700: {tokenizer.vocab_size: 700}\n")
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"), GIT_AUTHOR_NAME="rdn-test",
               GIT_AUTHOR_EMAIL="test@rdn.invalid", GIT_COMMITTER_NAME="rdn-test", GIT_COMMITTER_EMAIL="test@rdn.invalid")
    for var in ("RDN_PROJECT_ROOT", "MLFLOW_TRACKING_URI", "RDN_MLFLOW_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(var, None)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return work, env


@head_start("sweep-temp-run", "test_sweep.py")
def _sweep_run(tmp_path_factory) -> Background:
    """`rdn sweep tiny_vocab --temp --run` in a git copy (started as the session starts: see
    conftest.head_start)."""
    tmp = tmp_path_factory.mktemp("sweep")
    work, env = _git_copy(tmp)
    return Background([str(BIN / "rdn"), "sweep", "tiny_vocab", "--temp", "--run"], work, env, tmp / "sweep.log")


@pytest.mark.integration
def test_dvc_exp_temp_sweep_lands_in_mlflow(tmp_path_factory):
    sweep = started("sweep-temp-run", tmp_path_factory)
    work, env = sweep.cwd, sweep.env

    def run(*args: str, timeout: float = 400) -> str:
        proc = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        return proc.stdout + proc.stderr

    out = sweep.wait(timeout=400)
    assert "dvc exp run --temp -n tiny_vocab-v600 -S tokenizer.vocab_size=600 -S tracking.experiment=sweep-tiny_vocab tokenizer" in out
    assert (work / "params.yaml").read_text() == subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=work, capture_output=True, text=True).stdout, "--temp keeps the workspace"
    assert not list((work / "mlflow" / "unsent").glob("*.jsonl")), "every run reached the store"

    show = run(str(BIN / "dvc"), "exp", "show", "--md", "--no-pager")
    rows = {line.split("|")[1].strip(): line for line in show.splitlines() if "tiny_vocab-" in line}
    assert any("tiny_vocab-v600" in k for k in rows) and any("tiny_vocab-v700" in k for k in rows), show
    header = next(line for line in show.splitlines() if line.startswith("|") and "vocab_size" in line)
    col = [c.strip() for c in header.split("|")].index("tokenizer.vocab_size") if "tokenizer.vocab_size" in header \
        else [c.strip() for c in header.split("|")].index("vocab_size")
    for name, line in rows.items():
        assert [c.strip() for c in line.split("|")][col] == ("600" if "v600" in name else "700"), show

    # MLflow: the store of the project the sweep started from (not the executors' temp copies)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweep-tiny_vocab")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("rdn.kind") == "dvc-exp"}
    assert sorted(parents) == ["tiny_vocab-v600", "tiny_vocab-v700"]
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED"
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        by_stage = {r.info.run_name: r for r in kids}
        assert "tokenizer" in by_stage, (name, sorted(by_stage))
        tok = by_stage["tokenizer"]
        want = "600" if name.endswith("v600") else "700"
        assert tok.data.params["tokenizer.vocab_size"] == want
        assert tok.data.metrics["tokenizer/vocab_size"] == float(want)
        assert tok.data.tags["rdn.dvc_exp"] == name and tok.info.status == "FINISHED"

    out = run(str(BIN / "rdn"), "compare", "--experiment", "sweep-tiny_vocab", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out[out.index("run,run_id"):])))
    assert sorted((r["run"], r["tokenizer.vocab_size"]) for r in table) == [("tiny_vocab-v600", "600"),
                                                                             ("tiny_vocab-v700", "700")]


def test_write_params_for_the_flow(tmp_path: Path, capsys, monkeypatch):
    """`--write-params DIR`: one complete, valid params file per variant for the flow's params_file."""
    from rdn.config import load_params

    monkeypatch.chdir(REPO)
    assert rdn_main(["sweep", "window_pattern", "--write-params", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    files = sorted(tmp_path.glob("*.yaml"))
    assert [f.name for f in files] == ["window_pattern-full.yaml", "window_pattern-sssl.yaml"]
    for f in files:
        assert f"prefect deployment run rdn-full-pipeline/local -p params_file={f}" in out
        params = load_params(f)
        assert params.model.window_pattern == ("L" if f.stem.endswith("full") else "SSSL")
        assert params.tracking.experiment == "sweep-window_pattern"
        assert params.base_train == load_params(REPO / "params.yaml").base_train
