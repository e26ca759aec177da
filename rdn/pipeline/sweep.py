"""Experiment sets (``configs/experiments/<name>.yaml``) and ``rdn sweep``.

An experiment set names variants of the pipeline, each a few params overrides::

    description: RDN hierarchical coordinates vs the plain GPT baseline
    stages: []                      # dvc targets; empty = the whole pipeline
    mlflow_experiment: sweep-rdn_vs_gpt   # optional; this is the default
    common:                          # optional: applied to every variant first
      base_train.num_iterations: 200
    variants:
      rdn: {model.use_coordinates: true}
      gpt: {model.use_coordinates: false}

Keys are dotted paths into ``params.yaml``; values are YAML values. ``rdn sweep NAME``
validates every variant first (the overrides applied in memory to params.yaml, then the
whole file through :mod:`rdn.config`), prints nothing to run if any variant is invalid,
and otherwise prints (``--run``: executes) one ``dvc exp run --queue -n <set>-<variant>
-S key=value ...`` per variant followed by ``dvc queue start``. With ``--temp`` the
commands are ``dvc exp run --temp`` instead: ``--temp --run`` runs the variants now, one
after another, in the foreground.

Each variant also gets ``-S tracking.experiment=<mlflow_experiment>`` (``tracking`` is
no stage's DVC param, so it changes no cache key): every stage run of every variant
lands in that one MLflow experiment, grouped under a parent run named after the DVC
experiment (see :mod:`rdn.tracking.run`), so ``rdn compare --experiment <it>``, the MLflow
UI's compare view and ``dvc exp show --md`` line the variants up.

``--write-params DIR`` writes each variant's full params file instead, for the Prefect
flow's ``params_file`` parameter (one flow run per variant; the flow's parent run lands
in the same MLflow experiment). Any other caller uses the same objects: :func:`load_set` gives
the :class:`ExperimentSet`, :meth:`ExperimentSet.variant_params` the full params dict
of one variant (write it to a file and run the stages on it), and
:func:`validate_set` raises :class:`SweepError` naming the file, variant and key of
every problem.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

EXPERIMENTS_DIR = Path("configs") / "experiments"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class SweepError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class ExperimentSet:
    name: str
    path: Path
    description: str = ""
    stages: list[str] = field(default_factory=list)
    mlflow_experiment: str = ""
    common: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def overrides(self, variant: str) -> dict[str, Any]:
        """Every override of one variant, in order: common, the variant's own, the MLflow experiment."""
        return {**self.common, **self.variants[variant], "tracking.experiment": self.mlflow_experiment}

    def variant_params(self, base: Mapping[str, Any], variant: str) -> dict[str, Any]:
        """``base`` (a params dict) with the variant's overrides applied; raises SweepError."""
        out = copy.deepcopy(dict(base))
        problems = []
        for key, value in self.overrides(variant).items():
            problem = _set_dotted(out, key, value)
            if problem:
                problems.append(f"{self.path}: variant {variant!r}: {key}: {problem}")
        if problems:
            raise SweepError(problems)
        return out

    def exp_name(self, variant: str, suffix: str = "") -> str:
        return f"{self.name}-{variant}{'-' + suffix if suffix else ''}"

    def dvc_command(self, variant: str, mode: str = "queue", suffix: str = "", force: bool = False) -> list[str]:
        cmd = ["dvc", "exp", "run", "--queue" if mode == "queue" else "--temp", "-n", self.exp_name(variant, suffix)]
        if force:
            cmd.append("-f")
        for key, value in self.overrides(variant).items():
            cmd += ["-S", f"{key}={format_value(value)}"]
        return cmd + list(self.stages)


def format_value(value: Any) -> str:
    """A value as DVC's ``-S key=value`` (Hydra override grammar) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = value and all(c.isalnum() or c in "_-./" for c in value) and not _looks_typed(value)
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot pass {type(value).__name__} through -S")


def _looks_typed(text: str) -> bool:
    """Would YAML/Hydra read this string as something else (bool, null, number)?"""
    return not isinstance(yaml.safe_load(text), str) or text.lower() in ("true", "false", "null", "none")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> str | None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i + 1])
            return f"unknown key ({where!r} is not in params.yaml)"
        node = node[part]
    if not isinstance(node, dict):
        return f"{'.'.join(parts[:-1])!r} is not a section"
    node[parts[-1]] = value
    return None


def experiments_dir(root: Path | None = None) -> Path:
    return (root or Path.cwd()) / EXPERIMENTS_DIR


def available(root: Path | None = None) -> list[str]:
    d = experiments_dir(root)
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_set(name_or_path: str | Path, root: Path | None = None) -> ExperimentSet:
    """Read ``configs/experiments/<name>.yaml`` (or a path); raises SweepError on a malformed file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = experiments_dir(root) / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(available(root)) or "none"
        raise SweepError([f"{path}: no such experiment set (available: {known})"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SweepError([f"{path}: not valid YAML: {e}"]) from None
    problems = []
    if not isinstance(data, dict):
        raise SweepError([f"{path}: top level must be a mapping with 'variants'"])
    unknown = set(data) - {"description", "stages", "mlflow_experiment", "common", "variants"}
    if unknown:
        problems.append(f"{path}: unknown top-level keys {sorted(unknown)}")
    name = path.stem
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        problems.append(f"{path}: 'variants' must be a non-empty mapping of name -> {{key: value}}")
        variants = {}
    for vname, over in variants.items():
        if not isinstance(vname, str) or not vname or set(vname) - _NAME_OK:
            problems.append(f"{path}: variant name {vname!r}: use letters, digits, '_' and '-' only")
        if not isinstance(over, dict) or not over:
            problems.append(f"{path}: variant {vname!r}: must be a non-empty mapping of params key -> value")
    common = data.get("common") or {}
    if not isinstance(common, dict):
        problems.append(f"{path}: 'common' must be a mapping of params key -> value")
        common = {}
    stages = data.get("stages") or []
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        problems.append(f"{path}: 'stages' must be a list of dvc.yaml stage names")
        stages = []
    mlflow_experiment = data.get("mlflow_experiment") or f"sweep-{name}"
    if not isinstance(mlflow_experiment, str):
        problems.append(f"{path}: 'mlflow_experiment' must be a string")
    if problems:
        raise SweepError(problems)
    return ExperimentSet(name=name, path=path, description=str(data.get("description") or ""), stages=stages,
                         mlflow_experiment=mlflow_experiment, common=common,
                         variants={str(k): dict(v) for k, v in variants.items()})


def validate_set(exp: ExperimentSet, params_file: Path = Path("params.yaml"),
                 dvc_stages: list[str] | None = None) -> dict[str, Any]:
    """Validate every variant against ``params_file``; returns {variant: Params}. Raises SweepError
    listing every problem as ``<file>: variant '<v>': <key>: <problem>``."""
    from rdn.config import ParamsError, read_params_file, validate_params

    base = read_params_file(params_file)
    problems: list[str] = []
    if dvc_stages is not None:
        for s in exp.stages:
            if s not in dvc_stages:
                problems.append(f"{exp.path}: stages: {s!r} is not a dvc.yaml stage ({', '.join(dvc_stages)})")
    valid = {}
    for variant in exp.variants:
        try:
            data = exp.variant_params(base, variant)
        except SweepError as e:
            problems += e.problems
            continue
        try:
            valid[variant] = validate_params(data, f"{exp.path}:{variant}")
        except ParamsError as e:
            problems += [f"{exp.path}: variant {variant!r}: {line}" for line in e.problems]
    if problems:
        raise SweepError(problems)
    return valid


def _dvc_stages(root: Path) -> list[str] | None:
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        return None
    return list((yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}))


def sweep_main(name: str | None, run: bool = False, temp: bool = False, params_file: Path = Path("params.yaml"),
               jobs: int = 1, suffix: str = "", stages: list[str] | None = None, write_params: Path | None = None,
               force: bool = False, out=None) -> int:
    out = out or sys.stdout
    root = Path.cwd()
    if not name:
        for n in available(root):
            try:
                desc = load_set(n, root).description
            except SweepError as e:
                desc = f"INVALID: {e.problems[0]}"
            print(f"{n:20s} {desc}", file=out)
        return 0
    try:
        exp = load_set(name, root)
        if stages is not None:
            exp.stages = stages
        valid = validate_set(exp, params_file, _dvc_stages(root))
    except SweepError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        print(f"rdn sweep: nothing queued ({len(e.problems)} problem{'s' if len(e.problems) != 1 else ''})",
              file=sys.stderr)
        return 2
    if write_params is not None:
        from rdn.config import read_params_file

        base = read_params_file(params_file)
        write_params.mkdir(parents=True, exist_ok=True)
        print(f"# {exp.name}: one params file per variant for the Prefect flow's params_file parameter "
              f"(MLflow experiment {exp.mlflow_experiment!r})", file=out)
        for variant in exp.variants:
            path = write_params / f"{exp.exp_name(variant, suffix)}.yaml"
            path.write_text(f"# rdn sweep {exp.name}: variant {variant} ({exp.path})\n"
                            + yaml.safe_dump(exp.variant_params(base, variant), sort_keys=False), encoding="utf-8")
            print(f"prefect deployment run rdn-full-pipeline/local -p params_file={path}", file=out)
        return 0
    mode = "temp" if temp else "queue"
    commands = [exp.dvc_command(v, mode, suffix, force) for v in exp.variants]
    if mode == "queue":
        commands.append(["dvc", "queue", "start", "--jobs", str(jobs)])
    print(f"# {exp.name}: {exp.description}".rstrip(": "), file=out)
    print(f"# {len(valid)} variants valid against {params_file}; MLflow experiment {exp.mlflow_experiment!r}",
          file=out)
    for cmd in commands:
        print(shlex.join(cmd), file=out)
    follow = ["dvc exp show --md", f"rdn compare --experiment {exp.mlflow_experiment}"]
    if mode == "queue":
        follow = ["dvc queue status", "dvc queue logs <name>"] + follow
    if not run:
        print("# run these (or `rdn sweep %s --run`), then: %s" % (exp.name, "; ".join(follow)), file=out)
        return 0
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for cmd in commands:
        print(f"$ {shlex.join(cmd)}", file=out, flush=True)
        proc = subprocess.run(cmd, cwd=root, env=env)
        if proc.returncode != 0:
            print(f"rdn sweep: `{shlex.join(cmd)}` failed with status {proc.returncode}", file=sys.stderr)
            return proc.returncode
    print("# then: " + "; ".join(follow), file=out)
    return 0
