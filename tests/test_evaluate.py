"""The SFT-vs-RL verdict: an exact paired sign test, and the report sentence built on it.

Oracles: the sign test against brute-force enumeration of every equally likely outcome,
and textbook values (8 wins, 0 losses: p = 2 / 2^8)."""

from __future__ import annotations

import itertools
import json

import pytest

from rdn.eval.evaluate import BASELINE, RL_VS_SFT, majority_baseline, paired_comparison, sign_test_p
from rdn.eval.report import BASELINE as REPORT_BASELINE
from rdn.eval.report import RL_VS_SFT as REPORT_KEY
from rdn.eval.report import build_report, rl_verdict
from rdn.tasks import get_task
from rdn.tasks.base import reference_final_text


def brute_force_p(wins: int, losses: int) -> float:
    """P(a fair-coin split of n discordant pairs is at least as uneven as observed)."""
    n = wins + losses
    observed = abs(wins - losses)
    outcomes = list(itertools.product((0, 1), repeat=n))
    return sum(abs(2 * sum(o) - n) >= observed for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("wins, losses", [(0, 0), (1, 0), (3, 3), (8, 0), (7, 2), (2, 9), (10, 4), (0, 12)])
def test_sign_test_matches_enumeration(wins, losses):
    assert sign_test_p(wins, losses) == pytest.approx(brute_force_p(wins, losses))


def test_sign_test_textbook_values():
    assert sign_test_p(8, 0) == pytest.approx(2 / 256)
    assert sign_test_p(5, 5) == 1.0


def test_paired_comparison_counts_the_discordant_problems():
    sft = [1, 1, 0, 0, 1, 0, 1, 0]
    rl = [1, 0, 1, 1, 1, 1, 1, 0]
    cmp = paired_comparison("calculator", [float(x) for x in sft], [float(x) for x in rl])
    assert cmp["rl_only_correct"] == 3 and cmp["sft_only_correct"] == 1
    assert cmp["sft_accuracy"] == 0.5 and cmp["rl_accuracy"] == 0.75 and cmp["examples"] == 8
    assert cmp["p_value"] == pytest.approx(brute_force_p(3, 1))
    with pytest.raises(ValueError, match="same problems"):
        paired_comparison("calculator", [1.0], [1.0, 0.0])


def _cmp(a, b, wins, losses, n=100):
    return {"task": "calculator", "examples": n, "sft_accuracy": a, "rl_accuracy": b, "rl_only_correct": wins,
            "sft_only_correct": losses, "p_value": sign_test_p(wins, losses)}


def test_verdict_only_claims_an_improvement_the_test_supports():
    assert "RL improved it" in rl_verdict(_cmp(0.80, 0.90, 12, 2))
    assert "no significant change" in rl_verdict(_cmp(0.88, 0.90, 3, 2))  # a higher number, but noise
    assert "RL worsened it" in rl_verdict(_cmp(0.90, 0.78, 1, 13))
    assert "solves none" in rl_verdict(_cmp(0.0, 0.0, 0, 0))


def test_report_states_the_verdict_and_tasks_not_learned(tmp_path):
    assert RL_VS_SFT == REPORT_KEY
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    evals = {"sft": {"step": 60, "calculator_accuracy": 0.8, "spelling_accuracy": 0.0},
             "rl": {"step": 20, "calculator_accuracy": 0.9, "spelling_accuracy": 0.01},
             RL_VS_SFT: _cmp(0.8, 0.9, 12, 2)}
    (metrics / "eval.json").write_text(json.dumps(evals))
    build_report(tmp_path, tmp_path / "reports")
    report = (tmp_path / "reports/report.md").read_text()
    assert "| rl | 20 |" in report and f"| {RL_VS_SFT} |" not in report
    assert "RL improved it" in report and "12 solved only after RL" in report
    assert "Not learned at this scale (below 5% at every stage): spelling." in report


def test_majority_baseline_is_the_most_common_training_answer_scored_by_the_task():
    """Oracle: count the training answers and score the test set by hand."""
    from collections import Counter

    task = get_task("spelling")
    test = task.generate(60, seed=5, split="test")
    got = majority_baseline(task, test, seed=9)
    train = task.generate(1000, seed=9, split="train")
    answer = Counter(reference_final_text(c) for c in train).most_common(1)[0][0]
    assert got["answer"] == answer
    assert got["accuracy"] == sum(reference_final_text(c) == answer for c in test) / len(test)
    assert 0 < got["accuracy"] < 1  # counts of 1 are common, spelled-out words never match
    assert majority_baseline(get_task("calculator"), get_task("calculator").generate(50, 5, "test"), 9)[
        "accuracy"] < 0.1


def test_report_flags_tasks_at_chance_against_the_baseline(tmp_path):
    """Two standard errors above the majority answer counts as learned; less does not."""
    assert BASELINE == REPORT_BASELINE
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    # n = 100, baseline 0.30: 2 SE = 0.0917 -> 0.40 is learned, 0.38 is not; baseline 0 -> 2/n = 0.02
    evals = {"sft": {"step": 60, "tictactoe_accuracy": 0.38, "spelling_accuracy": 0.40, "brackets_accuracy": 0.02},
             "rl": {"step": 20, "tictactoe_accuracy": 0.35, "spelling_accuracy": 0.10, "brackets_accuracy": 0.03},
             BASELINE: {"tictactoe_accuracy": 0.30, "spelling_accuracy": 0.30, "brackets_accuracy": 0.0,
                        "tictactoe_answer": "Play 1.", "examples": 100}}
    (metrics / "eval.json").write_text(json.dumps(evals))
    build_report(tmp_path, tmp_path / "reports")
    report = (tmp_path / "reports/report.md").read_text()
    assert "| chance (majority answer) | | | 0 | 0.3 | 0.3 |" in report
    assert f"| {BASELINE} |" not in report
    assert "by two standard errors): tictactoe." in report
