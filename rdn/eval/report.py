"""The pipeline report: ``reports/report.md`` with a metrics table, curves and environment.

Built from the files the stages leave in ``metrics/`` (so it works with tracking off):
``<stage>.json`` summaries, ``<stage>_history.csv`` per-step curves and ``eval.json``.
Plots are PNG files next to the report (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
from pathlib import Path
from typing import Any

from rdn.io import library_versions, provenance

RL_VS_SFT = "rl_vs_sft"  # eval.json keys written by rdn.eval.evaluate (not imported: it would pull in torch)
BASELINE = "baseline"
NOT_STAGES = (RL_VS_SFT, BASELINE)

log = logging.getLogger(__name__)

TRAIN_STAGES = ("base_train", "mid_train", "chat_sft")
ALL_STAGES = ("data", "tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "evaluate")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(out: Path, title: str, ylabel: str, curves: dict[str, tuple[list[float], list[float]]]) -> bool:
    """Write the plot; without data a figure that says so (the file is a declared DVC output
    either way) and ``False``, so the report does not show it."""
    curves = {k: v for k, v in curves.items() if v[0]}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if not curves:
        ax.set_title(title)
        ax.text(0.5, 0.5, "no data (the stage has not run)", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(out)
        plt.close(fig)
        return False
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def at_chance(stages: dict[str, dict], baseline: dict[str, Any], tasks: list[str]) -> list[str]:
    """Tasks whose best checkpoint accuracy is within two standard errors of the
    majority-answer baseline (binomial standard error at the baseline rate, on the baseline's
    number of examples)."""
    n = max(int(baseline.get("examples") or 1), 1)
    weak = []
    for t in tasks:
        if t not in baseline:
            continue
        p = float(baseline[t])
        best = max((row.get(t) or 0.0) for row in stages.values())
        if best <= p + 2 * math.sqrt(max(p * (1 - p), 1 / n) / n):
            weak.append(t.removesuffix("_accuracy"))
    return weak


def rl_verdict(cmp: dict[str, Any], alpha: float = 0.05) -> str:
    """One honest sentence on whether RL changed the RL task's held-out accuracy, by the
    paired sign test (``rdn.eval.evaluate.paired_comparison``)."""
    a, b, p = cmp["sft_accuracy"], cmp["rl_accuracy"], cmp["p_value"]
    if max(a, b) == 0:
        judged = "the model solves none of these problems at this scale, so the comparison says nothing yet"
    elif p < alpha:
        judged = f"RL {'improved' if b > a else 'worsened'} it (sign test p = {p:.3g})"
    else:
        judged = f"no significant change (sign test p = {p:.3g} >= {alpha})"
    return (f"Held-out {cmp['task']} accuracy on the same {cmp['examples']} problems: {a:.3f} after SFT, "
            f"{b:.3f} after RL; {cmp['rl_only_correct']} solved only after RL, {cmp['sft_only_correct']} only "
            f"after SFT: {judged}.")


def build_report(root: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/report.md`` and its plots; return a summary of what it contains."""
    metrics = root / "metrics"
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {s: _read_json(metrics / f"{s}.json") for s in ALL_STAGES}
    histories = {s: _read_history(metrics / f"{s}_history.csv") for s in (*TRAIN_STAGES, "chat_rl")}
    evals = _read_json(metrics / "eval.json") or {}

    plots = []
    if _plot(out_dir / "loss.png", "training loss", "loss (EMA)",
             {s: _series(histories[s], "loss") for s in TRAIN_STAGES}):
        plots.append(("Training loss", "loss.png"))
    if _plot(out_dir / "val_bpb.png", "validation bits per byte", "bpb",
             {s: _series(histories[s], "val_bpb") for s in TRAIN_STAGES}):
        plots.append(("Validation bits per byte", "val_bpb.png"))
    if _plot(out_dir / "rl_reward.png", "chat RL", "reward / accuracy",
             {"train reward (mean)": _series(histories["chat_rl"], "reward_mean"),
              "held-out accuracy": _series(histories["chat_rl"], "eval_accuracy")}):
        plots.append(("Chat RL reward", "rl_reward.png"))

    lines = ["# rdn pipeline report", ""]
    prov = provenance()
    lines += [f"Generated {prov['created_utc']} at git {prov['git_sha'] or 'unknown'}.", ""]
    lines += ["## Stages", "", "| stage | steps | final val bpb | min val bpb | train time (s) | tok/s | peak memory (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for s in (*TRAIN_STAGES, "chat_rl"):
        m = summaries.get(s)
        if not m:
            lines.append(f"| {s} | not run | | | | | |")
            continue
        lines.append(f"| {s} | {_fmt(m.get('steps'))} | {_fmt(m.get('final_val_bpb'))} | {_fmt(m.get('min_val_bpb'))} | "
                     f"{_fmt(m.get('train_seconds'))} | {_fmt(m.get('tok_per_sec'))} | {_fmt(m.get('peak_memory_mib'))} |")
    if summaries.get("data"):
        d = summaries["data"]
        lines += ["", f"Corpus: {d['train_documents']:,} train / {d['val_documents']:,} val documents, "
                      f"{d['train_bytes'] / 1e6:.1f} MB train."]
    if summaries.get("tokenizer"):
        t = summaries["tokenizer"]
        lines += [f"Tokenizer: {t['vocab_size']:,} ids, {t['val_bytes_per_token']:.3f} bytes/token on val."]
    if evals:
        stages = {stage: row for stage, row in evals.items() if stage not in NOT_STAGES}
        tasks = sorted({k for row in stages.values() for k in row if k.endswith("_accuracy")})
        lines += ["", "## Evaluation", "", "| checkpoint | step | val bpb | " + " | ".join(tasks) + " |",
                  "|---|---:|---:|" + "---:|" * len(tasks)]
        for stage, row in stages.items():
            lines.append(f"| {stage} | {_fmt(row.get('step'))} | {_fmt(row.get('val_bpb'))} | "
                         + " | ".join(_fmt(row.get(t)) for t in tasks) + " |")
        base = evals.get(BASELINE)
        if base:
            lines.append("| chance (majority answer) | | | " + " | ".join(_fmt(base.get(t)) for t in tasks) + " |")
        cmp = evals.get(RL_VS_SFT)
        if cmp:
            lines += ["", rl_verdict(cmp)]
        if base:
            weak = at_chance(stages, base, tasks)
            if weak:
                lines += ["", "At chance at this scale (no checkpoint beats always giving the most common answer "
                          "by two standard errors): " + ", ".join(weak) + "."]
        else:
            weak = [t.removesuffix("_accuracy") for t in tasks
                    if max((row.get(t) or 0.0) for row in stages.values()) < 0.05]
            if weak:
                lines += [f"Not learned at this scale (below 5% at every stage): {', '.join(weak)}."]
    if plots:
        lines += ["", "## Curves", ""]
        for title, name in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["", "## Environment", "", f"- platform: {platform.platform()}"]
    lines += [f"- {k}: {v}" for k, v in library_versions().items()]
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        lines.append(f"- device: {device}")
    except ImportError:  # pragma: no cover
        pass
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    log.info("report: %s with %d plots", out_dir / "report.md", len(plots))
    return {"plots": len(plots), "stages_reported": sum(1 for v in summaries.values() if v)}


def run_report(params, root: Path, run) -> dict[str, Any]:
    out = root / "reports"
    summary = build_report(root, out)
    for path in sorted(out.iterdir()):
        if path.is_file():  # reports/ablations/ belongs to rdn ablate
            run.log_artifact(path, "report")
    return summary
