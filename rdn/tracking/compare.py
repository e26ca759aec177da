"""``rdn compare``: key metrics of MLflow runs side by side.

A row is one run. A group run (a pipeline's parent run made by the Prefect flow, or the
parent that groups one DVC experiment's stages) is summarised from its children, one
per stage that ran, and from its own metrics: the flow logs the ``metrics/*.json`` of
every stage that completed, ran or cached, onto the parent as ``<file>/<key>/...``
(:func:`rdn.tracking.parent.metrics_summary`), which are the names the stage runs give
their own summary metrics. A stage DVC found up to date opens no run, so a pipeline
rerun with everything cached has no children at all, and its row comes from those
figures alone; a child's value wins where both exist. A run without children that is
no group (a stage run by plain ``dvc repro``) stands for itself. Columns:

* ``val_bpb``: the evaluate stage's ``eval/base/val_bpb``, else base_train's final
  ``val/bpb`` (its ``base_train/final_val_bpb`` summary, else the last logged value);
* ``train_loss``: base_train's final (smoothed) ``train/loss``;
* ``<task>_acc``: task accuracy of the last evaluated chat model (rl, then sft, mid):
  ``eval/<stage>/<task>_accuracy``, or a run's own ``eval/<task>/accuracy``. The other
  groups of eval.json are not models: ``baseline`` (the majority answer, chance level)
  and ``rl_vs_sft`` (the paired test, whose accuracies repeat rl's and sft's on the RL
  task) make no columns (``-m eval/rl_vs_sft/p_value`` shows one);
* ``tok_per_sec``, ``mfu``: base_train's throughput (its summary, else the median of the
  per-step history after warm-up) and model FLOPs utilisation (n/a on CPU);
* ``peak_mib``: the highest ``memory/peak_mib`` of any stage;
* then every param whose value differs between the rows that have it (all params with
  ``--params all``).
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rdn.tracking.client import DVC_EXP_KIND, PIPELINE_KIND

TRAIN_STAGES = ("base_train", "mid_train", "chat_sft")
CHAT_ORDER = ("rl", "sft", "mid", "base")
GROUP_KINDS = (PIPELINE_KIND, DVC_EXP_KIND)  # rdn.kind of a run whose row sums up its stages
_EVAL_ACC = re.compile(r"^eval/(?P<stage>" + "|".join(CHAT_ORDER) + r")/(?P<task>[^/]+)_accuracy$")
_TASK_ACC = re.compile(r"^eval/(?P<task>[^/]+)/accuracy$")


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    start_time: int
    stages: dict[str, Any] = field(default_factory=dict)  # stage name -> mlflow Run
    own: dict[str, float] = field(default_factory=dict)  # a group run's own metrics (the pipeline's summary)
    metrics: dict[str, float | None] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


class CompareError(RuntimeError):
    pass


def _stage_of(run) -> str:
    return run.data.tags.get("rdn.stage") or run.info.run_name or run.info.run_id[:8]


def _history_median(client, run, key: str) -> float | None:
    values = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    if not values:
        return None
    steady = [m.value for m in values if m.step > 3] or [m.value for m in values]
    return float(statistics.median(steady))


def summarize(client, run, children: list) -> RunRow:
    """Key metrics and merged params of one run (from its children and its own summary when
    it is a group, see the module docstring)."""
    group = bool(children) or run.data.tags.get("rdn.kind") in GROUP_KINDS
    parts = children if group else [run]
    own = {k: float(v) for k, v in run.data.metrics.items()} if group else {}
    stages: dict[str, Any] = {}
    for part in sorted(parts, key=lambda r: r.info.start_time or 0):
        stages[_stage_of(part)] = part  # a rerun stage: the newest wins
    name = run.data.tags.get("rdn.dvc_exp") if not children else None
    row = RunRow(run.info.run_id, name or run.info.run_name or run.info.run_id[:8], run.info.status,
                 run.info.start_time or 0, stages, own)
    params: dict[str, str] = dict(run.data.params)
    for part in stages.values():
        params.update(part.data.params)
    row.params = params

    def metric(stage: str, key: str, *more: str) -> float | None:
        """``key`` (or ``more``) of that stage's run, else ``key`` of the group's own summary."""
        part = stages.get(stage)
        for k in (key, *more):
            if part is not None and k in part.data.metrics:
                return float(part.data.metrics[k])
        return own.get(key)

    if "base_train" in stages or any(k.startswith("base_train/") for k in own):
        base: str | None = "base_train"
    else:
        base = next(iter(stages)) if len(stages) == 1 else None
    m: dict[str, float | None] = {}
    m["val_bpb"] = metric("evaluate", "eval/base/val_bpb")
    if m["val_bpb"] is None and base is not None:
        m["val_bpb"] = metric(base, f"{base}/final_val_bpb", "val/bpb")
    m["train_loss"] = None
    if base is not None:
        m["train_loss"] = metric(base, f"{base}/final_train_loss", "train/loss")

    accs: dict[str, tuple[int, float]] = {}
    for metrics in [part.data.metrics for part in stages.values()] + [own]:  # children first: ties keep theirs
        for key, value in metrics.items():
            hit = _EVAL_ACC.match(key)
            if hit:
                rank = CHAT_ORDER.index(hit["stage"])
            else:
                hit, rank = _TASK_ACC.match(key), -1
            if hit and (hit["task"] not in accs or rank < accs[hit["task"]][0]):
                accs[hit["task"]] = (rank, float(value))
    for task, (_, value) in sorted(accs.items()):
        m[f"{task}_acc"] = value

    m["tok_per_sec"] = m["mfu"] = None
    if base is not None:
        part = stages.get(base)
        m["tok_per_sec"] = metric(base, f"{base}/tok_per_sec")
        if m["tok_per_sec"] is None and part is not None and "train/tok_per_sec" in part.data.metrics:
            m["tok_per_sec"] = _history_median(client, part, "train/tok_per_sec")
        m["mfu"] = metric(base, f"{base}/mfu")
        if m["mfu"] is None and part is not None and "train/mfu" in part.data.metrics:
            m["mfu"] = _history_median(client, part, "train/mfu")
    peaks = [float(v) for metrics in [p.data.metrics for p in stages.values()] + [own]
             for k, v in metrics.items() if k == "memory/peak_mib" or k.endswith("/peak_memory_mib")]
    m["peak_mib"] = max(peaks) if peaks else None
    row.metrics = m
    return row


def collect(client, run_ids: Iterable[str] = (), experiment: str | None = None, limit: int = 50) -> list[RunRow]:
    """Rows for the given run ids (in that order), or the newest top-level runs of ``experiment``."""
    from mlflow.exceptions import MlflowException

    runs = []
    if run_ids:
        for rid in run_ids:
            try:
                runs.append(client.get_run(rid))
            except MlflowException as e:
                raise CompareError(f"run {rid}: {str(e).splitlines()[0]}") from None
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise CompareError(f"no MLflow experiment named {experiment!r} (experiments: {names})")
        every = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time DESC"])
        runs = [r for r in every if "mlflow.parentRunId" not in r.data.tags][:limit]
        if not runs:
            raise CompareError(f"experiment {experiment!r} has no runs")
    rows = []
    for run in runs:
        children = client.search_runs([run.info.experiment_id], max_results=1000,
                                      filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        rows.append(summarize(client, run, children))
    return rows


def differing_params(rows: list[RunRow], show: str = "diff") -> list[str]:
    if show == "none":
        return []
    keys = sorted({k for r in rows for k in r.params})
    if show == "all":
        return keys
    # a param only some runs have (a stage the others did not run) is not a difference
    return [k for k in keys if len({r.params[k] for r in rows if k in r.params}) > 1]


def metric_columns(rows: list[RunRow]) -> list[str]:
    fixed = ["val_bpb", "train_loss"]
    tasks = sorted({k for r in rows for k in r.metrics if k.endswith("_acc")})
    return fixed + tasks + ["tok_per_sec", "mfu", "peak_mib"]


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    if column.endswith("_acc"):
        return f"{value:.3f}"
    if column == "mfu":
        return f"{100 * value:.2f}%"
    if column in ("tok_per_sec", "peak_mib"):
        return f"{value:,.0f}" if column == "tok_per_sec" else f"{value:.1f}"
    return f"{value:.4f}"


def table_data(rows: list[RunRow], params: str = "diff", extra: Iterable[str] = ()) -> tuple[list[str], list[list[Any]]]:
    """Header and raw cell values (floats stay floats) for every output format."""
    mcols = metric_columns(rows)
    extra = list(extra)
    pcols = differing_params(rows, params)
    header = ["run", "run_id", "status", *mcols, *extra, *pcols]
    body = []
    for r in rows:
        cells: list[Any] = [r.name, r.run_id, r.status]
        cells += [r.metrics.get(c) for c in mcols]
        for key in extra:
            stage, _, k = key.rpartition(":")
            parts = [r.stages[stage]] if stage in r.stages else ([] if stage else list(r.stages.values()))
            value = next((float(p.data.metrics[k]) for p in parts if k in p.data.metrics), None)
            cells.append(r.own.get(k) if value is None and not stage else value)
        cells += [r.params.get(k) for k in pcols]
        body.append(cells)
    return header, body


def render(header: list[str], body: list[list[Any]], fmt: str, out=None) -> None:
    out = out or sys.stdout
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(header)
        for cells in body:
            w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in cells])
        return
    text = [[_fmt(h, v) if h != "run_id" else str(v)[:12] for h, v in zip(header, cells)] for cells in body]
    if fmt == "md":
        out.write("| " + " | ".join(header) + " |\n")
        out.write("|" + "|".join("---" if i < 3 or "." in h else "---:" for i, h in enumerate(header)) + "|\n")
        for cells in text:
            out.write("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False, header_style="bold")
    for h in header:
        table.add_column(h, justify="left" if h in ("run", "run_id", "status") or "." in h else "right",
                         overflow="fold")
    for cells in text:
        table.add_row(*cells)
    Console(file=out, width=max(120, 16 * len(header))).print(table)


def default_uri_and_experiment(params_file: Path = Path("params.yaml")) -> tuple[str, str]:
    """Tracking URI and experiment the stages of this project use (params.yaml's ``tracking``)."""
    from rdn.config import TrackingConfig
    from rdn.tracking.client import resolve_tracking_uri

    cfg = TrackingConfig()
    if params_file.exists():
        import yaml

        section = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}).get("tracking") or {}
        try:
            cfg = TrackingConfig.model_validate(section)
        except ValueError:
            pass
    return resolve_tracking_uri(cfg), cfg.experiment


def compare_main(run_ids: list[str], experiment: str | None, uri: str | None, fmt: str = "table",
                 params: str = "diff", metrics: Iterable[str] = (), limit: int = 50, out=None) -> int:
    from rdn.tracking.client import fast_fail_http, mlflow_client

    default_uri, default_exp = default_uri_and_experiment()
    uri = uri or default_uri
    experiment = experiment or (None if run_ids else default_exp)
    with fast_fail_http(10):
        client = mlflow_client(uri)
        try:
            rows = collect(client, run_ids, experiment, limit)
        except CompareError as e:
            print(f"rdn compare: {e} (tracking URI {uri})", file=sys.stderr)
            return 1
    header, body = table_data(rows, params, metrics)
    render(header, body, fmt, out)
    return 0
