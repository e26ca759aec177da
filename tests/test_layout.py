"""The package layout: imports under rdn/ run one way, and the library never imports the
orchestration tools.

Oracle: the import statements themselves (read with ``ast``, function-level imports
included), not the modules' own view of their dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

RDN = REPO / "rdn"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in RDN.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every rdn module ``path`` names in an import statement, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _reaches(start: str, goal: str) -> list[str] | None:
    """An import chain start -> ... -> goal, or None."""
    stack, seen = [[start]], {start}
    while stack:
        chain = stack.pop()
        for nxt in GRAPH[chain[-1]]:
            if nxt == goal:
                return chain + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append(chain + [nxt])
    return None


def _is_package_reexport(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodule (and the submodule importing a sibling
    through the package) is how a package exposes its names, not a layering cycle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_the_graph_sees_known_edges():
    # a check that the parser finds imports at all (it would pass vacuously otherwise)
    assert "rdn.checkpoint" in GRAPH["rdn.eval.evaluate"]
    assert "rdn.eval.evaluate" in GRAPH["rdn.train.rl"]
    assert "rdn.optim" in GRAPH["rdn.model.gpt"]  # a function-level import counts too


def test_no_module_imports_one_that_imports_it_back():
    cycles = []
    for a in sorted(GRAPH):
        for b in sorted(GRAPH[a]):
            if _is_package_reexport(a, b):
                continue
            back = _reaches(b, a)
            if back is not None and not all(_is_package_reexport(x, y) for x, y in zip(back, back[1:])):
                cycles.append(" -> ".join([a] + back))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_run_one_way():
    """Lower layers never import higher ones: evaluation and inference never import training,
    the library core never imports pipeline glue, tracking or the CLI."""
    rules = {
        ("rdn.eval", "rdn.inference", "rdn.checkpoint", "rdn.artifacts", "rdn.model", "rdn.optim", "rdn.data",
         "rdn.tokenizer", "rdn.tasks", "rdn.coords", "rdn.device"): ("rdn.train",),
        ("rdn.train", "rdn.eval", "rdn.inference", "rdn.model", "rdn.optim", "rdn.data", "rdn.tokenizer",
         "rdn.tasks", "rdn.checkpoint", "rdn.serve"): ("rdn.pipeline", "rdn.cli", "rdn.tracking"),
        ("rdn.serve",): ("rdn.train",),
        ("rdn.model", "rdn.optim", "rdn.coords"): ("rdn.data", "rdn.tokenizer", "rdn.tasks", "rdn.inference"),
    }
    bad = []
    for lower, higher in rules.items():
        for name, deps in GRAPH.items():
            if name.startswith(lower):
                bad += [f"{name} imports {d}" for d in deps if d.startswith(higher)]
    assert not bad, "\n".join(sorted(bad))


def test_library_never_imports_prefect_or_dvc():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("prefect", "dvc")]
    assert not offenders, offenders
