"""dvc.yaml declares, for each stage, every rdn module that shapes its outputs.

Oracle: the modules a stage really imports (sys.modules after importing its entry
point in a fresh interpreter). Each must be a declared dep unless it is one of the
output-neutral modules (logging, tracking, validation) that dvc.yaml leaves out on
purpose, as its header comment explains."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.conftest import REPO, run_python

OUTPUT_NEUTRAL = {"rdn/__init__.py", "rdn/config.py", "rdn/io.py", "rdn/pipeline/launch.py", "rdn/progress.py",
                  "rdn/pipeline/stage.py", "rdn/tracking/run.py", "rdn/tracking/client.py", "rdn/tracking/replay.py",
                  "stages/__init__.py"}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _declared_outputs() -> set[str]:
    """Every path some stage produces (outs, metrics, plots): a dep on one need not exist in a clean clone."""
    found = set()
    for spec in STAGES.values():
        for key in ("outs", "metrics", "plots"):
            for entry in spec.get(key, []):
                found.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return found


PRODUCED = _declared_outputs()


def _imported_project_files(module: str) -> set[str]:
    code = ("import importlib, json, sys, pathlib; m = importlib.import_module(%r); root = pathlib.Path.cwd();"
            "importlib.import_module(m.RUNNER.split(':')[0]) if hasattr(m, 'RUNNER') else None;"
            "print(json.dumps(sorted(str(pathlib.Path(m.__file__).resolve().relative_to(root)) for m in "
            "list(sys.modules.values()) if getattr(m, '__file__', None) and "
            "pathlib.Path(m.__file__).resolve().is_relative_to(root))))") % module
    proc = run_python("-c", code, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return {f for f in json.loads(proc.stdout) if f.startswith(("rdn/", "stages/"))}


def _module(stage: str) -> str:
    return STAGES[stage]["cmd"].split("-m", 1)[1].split()[0]


@pytest.fixture(scope="module")
def imported() -> dict[str, set[str]]:
    """Each stage's imports, each in its own fresh interpreter; the interpreters run side by
    side (one per core), as they are independent."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = dict(zip(STAGES, pool.map(lambda stage: _imported_project_files(_module(stage)), STAGES)))
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_the_modules_it_uses(stage, imported):
    spec = STAGES[stage]
    module = _module(stage)
    deps = set(spec.get("deps", []))
    for dep in deps:
        assert (REPO / dep).exists() or dep in PRODUCED, f"{stage}: dep {dep} does not exist and no stage makes it"
    used = {f for f in imported[stage] if not f.endswith("__init__.py") or f in OUTPUT_NEUTRAL}
    folders = tuple(d.rstrip("/") + "/" for d in deps if (REPO / d).is_dir())
    undeclared = sorted(f for f in used - deps - OUTPUT_NEUTRAL if not f.startswith(folders))
    assert not undeclared, f"dvc.yaml stage {stage!r} uses but does not declare: {undeclared}"
    stage_file = module.replace(".", "/") + ".py"
    assert stage_file in deps, f"{stage}: its own entry point {stage_file} is not a dep"
