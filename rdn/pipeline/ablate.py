"""``rdn ablate SET``: every variant of an ablation set x N seeds as DVC experiments, then a
paired comparison of each variant against the set's baseline (:mod:`rdn.eval.ablation`).

An ablation set is ``configs/ablations/<set>.yaml``::

    description: RDN hierarchical coordinates vs the plain GPT baseline
    baseline: rdn                   # the variant every other one is compared with
    seeds: 4                        # default seed count (run.seed = first_seed, first_seed + 1, ...)
    first_seed: 1
    stages: [base_train]            # dvc targets (their upstream stages run or are cached)
    common: {base_train.eval_every: 25}      # the research scale, applied to every variant
    variants:
      rdn: {}                       # the baseline may override nothing
      gpt: {model.use_coordinates: false}

Every (variant, seed) becomes ``dvc exp run --temp -n abl-<set>-<variant>-s<seed> -S ...``
(the overrides, ``run.seed`` and ``tracking.experiment=ablation-<set>``): DVC runs the
stages in a temporary copy of the workspace and records the experiment, so ``dvc exp show``
lists every run with its params and metrics. Data and tokenizer do not depend on
``run.seed`` (``data.seed`` shuffles the corpus), so every run of a set trains on the same
data with the same tokenizer. ``--jobs J`` runs J
experiments at a time, each with ``cores // J`` torch threads.

The stages every run shares (``shared_stages``, default data and tokenizer) are brought up
to date in the workspace first with ``dvc repro``; each experiment then finds them current.

Before anything runs, every (variant, seed) is validated (the whole params file, through
:mod:`rdn.config`); one problem stops the set with every problem listed. The set resumes:
a (variant, seed) whose record ``metrics/ablations/<set>/runs/<variant>-s<seed>.json``
exists is not rerun, and one whose DVC experiment exists (the run finished but the
collection was interrupted) is collected from the experiment instead of rerun.

After the runs: ``metrics/ablations/<set>.json`` (the interface: set, baseline, seeds,
metrics, runs, comparisons), ``reports/ablations/<set>.md`` with the verdict table,
per-seed values and ``<set>_val_bpb.png``, and one MLflow parent run ``ablation-<set>``
under which each experiment's own parent run (and so its stage runs) is nested, with the
run's figures logged on it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import csv
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from rdn.eval.ablation import METRICS, compare_set, write_report
from rdn.pipeline.sweep import _NAME_OK, SweepError, _set_dotted, format_value
from rdn.progress import human_seconds

log = logging.getLogger(__name__)

ABLATIONS_DIR = Path("configs") / "ablations"
RESULTS_DIR = Path("metrics") / "ablations"
REPORTS_DIR = Path("reports") / "ablations"
LOGS_DIR = Path(".dvc") / "tmp" / "rdn-ablations"
KEYS = {"description", "baseline", "seeds", "first_seed", "stages", "common", "variants", "cost", "shared_stages"}


class AblationError(SweepError):
    """An invalid ablation set or run; ``problems`` names the file, variant and key of each."""


@dataclass
class AblationSet:
    name: str
    path: Path
    baseline: str
    variants: dict[str, dict[str, Any]]
    seeds: int = 4
    first_seed: int = 1
    stages: list[str] = field(default_factory=lambda: ["base_train"])
    common: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    cost: str = ""
    shared_stages: list[str] = field(default_factory=lambda: ["data", "tokenizer"])

    @property
    def mlflow_experiment(self) -> str:
        return f"ablation-{self.name}"

    def seed_values(self, n: int | None = None) -> list[int]:
        return [self.first_seed + i for i in range(n or self.seeds)]

    def exp_name(self, variant: str, seed: int) -> str:
        return f"abl-{self.name}-{variant}-s{seed}"

    def overrides(self, variant: str, seed: int) -> dict[str, Any]:
        return {**self.common, **self.variants[variant], "run.seed": seed,
                "tracking.experiment": self.mlflow_experiment}

    def params(self, base: Mapping[str, Any], variant: str, seed: int) -> dict[str, Any]:
        out = copy.deepcopy(dict(base))
        problems = []
        for key, value in self.overrides(variant, seed).items():
            problem = _set_dotted(out, key, value)
            if problem:
                problems.append(f"{self.path}: variant {variant!r}: {key}: {problem}")
        if problems:
            raise AblationError(problems)
        return out

    def dvc_command(self, variant: str, seed: int, force: bool = False) -> list[str]:
        cmd = ["dvc", "exp", "run", "--temp", "-n", self.exp_name(variant, seed)]
        if force:
            cmd.append("-f")
        for key, value in self.overrides(variant, seed).items():
            cmd += ["-S", f"{key}={format_value(value)}"]
        return cmd + list(self.stages)


def available(root: Path) -> list[str]:
    d = root / ABLATIONS_DIR
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_ablation(name_or_path: str | Path, root: Path) -> AblationSet:
    """Read ``configs/ablations/<name>.yaml`` (or a path); raises AblationError naming the problems."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = root / ABLATIONS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise AblationError([f"{path}: no such ablation set (available: {', '.join(available(root)) or 'none'})"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise AblationError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise AblationError([f"{path}: top level must be a mapping with 'baseline' and 'variants'"])
    problems = []
    unknown = sorted(set(data) - KEYS)
    if unknown:
        problems.append(f"{path}: unknown top-level keys {unknown} (known: {sorted(KEYS)})")
    variants = data.get("variants")
    if not isinstance(variants, dict) or len(variants) < 2:
        problems.append(f"{path}: variants: need a mapping of at least two variants (a baseline and one more)")
        variants = {}
    for vname, over in variants.items():
        if not isinstance(vname, str) or not vname or set(vname) - _NAME_OK:
            problems.append(f"{path}: variant name {vname!r}: use letters, digits, '_' and '-' only")
        if over is not None and not isinstance(over, dict):
            problems.append(f"{path}: variant {vname!r}: must be a mapping of params key -> value (or empty)")
    baseline = data.get("baseline")
    if baseline not in variants:
        problems.append(f"{path}: baseline: {baseline!r} is not one of the variants ({', '.join(map(str, variants))})")
    seeds = data.get("seeds", 4)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 2:
        problems.append(f"{path}: seeds: must be an integer >= 2 (a paired interval needs two pairs) (got {seeds!r})")
    first = data.get("first_seed", 1)
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        problems.append(f"{path}: first_seed: must be an integer >= 0 (got {first!r})")
    stages = data.get("stages", ["base_train"])
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        problems.append(f"{path}: stages: must be a non-empty list of dvc.yaml stage names")
        stages = []
    shared = data.get("shared_stages", ["data", "tokenizer"])
    if not isinstance(shared, list) or not all(isinstance(x, str) for x in shared):
        problems.append(f"{path}: shared_stages: must be a list of dvc.yaml stage names")
        shared = []
    common = data.get("common") or {}
    if not isinstance(common, dict):
        problems.append(f"{path}: common: must be a mapping of params key -> value")
        common = {}
    if problems:
        raise AblationError(problems)
    return AblationSet(name=path.stem, path=path, baseline=baseline,
                       variants={str(k): dict(v or {}) for k, v in variants.items()}, seeds=seeds,
                       first_seed=first, stages=stages, common=common,
                       description=str(data.get("description") or ""), cost=str(data.get("cost") or ""),
                       shared_stages=shared)


def validate(ab: AblationSet, seeds: list[int], params_file: Path, dvc_stages: list[str] | None) -> dict:
    """Every (variant, seed) validated; returns {(variant, seed): Params}. Raises AblationError."""
    from rdn.config import ParamsError, read_params_file, validate_params

    base = read_params_file(params_file)
    problems: list[str] = []
    if dvc_stages is not None:
        problems += [f"{ab.path}: stages: {s!r} is not a dvc.yaml stage ({', '.join(dvc_stages)})"
                     for s in ab.stages if s not in dvc_stages]
    valid = {}
    for variant in ab.variants:
        for seed in seeds:
            try:
                data = ab.params(base, variant, seed)
            except AblationError as e:
                problems += [p for p in e.problems if p not in problems]
                break
            try:
                valid[variant, seed] = validate_params(data, f"{ab.path}:{variant}")
            except ParamsError as e:
                problems += [f"{ab.path}: variant {variant!r}: {line}" for line in e.problems]
                break  # the same problem for every seed
    if problems:
        raise AblationError(problems)
    return valid


# --------------------------------------------------------------------------- one run's record

def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def experiment_ref(root: Path, name: str) -> str | None:
    """The git ref DVC stored experiment ``name`` under (newest if several), or None."""
    proc = _git(root, "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps")
    for ref in proc.stdout.split():
        if ref.rsplit("/", 1)[-1] == name:
            return ref
    return None


def _read_at(root: Path, ref: str, path: str) -> str | None:
    proc = _git(root, "show", f"{ref}:{path}")
    return proc.stdout if proc.returncode == 0 else None


def run_record(root: Path, ref: str, variant: str, seed: int, params, stages: list[str]) -> dict[str, Any]:
    """The figures of one finished experiment, read from its git ref (metrics files and the
    val-bpb curve of base_train's history). The evaluate stage's figures are read only when
    the set runs it (otherwise the ref holds the workspace's older file)."""
    base = json.loads(_read_at(root, ref, "metrics/base_train.json") or "null")
    if not isinstance(base, dict):
        raise AblationError([f"experiment {ref}: no metrics/base_train.json (did base_train run?)"])
    m: dict[str, Any] = {
        "val_bpb": base.get("final_val_bpb"), "min_val_bpb": base.get("min_val_bpb"),
        "val_bpb_closing": base.get("final_val_bpb_closing"), "val_bpb_depth2": base.get("final_val_bpb_depth2"),
        "tok_per_sec": base.get("tok_per_sec"), "peak_memory_mib": base.get("peak_memory_mib"),
        "optimizer_state_mib": base.get("optimizer_state_mib"), "final_grad_norm": base.get("final_grad_norm"),
        "flops_per_token": base.get("flops_per_token"), "tokens_seen": base.get("tokens_seen"),
        "train_seconds": base.get("train_seconds"), "parameters": base.get("parameters"),
        "parameters_active": base.get("parameters_active"),
    }
    ran_eval = any(s in ("evaluate", "report") for s in stages)
    ev = json.loads(_read_at(root, ref, "metrics/eval.json") or "null") if ran_eval else None
    if isinstance(ev, dict):
        for stage in ("base", "mid"):
            if isinstance(ev.get(stage), dict) and "val_bpb" in ev[stage]:
                m["eval_val_bpb"] = ev[stage]["val_bpb"]
        for stage in ("rl", "sft"):
            row = ev.get(stage)
            if isinstance(row, dict):
                for task in ("brackets", "calculator"):
                    if f"{task}_accuracy" in row and f"{task}_accuracy" not in m:
                        m[f"{task}_accuracy"] = row[f"{task}_accuracy"]
    curve = []
    text = _read_at(root, ref, "metrics/base_train_history.csv")
    if text:
        tokens_per_step = params.base_train.total_batch_size
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("val_bpb"):
                curve.append([int(row["step"]) * tokens_per_step, float(row["val_bpb"])])
    return {"variant": variant, "seed": seed, "experiment": ref.rsplit("/", 1)[-1], "ref": ref,
            "metrics": {k: v for k, v in m.items() if v is not None}, "curve": curve}


# --------------------------------------------------------------------------- the set

def _flops_curve(record: Mapping[str, Any]) -> list[list[float]]:
    f = record["metrics"].get("flops_per_token")
    return [[t * f, b] for t, b in record["curve"]] if f else []


def summarise(ab: AblationSet, seeds: list[int], records: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    """``metrics/ablations/<set>.json`` and the report, from the per-run records."""
    metrics = [k for k in METRICS if any(k in r["metrics"] for r in records)]
    cmp_runs = [{**r, "curve": _flops_curve(r)} for r in records]
    comparisons = [c.as_dict() for c in compare_set(cmp_runs, ab.baseline, metrics)]
    result = {"set": ab.name, "baseline": ab.baseline, "seeds": seeds, "metrics": metrics,
              "runs": [{"variant": r["variant"], "seed": r["seed"], "metrics": r["metrics"],
                        "experiment": r["experiment"], "curve": r["curve"]} for r in records],
              "comparisons": comparisons, "description": ab.description,
              "variants": {v: ab.variants[v] for v in ab.variants}, "common": ab.common, "stages": ab.stages}
    out = root / RESULTS_DIR / f"{ab.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    curves: dict[str, list] = {}
    for r in records:
        curves.setdefault(r["variant"], []).append([tuple(p) for p in r["curve"]])
    report = root / REPORTS_DIR / f"{ab.name}.md"
    write_report(result, report, report.parent / f"{ab.name}_val_bpb.png", curves, ab.description, ab.cost)
    return result


def _record_path(root: Path, ab: AblationSet, variant: str, seed: int) -> Path:
    return root / RESULTS_DIR / ab.name / "runs" / f"{variant}-s{seed}.json"


def params_fingerprint(params, stages: list[str]) -> str:
    """sha256 of what a run trains: the validated params without ``tracking`` (which no stage
    depends on), and the stages run. Two runs with equal fingerprints are the same run."""
    import hashlib

    data = params.model_dump(mode="json")
    data.pop("tracking", None)
    blob = json.dumps({"params": data, "stages": sorted(stages)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable(root: Path, fingerprint: str, code: str) -> dict[str, Any] | None:
    """A finished run of another set with the same params and code (e.g. coord_dims' n_dim 8
    is rdn_vs_gpt's rdn), or None. Runs of uncommitted code are never reused."""
    if code.endswith("+dirty"):
        return None
    for path in sorted((root / RESULTS_DIR).glob("*/runs/*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("params_sha256") == fingerprint and rec.get("code") == code:
            return {**rec, "reused_from": str(path.relative_to(root))}
    return None


def run_ablation(name: str, root: Path, seeds: int | None = None, jobs: int = 1, stages: list[str] | None = None,
                 params_file: Path | None = None, force: bool = False,
                 runner: Callable[[list[str], Path, dict[str, str], Path], int] | None = None) -> dict[str, Any]:
    """Validate, run what is missing, summarise. Returns the set's result dict."""
    root = Path(root).resolve()
    if seeds is not None and seeds < 2:
        raise AblationError([f"seeds: must be >= 2 (a paired interval needs two pairs) (got {seeds})"])
    ab = load_ablation(name, root)
    if stages:
        ab.stages = list(stages)
    seed_list = ab.seed_values(seeds)
    dvc_yaml = root / "dvc.yaml"
    dvc_stages = list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})) if dvc_yaml.exists() else None
    valid = validate(ab, seed_list, params_file or root / "params.yaml", dvc_stages)
    todo, records = [], {}
    for variant in ab.variants:
        for seed in seed_list:
            path = _record_path(root, ab, variant, seed)
            if path.exists() and not force:
                records[variant, seed] = json.loads(path.read_text())
            else:
                todo.append((variant, seed))
    total = len(ab.variants) * len(seed_list)
    log.info("ablation %s: %d variants x %d seeds = %d runs (%d done, %d to run), %d at a time, stages %s",
             ab.name, len(ab.variants), len(seed_list), total, total - len(todo), len(todo), jobs,
             " ".join(ab.stages))
    parent = _mlflow_parent(ab, root, valid)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS=str(threads), DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("RDN_PROJECT_ROOT", None)   # each run lives in DVC's temporary copy
    env.pop("RDN_MLFLOW_PARENT_RUN_ID", None)
    if todo and runner is None:
        _prepare_shared(ab, root, env, dvc_stages or [])
    runner = runner or _run_logged
    started = time.monotonic()
    done_lock = threading.Lock()
    finished = [0]
    failures: list[str] = []

    code = _code_version(root)

    def one(variant: str, seed: int) -> None:
        exp = ab.exp_name(variant, seed)
        fingerprint = params_fingerprint(valid[variant, seed], ab.stages)
        reuse = None if force else _reusable(root, fingerprint, code)
        if reuse is not None:
            record = {**reuse, "variant": variant, "seed": seed}
            path = _record_path(root, ab, variant, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            with done_lock:
                records[variant, seed] = record
                finished[0] += 1
            log.info("ablation %s: %s is the same run as %s (same params and code): reused", ab.name, exp,
                     reuse["reused_from"])
            return
        ref = None if force else experiment_ref(root, exp)
        if ref is None:
            t0 = time.monotonic()
            logfile = root / LOGS_DIR / ab.name / f"{exp}.log"
            rc = runner(ab.dvc_command(variant, seed, force=True), root, env, logfile)
            ref = experiment_ref(root, exp) if rc == 0 else None
            if ref is None:
                failures.append(f"{exp}: dvc exp run failed (exit {rc}); log: {logfile}")
                log.error("ablation %s: %s failed (exit %s); its log: %s", ab.name, exp, rc, logfile)
                return
            seconds = time.monotonic() - t0
        else:
            seconds = 0.0
            log.info("ablation %s: %s already ran as a DVC experiment; collecting it", ab.name, exp)
        record = run_record(root, ref, variant, seed, valid[variant, seed], ab.stages)
        record.update(seconds=round(seconds, 1), params_sha256=fingerprint, code=code)
        path = _record_path(root, ab, variant, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _nest(parent, ab, root, record, valid[variant, seed])
        with done_lock:
            records[variant, seed] = record
            finished[0] += 1
            elapsed = time.monotonic() - started
            left = len(todo) - finished[0]
            eta = elapsed / finished[0] * left if finished[0] else 0
            log.info("ablation %s: [%d/%d] %s done in %s (val bpb %s); %s left, eta %s", ab.name,
                     total - len(todo) + finished[0], total, exp, human_seconds(seconds),
                     f"{record['metrics'].get('val_bpb', float('nan')):.4f}", left, human_seconds(eta))

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for fut in [pool.submit(one, v, s) for v, s in todo]:
            fut.result()
    if failures:
        raise AblationError(failures)
    ordered = [records[v, s] for v in ab.variants for s in seed_list]
    result = summarise(ab, seed_list, ordered, root)
    _finish_parent(parent, ab, root, result, valid)
    for c in result["comparisons"]:
        if c["metric"] in ("val_bpb", "val_bpb_closing", "val_bpb_depth2", "val_bpb_at_equal_flops"):
            log.info("ablation %s: %s vs %s, %s: %+.4f [%+.4f, %+.4f] -> %s", ab.name, c["variant"], ab.baseline,
                     c["metric"], c["mean_diff"], c["ci_low"], c["ci_high"], c["verdict"])
    log.info("ablation %s: wrote %s and %s", ab.name, RESULTS_DIR / f"{ab.name}.json", REPORTS_DIR / f"{ab.name}.md")
    return result


def _code_version(root: Path) -> str:
    """The git tree hashes of the code the runs execute (rdn/, stages/, dvc.yaml), so later
    commits that touch only results or docs keep it; ``+dirty`` when the files differ from HEAD."""
    trees = _git(root, "rev-parse", "HEAD:rdn", "HEAD:stages", "HEAD:dvc.yaml").stdout.split()
    dirty = _git(root, "status", "--porcelain", "--", "rdn", "stages", "dvc.yaml").stdout.strip()
    return ("-".join(t[:12] for t in trees) or "unknown") + ("+dirty" if dirty else "")


def _prepare_shared(ab: AblationSet, root: Path, env: dict[str, str], dvc_stages: list[str]) -> None:
    """``dvc repro`` the stages every run shares (data, tokenizer) in the workspace first: DVC
    keeps no run cache for ``persist`` outputs, so otherwise each experiment would rebuild them."""
    shared = [s for s in ab.shared_stages if s in dvc_stages]
    if not shared:
        return
    logfile = root / LOGS_DIR / ab.name / "shared-stages.log"
    t0 = time.monotonic()
    rc = _run_logged(["dvc", "repro", *shared], root, env, logfile)
    if rc != 0:
        raise AblationError([f"dvc repro {' '.join(shared)} (the stages every run shares) failed with exit {rc}; "
                             f"log: {logfile}"])
    log.info("ablation %s: shared stages %s up to date (%s)", ab.name, ", ".join(shared),
             human_seconds(time.monotonic() - t0))


def _run_logged(cmd: list[str], root: Path, env: dict[str, str], logfile: Path) -> int:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log.info("$ %s  (log: %s)", shlex.join(cmd), logfile)
    with open(logfile, "w", encoding="utf-8") as out:
        return subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode


# --------------------------------------------------------------------------- MLflow

def _client(root: Path, valid: Mapping) -> tuple[Any, Any, str] | None:
    from rdn.tracking.client import fast_fail_http, mlflow_client, resolve_tracking_uri

    cfg = next(iter(valid.values())).tracking
    if not cfg.enabled:
        return None
    try:
        with fast_fail_http(cfg.timeout_s):
            uri = resolve_tracking_uri(cfg, root)
            return mlflow_client(uri), cfg, uri
    except Exception as e:  # noqa: BLE001 -- tracking never stops an ablation
        log.warning("MLflow unavailable (%s); the ablation continues without it", e)
        return None


def _mlflow_parent(ab: AblationSet, root: Path, valid: Mapping) -> str | None:
    got = _client(root, valid)
    if got is None:
        return None
    client, cfg, uri = got
    from rdn.tracking.client import experiment_id_for, fast_fail_http, tracking_home

    try:
        with fast_fail_http(cfg.timeout_s):
            exp_id = experiment_id_for(client, ab.mlflow_experiment, tracking_home(root), uri)
            found = client.search_runs([exp_id], filter_string=f"tags.`rdn.kind` = 'ablation' and "
                                       f"tags.`rdn.ablation` = '{ab.name}'", max_results=1)
            if found:
                return found[0].info.run_id
            run = client.create_run(exp_id, run_name=f"ablation-{ab.name}",
                                    tags={"rdn.kind": "ablation", "rdn.ablation": ab.name,
                                          "mlflow.note.content": ab.description or ab.name})
            client.log_param(run.info.run_id, "baseline", ab.baseline)
            client.log_param(run.info.run_id, "variants", ",".join(ab.variants))
            return run.info.run_id
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not open the ablation's parent run (%s); continuing without it", e)
        return None


def _nest(parent: str | None, ab: AblationSet, root: Path, record: Mapping[str, Any], params) -> None:
    """Nest the experiment's own parent run (its stages' runs hang under it) under the set's
    run, and log the run's figures, variant and seed on it."""
    if parent is None:
        return
    got = _client(root, {0: params})
    if got is None:
        return
    client, cfg, _ = got
    try:
        from rdn.tracking.client import DVC_EXP_KIND, fast_fail_http

        with fast_fail_http(cfg.timeout_s):
            exp_id = client.get_run(parent).info.experiment_id
            found = client.search_runs([exp_id], filter_string=f"tags.`rdn.dvc_exp` = '{record['experiment']}' "
                                       f"and tags.`rdn.kind` = '{DVC_EXP_KIND}'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
            if found:
                run_id = found[0].info.run_id
            else:  # no stage ran (all restored from DVC's run cache): a run of its own for the figures
                run_id = client.create_run(exp_id, run_name=record["experiment"],
                                           tags={"rdn.dvc_exp": record["experiment"]}).info.run_id
            client.set_tag(run_id, "mlflow.parentRunId", parent)
            client.set_tag(run_id, "rdn.ablation", ab.name)
            for k, v in (("variant", record["variant"]), ("seed", record["seed"])):
                client.set_tag(run_id, f"rdn.ablation.{k}", str(v))
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(f"ablation/{k}", float(v), now, 0) for k, v in record["metrics"].items()
                       if isinstance(v, (int, float))]
            if metrics:
                client.log_batch(run_id, metrics=metrics)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not nest %s under the ablation's run (%s)", record["experiment"], e)


def _finish_parent(parent: str | None, ab: AblationSet, root: Path, result: Mapping[str, Any], valid) -> None:
    if parent is None:
        return
    got = _client(root, valid)
    if got is None:
        return
    client, cfg, _ = got
    try:
        from mlflow.entities import Metric

        from rdn.tracking.client import fast_fail_http

        now = int(time.time() * 1000)
        metrics = []
        for c in result["comparisons"]:
            for k in ("mean_diff", "ci_low", "ci_high"):
                metrics.append(Metric(f"{c['variant']}/{c['metric']}/{k}", float(c[k]), now, 0))
        with fast_fail_http(cfg.timeout_s):
            for i in range(0, len(metrics), 900):
                client.log_batch(parent, metrics=metrics[i:i + 900])
            for c in result["comparisons"]:
                client.set_tag(parent, f"verdict.{c['variant']}.{c['metric']}", c["verdict"])
            client.log_artifact(parent, str(root / RESULTS_DIR / f"{ab.name}.json"))
            for f in (root / REPORTS_DIR).glob(f"{ab.name}*"):
                client.log_artifact(parent, str(f))
            client.set_terminated(parent, "FINISHED")
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not finish the ablation's parent run (%s)", e)


def ablate_main(name: str | None, seeds: int | None = None, jobs: int = 1, stages: list[str] | None = None,
                force: bool = False, root: Path | None = None, out=None) -> int:
    """The ``rdn ablate`` command: list the sets, or run one (exit 2 on invalid input)."""
    out = out or sys.stdout
    root = Path(root or Path.cwd()).resolve()
    if not name:
        for n in available(root):
            try:
                ab = load_ablation(n, root)
                desc = f"{ab.description} ({len(ab.variants)} variants x {ab.seeds} seeds)"
            except AblationError as e:
                desc = f"INVALID: {e.problems[0]}"
            print(f"{n:20s} {desc}", file=out)
        return 0
    try:
        result = run_ablation(name, root, seeds=seeds, jobs=jobs, stages=stages, force=force)
    except AblationError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        print(f"rdn ablate: stopped ({len(e.problems)} problem{'s' if len(e.problems) != 1 else ''})",
              file=sys.stderr)
        return 2
    for c in result["comparisons"]:
        if c["ci_low"] == c["ci_high"] == c["mean_diff"] == 0:
            continue  # a figure the variants share (FLOPs, tokens): nothing to report
        print(f"{c['variant']:>14s} vs {result['baseline']}: {c['metric']:<24s} {c['mean_diff']:+.4f} "
              f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]  {c['verdict']}", file=out)
    print(f"# {RESULTS_DIR / (name + '.json')}, {REPORTS_DIR / (name + '.md')}", file=out)
    return 0
