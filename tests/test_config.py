"""Tests for ``rdn.config`` (params validation) and ``rdn validate`` (the console script).

What is pinned down here, always against values written by hand:

* the shipped ``params.yaml`` and every preset in ``configs/`` validate, and the CLI
  prints one ``OK`` line for each;
* one table of malformed params files: each must raise :class:`ParamsError` with a
  problem line that *starts* with the key path the user typed (and, where the value
  is known, ends with ``(got VALUE)``), and the CLI must exit 2 naming that key;
* every problem is reported at once;
* ``extends:`` deep-merges an overlay over its base and refuses cycles;
* the derived model geometry (width, heads) follows the documented rule;
* project rule: every section field has a docstring and every number a bound.
"""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml

from rdn.config import ModelConfig, Params, ParamsError, load_params, validate_params

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"
# presets are params files; configs/experiments/ holds sweep sets and configs/ablations/
# ablation sets (each tested in its own module)
SHIPPED = [PARAMS, *sorted(p for p in (REPO / "configs").glob("**/*.yaml")
                           if not {"experiments", "ablations"} & set(p.relative_to(REPO / "configs").parts))]

SECTIONS = ("run", "coords", "tracking", "data", "tokenizer", "model",
            "base_train", "mid_train", "chat_sft", "chat_rl", "evaluate", "dist", "optim")


# --------------------------------------------------------------------------- helpers

def base_params() -> dict:
    """A fresh, mutable copy of the shipped params.yaml."""
    return yaml.safe_load(PARAMS.read_text(encoding="utf-8"))


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``rdn`` exactly as the console script would, from the repo root."""
    return subprocess.run([sys.executable, "-m", "rdn.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert isinstance(info.value, ValueError)
    assert info.value.problems, "ParamsError without any problem line"
    return info.value.problems


def key_of(line: str) -> str:
    """The key path of a problem line: everything before the first ': '."""
    return line.split(": ", 1)[0]


# Mutations used by the table. Each returns a function params-dict -> dict | str;
# a returned str is written verbatim (for the not-a-params-file cases).

def set_(section: str, key: str, value):
    def build(p: dict) -> dict:
        p[section][key] = value
        return p
    return build


def update(section: str, **values):
    def build(p: dict) -> dict:
        p[section].update(values)
        return p
    return build


def rename(section: str | None, old: str, new: str):
    def build(p: dict) -> dict:
        where = p if section is None else p[section]
        where[new] = where.pop(old)
        return p
    return build


def drop_section(name: str):
    def build(p: dict) -> dict:
        del p[name]
        return p
    return build


def set_task(section: str, task: str, n: int):
    def build(p: dict) -> dict:
        p[section]["tasks"][task] = n
        return p
    return build


def raw(text: str):
    return lambda p: text


# --------------------------------------------------------------------------- 1. shipped files

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_params_validate(path: Path):
    params = load_params(path)
    assert isinstance(params, Params)

    result = run_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("OK"), result.stdout


def test_configs_folder_is_not_empty():
    assert len(SHIPPED) >= 4, "expected params.yaml plus the d12/d20/d26 presets"


# Hand-computed from the preset comments: width = 64*depth rounded up to 128, heads = width/128.
@pytest.mark.parametrize("name,depth,width,heads", [
    ("params.yaml", 4, 256, 4),          # head_dim 64 in params.yaml: 256 / 64
    ("configs/d12.yaml", 12, 768, 6),
    ("configs/d20.yaml", 20, 1280, 10),
    ("configs/d26.yaml", 26, 1664, 13),
])
def test_shipped_geometry_and_ok_line(name, depth, width, heads):
    m = load_params(REPO / name).model
    assert (m.depth, m.width, m.n_head) == (depth, width, heads)
    out = run_cli("validate", name).stdout
    assert f"model depth {depth}, width {width}, {heads} heads" in out


# --------------------------------------------------------------------------- 2. malformed files

# (id, build, expected line prefix, expected line suffix or None).
# "{file}" stands for the written file's path, "{dir}" for its folder.
BAD_CASES = [
    # wrong types (strict: no coercion)
    ("str-for-int", set_("run", "seed", "1337"), "run.seed: ", "(got '1337')"),
    ("float-for-int", set_("base_train", "device_batch_size", 4.0), "base_train.device_batch_size: ", "(got 4.0)"),
    ("str-for-bool", set_("tracking", "enabled", "yes"), "tracking.enabled: ", "(got 'yes')"),
    ("bool-for-float", set_("chat_rl", "temperature", True), "chat_rl.temperature: ", "(got true)"),
    ("inf-float", set_("tracking", "timeout_s", float("inf")), "tracking.timeout_s: ", "(got .inf)"),
    ("section-not-mapping", lambda p: {**p, "model": 5}, "model: must be a mapping", "(got 5)"),
    # bounds
    ("negative-size", set_("base_train", "device_batch_size", -3),
     "base_train.device_batch_size: must be >= 1", "(got -3)"),
    ("zero-steps", set_("chat_rl", "num_steps", 0), "chat_rl.num_steps: must be >= 1", "(got 0)"),
    ("upper-bound", set_("coords", "n_dim", 65), "coords.n_dim: must be <= 64", "(got 65)"),
    ("exclusive-upper", set_("data", "val_fraction", 0.5), "data.val_fraction: must be < 0.5", "(got 0.5)"),
    ("vocab-too-small", set_("tokenizer", "vocab_size", 100), "tokenizer.vocab_size: must be >= 512", "(got 100)"),
    # enums and patterns
    ("device-tpu", set_("run", "device", "tpu"), "run.device: ", "(got 'tpu')"),
    ("window-pattern-char", set_("model", "window_pattern", "SSX"), "model.window_pattern: ", "(got 'SSX')"),
    ("eval-unknown-task", set_("evaluate", "tasks", ["calculator", "chess"]), "evaluate.tasks.1: ", "(got 'chess')"),
    ("ortho-dtype-float16", set_("optim", "orthogonalization_dtype", "float16"),
     "optim.orthogonalization_dtype: ", "(got 'float16')"),
    # unknown / misspelled keys and sections
    ("unknown-key", set_("model", "flavour", 1), "model.flavour: unknown key", None),
    ("typo-vocab_sise", rename("tokenizer", "vocab_size", "vocab_sise"),
     "tokenizer.vocab_sise: unknown key; did you mean 'vocab_size'?", None),
    ("typo-sead", rename("run", "seed", "sead"), "run.sead: unknown key; did you mean 'seed'?", None),
    ("typo-section", rename(None, "tokenizer", "tokeniser"), "tokeniser: unknown key; did you mean 'tokenizer'?", None),
    ("typo-section-missing", rename(None, "tokenizer", "tokeniser"), "tokenizer: missing required section", None),
    ("missing-section", drop_section("evaluate"), "evaluate: missing required section", None),
    # cross-field rules inside a section
    ("kv-heads-not-dividing", set_("model", "n_kv_head", 3),       # 256/64 = 4 query heads
     "model.n_kv_head: must divide the number of query heads (4)", "(got 3)"),
    ("width-not-multiple-of-head_dim", set_("model", "head_dim", 96),
     "model.head_dim: model width 256 must be a multiple of head_dim 96", "(got 96)"),
    ("short-window-too-long", set_("model", "short_window", 1024), "model.short_window: must be <= sequence_len", "(got 1024)"),
    ("batch-not-divisible", set_("base_train", "total_batch_size", 5000),   # 4 * 512 = 2048
     "base_train.total_batch_size: must be divisible by device_batch_size * seq_len = 2048", "(got 5000)"),
    ("both-step-counts-null", set_("base_train", "num_iterations", None),
     "base_train.num_iterations: set exactly one of num_iterations and target_param_data_ratio", "(got null)"),
    ("both-step-counts-set", set_("chat_sft", "target_param_data_ratio", 20.0),
     "chat_sft.num_iterations: set exactly one", "(got 60)"),
    ("warmup-plus-warmdown", update("mid_train", warmup_ratio=0.7, warmdown_ratio=0.4),
     "mid_train.warmdown_ratio: warmup_ratio + warmdown_ratio must be <= 1", "(got 0.4)"),
    ("folder-without-path", set_("data", "source", "folder"), "data.path: required when source is 'folder'", "(got null)"),
    ("row-group-over-shard", set_("data", "row_group_docs", 5000), "data.row_group_docs: must be <= docs_per_shard", "(got 5000)"),
    ("extension-without-dot", set_("data", "extensions", ["txt"]), "data.extensions.0: must look like '.txt'", "(got 'txt')"),
    ("bracket-pair-same-chars", set_("coords", "bracket_pairs", ["()", "[["]),
     "coords.bracket_pairs.1: must be two different characters", "(got '[[')"),
    ("bracket-char-reused", set_("coords", "bracket_pairs", ["()", "(]"]),
     "coords.bracket_pairs.1: character '(' already used", "(got '(]')"),
    ("rl-group-of-one", set_("chat_rl", "samples_per_prompt", 1), "chat_rl.samples_per_prompt: must be >= 2", "(got 1)"),
    ("unknown-mid-task", set_task("mid_train", "calculater", 5), "mid_train.tasks.calculater: unknown task", "(got 5)"),
    ("negative-task-count", set_task("chat_sft", "spelling", -1), "chat_sft.tasks.spelling: must be >= 0", "(got -1)"),
    # cross-section rule
    ("train-seq-over-model", set_("base_train", "seq_len", 1024),
     "base_train.seq_len: must be <= model.sequence_len (512)", "(got 1024)"),
    # not a params file at all
    ("empty-file", raw(""), "{file}: file is empty", None),
    ("blank-file", raw("  \n\n"), "{file}: file is empty", None),
    ("not-yaml", raw("run: [unclosed\n"), "{file}: not valid YAML", None),
    ("top-level-list", raw("- run\n- model\n"), "{file}: top level must be a mapping", None),
    ("extends-missing-file", raw("extends: missing.yaml\n"), "{file}: extends: 'missing.yaml' points to", None),
    ("comments-only", raw("# nothing here\n"), "{file}: file has no content", None),
    ("duplicate-key", raw("run:\n  seed: 1\n  seed: 2\n"), "{file}: not valid YAML at line 3", None),
    ("extends-not-a-path", lambda p: {"extends": 5, **p}, "extends: must be a path", "(got 5)"),
]


@pytest.mark.parametrize("build,prefix,suffix", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_malformed_params_are_rejected(tmp_path: Path, build, prefix: str, suffix: str | None):
    path = tmp_path / "params.yaml"
    content = build(base_params())
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write_yaml(path, content)
    prefix = prefix.format(file=path, dir=tmp_path)

    problems = problems_of(path)
    matching = [line for line in problems if line.startswith(prefix)]
    assert matching, f"no problem line starts with {prefix!r}: {problems}"
    if suffix is not None:
        assert any(line.endswith(suffix) for line in matching), f"expected {suffix!r} at the end: {matching}"

    result = run_cli("validate", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert prefix in result.stderr
    assert result.stdout == ""


def test_did_you_mean_also_names_the_task():
    # a typo'd task name gets the same hint as a typo'd key
    p = base_params()
    p["mid_train"]["tasks"]["calculater"] = 5
    with pytest.raises(ParamsError) as info:
        validate_params(p)
    assert any("did you mean 'calculator'?" in line for line in info.value.problems)


def test_missing_keys_take_their_defaults(tmp_path: Path):
    # keys have defaults (sections do not): a section may be written as an empty mapping
    p = base_params()
    p["run"] = {}
    p["model"] = {"depth": 2}
    params = load_params(write_yaml(tmp_path / "p.yaml", p))
    assert (params.run.name, params.run.seed, params.run.device) == ("tiny", 1337, "auto")
    assert (params.model.head_dim, params.model.sequence_len, params.model.window_pattern) == (128, 512, "L")


# --------------------------------------------------------------------------- 3. all problems at once

def test_every_problem_is_reported_at_once(tmp_path: Path):
    p = base_params()
    p["run"]["seed"] = -1
    p["model"]["depth"] = 0
    p["chat_rl"]["task"] = "chess"
    path = write_yaml(tmp_path / "p.yaml", p)

    problems = problems_of(path)
    assert len(problems) == 3, problems
    assert {key_of(line) for line in problems} == {"run.seed", "model.depth", "chat_rl.task"}

    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"{path}: 3 problems"


def test_cross_section_problem_reported_alongside_others(tmp_path: Path):
    p = base_params()
    p["base_train"]["seq_len"] = 1024          # > model.sequence_len 512
    p["chat_rl"]["samples_per_prompt"] = 1     # unrelated section
    problems = problems_of(write_yaml(tmp_path / "p.yaml", p))
    assert {key_of(line) for line in problems} == {"base_train.seq_len", "chat_rl.samples_per_prompt"}


# --------------------------------------------------------------------------- 4. extends

def test_extends_deep_merges_overlay(tmp_path: Path):
    write_yaml(tmp_path / "base.yaml", base_params())
    (tmp_path / "presets").mkdir()
    overlay = tmp_path / "presets" / "small.yaml"
    overlay.write_text(
        "extends: ../base.yaml\n"          # relative to the overlay, not the cwd
        "model:\n  depth: 12\n"
        "mid_train:\n  tasks: {calculator: 7}\n"
        "evaluate:\n  stages: [base]\n",
        encoding="utf-8",
    )
    params = load_params(overlay)

    assert params.model.depth == 12
    # siblings of the overridden key keep the base values (deep merge, not replace)
    assert (params.model.head_dim, params.model.sequence_len, params.model.window_pattern) == (64, 512, "L")
    assert params.model.width == 768 and params.model.n_head == 12
    # two levels deep: only calculator changes
    assert params.mid_train.tasks == {"calculator": 7, "tictactoe": 500, "brackets": 1000, "spelling": 500}
    # lists are replaced, not merged
    assert params.evaluate.stages == ["base"]
    # untouched sections come from the base
    assert (params.run.name, params.run.seed) == ("tiny", 1337)
    assert params.base_train.total_batch_size == 4096

    result = run_cli("validate", str(overlay))
    assert result.returncode == 0 and "model depth 12, width 768, 12 heads" in result.stdout


def test_extends_errors_in_overlay_name_the_key(tmp_path: Path):
    write_yaml(tmp_path / "base.yaml", base_params())
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("extends: base.yaml\nmodel:\n  depht: 12\n", encoding="utf-8")
    assert "model.depht: unknown key; did you mean 'depth'?" in problems_of(overlay)


@pytest.mark.parametrize("files", [
    {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\nrun: {seed: 1}\n"},
    {"a.yaml": "extends: a.yaml\n"},
    {"a.yaml": "extends: sub/b.yaml\n", "sub/b.yaml": "extends: ../a.yaml\n"},
], ids=["two-file-cycle", "self-cycle", "cycle-through-folder"])
def test_extends_cycle_is_a_params_error(tmp_path: Path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    try:
        problems = problems_of(tmp_path / "a.yaml")
    except RecursionError:  # pragma: no cover - the failure this test guards against
        pytest.fail("extends cycle recursed instead of raising ParamsError")
    assert any("loops" in line for line in problems), problems

    result = run_cli("validate", str(tmp_path / "a.yaml"))
    assert result.returncode == 2 and "loops" in result.stderr


# --------------------------------------------------------------------------- 5. derived geometry

# Oracle: width = 64*depth rounded up to a multiple of 128; n_head = width // head_dim.
@pytest.mark.parametrize("depth,width", [(1, 128), (3, 256), (4, 256), (12, 768), (20, 1280), (26, 1664)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_model_geometry(tmp_path: Path, depth: int, width: int, head_dim: int):
    p = base_params()
    p["model"].update(depth=depth, head_dim=head_dim, aspect_ratio=64, n_embd=None, n_kv_head=None)
    m = load_params(write_yaml(tmp_path / "p.yaml", p)).model
    assert m.width == width
    assert m.n_head == width // head_dim


def test_n_embd_overrides_derived_width():
    m = ModelConfig(depth=4, head_dim=64, n_embd=384)
    assert (m.width, m.n_head) == (384, 6)


# --------------------------------------------------------------------------- 6. project rule

def _numeric(annotation) -> bool:
    """int or float, possibly Optional; bool is not a number here."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_numeric(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation in (int, float)


def test_sections_are_the_documented_ones():
    assert tuple(Params.model_fields) == SECTIONS


def test_every_field_has_a_docstring_and_every_number_a_bound():
    bounds = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)
    missing_doc, missing_bound = [], []
    for section, section_field in Params.model_fields.items():
        model = section_field.annotation
        assert model.model_fields, f"{section} has no fields"
        for name, info in model.model_fields.items():
            if not (info.description or "").strip():
                missing_doc.append(f"{section}.{name}")
            if _numeric(info.annotation) and not any(isinstance(m, bounds) for m in info.metadata):
                missing_bound.append(f"{section}.{name}")
    assert not missing_doc, f"fields without a docstring: {missing_doc}"
    assert not missing_bound, f"numeric fields without a bound: {missing_bound}"


def test_params_error_is_a_value_error():
    err = ParamsError(["a.b: must be >= 1 (got 0)", "c: missing required section"], "x.yaml")
    assert isinstance(err, ValueError)
    assert err.problems == ["a.b: must be >= 1 (got 0)", "c: missing required section"]
    assert str(err).startswith("x.yaml: 2 problems in params")
