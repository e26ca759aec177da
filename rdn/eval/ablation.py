"""Statistics and the report of an ablation set: paired comparisons over seeds.

Every variant of a set is trained with the same seeds as the set's baseline (same data,
tokenizer and token budget; ``run.seed`` varies). For a metric, seed ``s`` gives one pair
``(variant_s, baseline_s)``; the comparison is over the differences ``d_s = variant_s -
baseline_s``:

* ``mean_diff`` = mean of ``d_s``;
* a two-sided 95 % **t-interval** ``mean_diff +- t_{0.975, n-1} * sd(d) / sqrt(n)`` over the
  ``n`` seed pairs (Student, paired design: seed-to-seed variation common to both arms
  cancels);
* the **verdict**: ``better`` or ``worse`` only when the interval excludes 0 (direction by
  whether lower or higher is better for that metric), otherwise ``no detectable difference
  at n seeds``. An interval touching 0 exactly does not exclude it.

With ``n`` pairs the interval's half-width is ``t_{0.975, n-1} / sqrt(n)`` standard deviations
of the per-seed difference: 2.48 sd at 3 seeds, 1.59 at 4, 1.24 at 5, 0.72 at 10
(:func:`detectable_difference`), so a set's report states the smallest effect its seed
count could have told from zero given the spread it measured.

**Equal FLOPs.** A variant that spends more FLOPs per token than the baseline is also
compared at equal compute. Both runs' val-bpb curves (val bpb against training FLOPs =
tokens seen x FLOPs per token) are read at the smaller of the two total budgets, by linear
interpolation between evaluations: when the variant trained on fewer tokens, that is the
variant's final FLOPs on the baseline's curve; when both saw the same tokens (the usual
ablation), it is the baseline's final FLOPs on the variant's curve, i.e. what the heavier
variant had reached when it had spent what the baseline spent in all. Nothing is
extrapolated beyond a curve's last point. See :func:`bpb_at_flops`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

CONFIDENCE = 0.95
NO_DIFFERENCE = "no detectable difference at {n} seeds"

# Metrics an ablation records per run, and which direction is better (True = lower, False =
# higher, None = neither: the verdict then says "higher" or "lower").
METRICS: dict[str, bool | None] = {
    "val_bpb": True,                  # val bits per byte at the end of base_train (whole val split)
    "val_bpb_closing": True,          # ... restricted to closing-bracket targets
    "val_bpb_depth2": True,           # ... restricted to targets at bracket depth >= 2
    "min_val_bpb": True,
    "eval_val_bpb": True,             # the evaluate stage's bpb of the final text checkpoint
    "brackets_accuracy": False,       # held-out task accuracy after post-training (when run)
    "calculator_accuracy": False,
    "tok_per_sec": False,
    "peak_memory_mib": True,
    "optimizer_state_mib": True,
    "final_grad_norm": None,
    "flops_per_token": True,
    "tokens_seen": False,
    "train_seconds": True,
    "parameters": True,
    "parameters_active": True,
}


# Properties of a configuration, not outcomes of a run: recorded per run, never compared.
DESIGN_METRICS = frozenset({"flops_per_token", "tokens_seen", "parameters", "parameters_active"})


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def detectable_difference(n: int, sd: float = 1.0, confidence: float = CONFIDENCE) -> float:
    """Half-width of the paired t-interval at ``n`` seed pairs, for differences of standard
    deviation ``sd``: the smallest mean difference that can exclude zero."""
    if n < 2:
        return math.inf
    return t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)


@dataclass(frozen=True)
class Comparison:
    variant: str
    metric: str
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    verdict: str
    baseline_mean: float
    variant_mean: float
    sd_diff: float

    def as_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "metric": self.metric, "mean_diff": self.mean_diff,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "verdict": self.verdict, "n": self.n,
                "baseline_mean": self.baseline_mean, "variant_mean": self.variant_mean, "sd_diff": self.sd_diff}


def paired_comparison(variant: str, metric: str, variant_values: Sequence[float], baseline_values: Sequence[float],
                      lower_is_better: bool | None, confidence: float = CONFIDENCE) -> Comparison:
    """Compare per-seed values (same order = same seed) with a paired t-interval.
    ``lower_is_better=None``: a metric with no better direction; the verdict is then
    "higher" or "lower" when the interval excludes 0."""
    if len(variant_values) != len(baseline_values):
        raise ValueError(f"{variant}/{metric}: {len(variant_values)} variant values for "
                         f"{len(baseline_values)} baseline values; pairs need the same seeds")
    n = len(variant_values)
    diffs = [float(a) - float(b) for a, b in zip(variant_values, baseline_values)]
    mean = statistics.fmean(diffs) if n else math.nan
    if n >= 2:
        sd = statistics.stdev(diffs)
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    else:
        sd, half = math.nan, math.inf
    low, high = mean - half, mean + half
    if n >= 2 and (low > 0 or high < 0):
        if lower_is_better is None:
            verdict = "higher" if low > 0 else "lower"
        else:
            improved = (high < 0) if lower_is_better else (low > 0)
            verdict = "better" if improved else "worse"
    else:
        verdict = NO_DIFFERENCE.format(n=n)
    return Comparison(variant, metric, n, mean, low, high, verdict,
                      statistics.fmean(baseline_values) if n else math.nan,
                      statistics.fmean(variant_values) if n else math.nan, sd)


def bpb_at_flops(curve: Sequence[tuple[float, float]], flops: float) -> float | None:
    """Val bpb of a curve ``[(training FLOPs, val bpb), ...]`` at ``flops``, by linear
    interpolation between the two evaluations around it; None outside the curve."""
    pts = sorted(curve)
    if not pts or flops < pts[0][0] or flops > pts[-1][0]:
        return None
    for (f0, b0), (f1, b1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            return b0 if f1 == f0 else b0 + (b1 - b0) * (flops - f0) / (f1 - f0)
    return pts[-1][1]  # a single point exactly at flops


def compare_set(runs: Iterable[Mapping[str, Any]], baseline: str, metrics: Sequence[str],
                confidence: float = CONFIDENCE) -> list[Comparison]:
    """Every variant against the baseline on every metric both have for the same seeds.

    ``runs``: ``{"variant", "seed", "metrics": {name: value}, "curve": [[flops, bpb], ...]}``.
    Adds ``val_bpb_at_equal_flops`` for variants with more FLOPs per token than the baseline:
    per seed, both curves read at the smaller of the two runs' total training FLOPs (a run
    that ends exactly there contributes its final val bpb); a pair where a curve does not
    cover that budget is left out."""
    by: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["variant"], {})[int(r["seed"])] = r
    if baseline not in by:
        raise ValueError(f"baseline variant {baseline!r} has no runs")
    out: list[Comparison] = []
    base = by[baseline]
    for variant, seeds in by.items():
        if variant == baseline:
            continue
        common = sorted(set(seeds) & set(base))
        for metric in metrics:
            if metric in DESIGN_METRICS:
                continue
            pairs = [(seeds[s]["metrics"].get(metric), base[s]["metrics"].get(metric)) for s in common]
            pairs = [(a, b) for a, b in pairs if _finite(a) and _finite(b)]
            if len(pairs) < 1:
                continue
            out.append(paired_comparison(variant, metric, [a for a, _ in pairs], [b for _, b in pairs],
                                         METRICS.get(metric, True), confidence))
        # equal compute
        pairs = []
        for s in common:
            v, b = seeds[s], base[s]
            fv, fb = v["metrics"].get("flops_per_token"), b["metrics"].get("flops_per_token")
            if not (_finite(fv) and _finite(fb)) or fv <= fb * 1.001:
                continue
            spent_v = v["metrics"].get("tokens_seen", 0) * fv
            spent_b = b["metrics"].get("tokens_seen", 0) * fb
            budget = min(spent_v, spent_b)
            at_v = _at_budget(v, spent_v, budget)
            at_b = _at_budget(b, spent_b, budget)
            if at_v is not None and at_b is not None:
                pairs.append((at_v, at_b))
        if pairs:
            out.append(paired_comparison(variant, "val_bpb_at_equal_flops", [a for a, _ in pairs],
                                         [b for _, b in pairs], True, confidence))
    return out


def _at_budget(run: Mapping[str, Any], spent: float, budget: float) -> float | None:
    """A run's val bpb after ``budget`` training FLOPs: its final value when it spent exactly
    that, else its curve interpolated there."""
    final = run["metrics"].get("val_bpb")
    if spent <= budget * (1 + 1e-9) and _finite(final):
        return float(final)
    return bpb_at_flops([tuple(p) for p in run.get("curve", [])], budget)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- the report

def _fmt(x: Any, digits: int = 4) -> str:
    if not _finite(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def write_report(result: Mapping[str, Any], md_path, plot_path=None, curves: Mapping[str, list] | None = None,
                 description: str = "", cost: str = "") -> None:
    """``reports/ablations/<set>.md``: the verdict table, per-seed values and the val-bpb curve
    plot (mean over seeds per variant with a min-max band)."""
    from pathlib import Path

    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    name, baseline, seeds = result["set"], result["baseline"], result["seeds"]
    lines = [f"# Ablation `{name}`", ""]
    if description:
        lines += [description, ""]
    n = len(seeds)
    lines += [f"Baseline **{baseline}**; seeds {', '.join(str(s) for s in seeds)} ({n} per variant); "
              f"paired 95 % t-intervals of (variant - baseline) over seeds. A verdict says better/worse "
              f"only when the interval excludes 0. At {n} seeds the interval's half-width is "
              f"{detectable_difference(n):.2f} standard deviations of the per-seed difference."]
    if cost:
        lines += ["", cost]
    lines += ["", "## Verdicts", "",
              "| variant | metric | baseline mean | variant mean | mean diff | 95 % CI | verdict |",
              "|---|---|---:|---:|---:|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['variant']} | {c['metric']} | {_fmt(c.get('baseline_mean'))} | "
                     f"{_fmt(c.get('variant_mean'))} | {_fmt(c['mean_diff'])} | "
                     f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] | {c['verdict']} |")
    lines += ["", "## Per-seed values", ""]
    metrics = [m for m in result["metrics"] if any(m in r["metrics"] for r in result["runs"])]
    lines += ["| variant | seed | " + " | ".join(metrics) + " |",
              "|---|---:|" + "---:|" * len(metrics)]
    for r in sorted(result["runs"], key=lambda r: (r["variant"] != baseline, r["variant"], r["seed"])):
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(_fmt(r["metrics"].get(m)) for m in metrics)
                     + " |")
    if plot_path is not None and curves:
        _plot(curves, plot_path, name)
        lines += ["", "## Validation curves", "",
                  f"![val bpb against training tokens, mean over seeds with the min-max band]"
                  f"({Path(plot_path).name})"]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(curves: Mapping[str, list], path, title: str) -> None:
    """``curves``: variant -> list over seeds of [(tokens, val_bpb), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for variant, per_seed in curves.items():
        steps = sorted({t for curve in per_seed for t, _ in curve})
        rows = [[dict(curve).get(t) for t in steps] for curve in per_seed]
        xs, mean, lo, hi = [], [], [], []
        for i, t in enumerate(steps):
            vals = [row[i] for row in rows if row[i] is not None]
            if len(vals) == len(rows):
                xs.append(t)
                mean.append(statistics.fmean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        if not xs:
            continue
        line, = ax.plot(xs, mean, label=f"{variant} (n={len(rows)})")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"{title}: val bpb, mean over seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
