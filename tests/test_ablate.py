"""The ablation suite: paired statistics against hand computations, the shipped sets, and
``rdn ablate`` for real (DVC experiments in a temporary git copy): schema, report, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rdn.eval.ablation import (NO_DIFFERENCE, bpb_at_flops, compare_set, detectable_difference, paired_comparison,
                               t_quantile)
from rdn.pipeline.ablate import AblationError, available, load_ablation, run_ablation, validate
from tests.conftest import REPO, Background, copy_project, head_start, started
from tests.test_dvc import _env  # a DVC subprocess environment confined to the test's temp dir

BIN = Path(sys.executable).parent

# Student t quantiles t_{0.975, df} from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantiles_match_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=5e-4)


def test_paired_interval_by_hand():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.24842
    c = paired_comparison("v", "val_bpb", [1.1, 1.2, 1.3], [1.0, 1.0, 1.0], lower_is_better=True)
    assert c.n == 3 and c.mean_diff == pytest.approx(0.2)
    assert c.sd_diff == pytest.approx(0.1)
    assert (c.ci_low, c.ci_high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=2e-5)
    assert c.verdict == NO_DIFFERENCE.format(n=3) == "no detectable difference at 3 seeds"
    # the same differences over 4 seeds exclude zero: worse (higher bpb)
    c = paired_comparison("v", "val_bpb", [1.1, 1.2, 1.3, 1.2], [1.0] * 4, lower_is_better=True)
    assert c.ci_low > 0 and c.verdict == "worse"
    # and for a metric where higher is better the same numbers are an improvement
    c = paired_comparison("v", "calculator_accuracy", [1.1, 1.2, 1.3, 1.2], [1.0] * 4, lower_is_better=False)
    assert c.verdict == "better"


def test_verdict_at_the_boundary():
    # two pairs with differences m - d and m + d: half-width = 12.706 * sd / sqrt(2) = 12.706 * d
    t = t_quantile(0.975, 1)
    d = 0.01
    for scale, verdict in ((1 + 1e-6, "better"), (1 - 1e-6, "no detectable difference at 2 seeds")):
        m = -t * d * scale          # the interval's upper end just below / just above zero
        c = paired_comparison("v", "val_bpb", [m - d, m + d], [0.0, 0.0], lower_is_better=True)
        assert c.ci_high == pytest.approx(m + t * d)
        assert c.verdict == verdict, (scale, c)


def test_detectable_difference_shrinks_with_seeds():
    assert detectable_difference(3) == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert detectable_difference(4) == pytest.approx(3.182 / 2, abs=1e-3)
    assert detectable_difference(1) == math.inf


def test_equal_flops_interpolates_the_baseline_curve():
    curve = [(0.0, 4.0), (100.0, 3.0), (200.0, 2.0)]
    assert bpb_at_flops(curve, 150.0) == pytest.approx(2.5)
    assert bpb_at_flops(curve, 200.0) == pytest.approx(2.0)
    assert bpb_at_flops(curve, 250.0) is None            # never extrapolated
    runs = []
    for seed, (base_final, var_final) in enumerate([(2.0, 2.3), (2.1, 2.45), (1.9, 2.2)]):
        runs.append({"variant": "base", "seed": seed, "metrics": {"val_bpb": base_final, "flops_per_token": 1.0,
                                                                   "tokens_seen": 200},
                     "curve": [(0.0, 4.0), (100.0, base_final + 1.0), (200.0, base_final)]})
        runs.append({"variant": "heavy", "seed": seed, "metrics": {"val_bpb": var_final, "flops_per_token": 1.5,
                                                                    "tokens_seen": 100},
                     "curve": []})
    out = {c.metric: c for c in compare_set(runs, "base", ["val_bpb"])}
    # the variant spent 150 FLOPs: the baseline's curve there is final + 0.5
    want = [2.3 - 2.5, 2.45 - 2.6, 2.2 - 2.4]
    assert out["val_bpb_at_equal_flops"].mean_diff == pytest.approx(sum(want) / 3)
    assert out["val_bpb"].mean_diff == pytest.approx((0.3 + 0.35 + 0.3) / 3)


def test_equal_flops_at_equal_tokens_reads_the_heavier_variants_curve():
    # same 200 tokens, the variant costs 2 FLOPs per token: it spent the baseline's whole
    # budget (200 FLOPs) after 100 tokens, where its own curve says final + 0.4
    runs = []
    for seed, (base_final, var_final) in enumerate([(2.0, 1.8), (2.1, 1.95), (1.9, 1.75)]):
        runs.append({"variant": "base", "seed": seed, "metrics": {"val_bpb": base_final, "flops_per_token": 1.0,
                                                                   "tokens_seen": 200},
                     "curve": [(0.0, 4.0), (100.0, base_final + 1.0), (200.0, base_final)]})
        runs.append({"variant": "heavy", "seed": seed, "metrics": {"val_bpb": var_final, "flops_per_token": 2.0,
                                                                    "tokens_seen": 200},
                     "curve": [(0.0, 4.0), (100.0, var_final + 0.6), (200.0, var_final + 0.4),
                               (400.0, var_final)]})
    out = {c.metric: c for c in compare_set(runs, "base", ["val_bpb"])}
    want = [(1.8 + 0.4) - 2.0, (1.95 + 0.4) - 2.1, (1.75 + 0.4) - 1.9]
    assert out["val_bpb_at_equal_flops"].mean_diff == pytest.approx(sum(want) / 3)
    assert out["val_bpb"].mean_diff == pytest.approx((-0.2 - 0.15 - 0.15) / 3)
    assert out["val_bpb"].mean_diff < 0 < out["val_bpb_at_equal_flops"].mean_diff


def test_shipped_sets_validate_for_every_seed():
    names = available(REPO)
    assert {"rdn_vs_gpt", "coord_dims", "model_variants"} <= set(names)
    dvc = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    for name in names:
        ab = load_ablation(name, REPO)
        valid = validate(ab, ab.seed_values(), REPO / "params.yaml", dvc)
        assert len(valid) == len(ab.variants) * ab.seeds >= 2 * 3
        for (variant, seed), params in valid.items():
            assert params.run.seed == seed and params.tracking.experiment == f"ablation-{name}"
    rvg = load_ablation("rdn_vs_gpt", REPO)
    assert rvg.baseline == "gpt" and rvg.seeds >= 3


def test_a_bad_variant_stops_the_set_before_anything_runs(tmp_path):
    (tmp_path / "configs/ablations").mkdir(parents=True)
    (tmp_path / "configs/ablations/bad.yaml").write_text(yaml.safe_dump({
        "baseline": "a", "seeds": 2, "stages": ["base_train"],
        "variants": {"a": {}, "b": {"model.depth": 0}, "c": {"model.dept": 3}}}))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    calls = []
    with pytest.raises(AblationError) as e:
        run_ablation("bad", tmp_path, runner=lambda *a: calls.append(a) or 0)
    text = "\n".join(e.value.problems)
    assert "variant 'b'" in text and "model.depth" in text and "variant 'c'" in text and "model.dept" in text
    assert calls == []
    (tmp_path / "configs/ablations/bad.yaml").write_text(yaml.safe_dump({"baseline": "z", "variants": {"a": {}}}))
    with pytest.raises(AblationError, match="baseline"):
        load_ablation("bad", tmp_path)


# --------------------------------------------------------------------------- for real

SET = {"description": "smoke", "baseline": "gpt", "seeds": 2, "stages": ["base_train"],
       "variants": {"gpt": {"model.use_coordinates": False}, "rdn": {"model.use_coordinates": True}}}


@head_start("ablate-smoke", "test_ablate.py")
def _ablate_smoke(tmp_path_factory) -> Background:
    """A git copy of the project on the smoke preset and its `rdn ablate smoke --jobs 2`."""
    from rdn.config import read_params_file

    tmp = tmp_path_factory.mktemp("ablate")
    work = tmp / "repo"
    copy_project(work, skip=("artifacts/", "metrics/ablations/", "reports/ablations/"),
                 keep=("artifacts/.gitignore",))
    (work / "artifacts").mkdir(exist_ok=True)
    params = read_params_file(work / "configs/smoke.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "configs/ablations/smoke.yaml").write_text(yaml.safe_dump(SET))
    env = _env(tmp)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return Background([str(BIN / "rdn"), "ablate", "smoke", "--jobs", "2"], work, env, tmp / "ablate.log")


def test_rdn_ablate_runs_dvc_experiments_writes_the_schema_and_resumes(tmp_path_factory):
    first = started("ablate-smoke", tmp_path_factory)
    out = first.wait()
    work, env = first.cwd, first.env
    assert first.proc.returncode == 0, out[-4000:]
    result = json.loads((work / "metrics/ablations/smoke.json").read_text())
    assert {"set", "baseline", "seeds", "metrics", "runs", "comparisons"} <= set(result)
    assert result["set"] == "smoke" and result["baseline"] == "gpt" and result["seeds"] == [1, 2]
    assert sorted((r["variant"], r["seed"]) for r in result["runs"]) == [("gpt", 1), ("gpt", 2), ("rdn", 1),
                                                                         ("rdn", 2)]
    for r in result["runs"]:
        assert set(r["metrics"]) <= set(result["metrics"]) and math.isfinite(r["metrics"]["val_bpb"])
        assert r["curve"] and r["metrics"]["flops_per_token"] > 0
    cmp = {(c["variant"], c["metric"]): c for c in result["comparisons"]}
    c = cmp["rdn", "val_bpb"]
    assert {"variant", "metric", "mean_diff", "ci_low", "ci_high", "verdict"} <= set(c)
    assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
    by = {(r["variant"], r["seed"]): r["metrics"]["val_bpb"] for r in result["runs"]}
    assert c["mean_diff"] == pytest.approx(((by["rdn", 1] - by["gpt", 1]) + (by["rdn", 2] - by["gpt", 2])) / 2)
    report = (work / "reports/ablations/smoke.md").read_text()
    assert "| rdn | val_bpb |" in report and (work / "reports/ablations/smoke_val_bpb.png").stat().st_size > 1000
    # every run is a DVC experiment with its own seed
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=work, env=env, capture_output=True,
                           text=True, check=True).stdout
    names = {x["name"] for row in json.loads(shown) for e in (row.get("experiments") or []) for x in e["revs"]}
    assert {"abl-smoke-gpt-s1", "abl-smoke-gpt-s2", "abl-smoke-rdn-s1", "abl-smoke-rdn-s2"} <= names
    # a second call runs nothing and gives the same result
    before = (work / "metrics/ablations/smoke.json").read_text()
    calls = []
    cwd = os.getcwd()
    try:
        os.chdir(work)
        again = run_ablation("smoke", work, jobs=2, runner=lambda *a: calls.append(a) or 1)
    finally:
        os.chdir(cwd)
    assert calls == [] and json.dumps(again, indent=2) + "\n" == before
    # a lost run record is collected from its DVC experiment, still without running anything
    (work / "metrics/ablations/smoke/runs/rdn-s2.json").unlink()
    again = run_ablation("smoke", work, jobs=1, runner=lambda *a: calls.append(a) or 1)
    assert calls == [] and (work / "metrics/ablations/smoke/runs/rdn-s2.json").exists()
    # MLflow: one parent run for the set, each experiment's run nested under it with its figures
    from rdn.tracking.client import mlflow_client

    client = mlflow_client(f"sqlite:///{work / 'mlflow/mlflow.db'}")
    exp = client.get_experiment_by_name("ablation-smoke")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`rdn.kind` = 'ablation'")
    assert len(parents) == 1 and parents[0].data.tags["verdict.rdn.val_bpb"] == cmp["rdn", "val_bpb"]["verdict"]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert sorted(r.data.tags["rdn.dvc_exp"] for r in children) == sorted(names & {
        "abl-smoke-gpt-s1", "abl-smoke-gpt-s2", "abl-smoke-rdn-s1", "abl-smoke-rdn-s2"})
    assert all("ablation/val_bpb" in r.data.metrics for r in children)


def test_design_figures_are_not_compared_and_neutral_metrics_say_higher_or_lower():
    runs = [{"variant": v, "seed": s, "metrics": {"val_bpb": 2.0 + d + 0.01 * s, "parameters": 100 + 10 * (v == "b"),
                                                   "final_grad_norm": 0.5 + d}, "curve": []}
            for s in (1, 2, 3) for v, d in (("a", 0.0), ("b", 0.2 + 0.001 * s))]
    out = {c.metric: c for c in compare_set(runs, "a", ["val_bpb", "parameters", "final_grad_norm"])}
    assert "parameters" not in out                      # a property of the configuration, not an outcome
    assert out["val_bpb"].verdict == "worse" and out["final_grad_norm"].verdict == "higher"
