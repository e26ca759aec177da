"""Shared test setup: keep every tool's state inside temp dirs, quiet and offline."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable
from pathlib import Path

import pytest
import torch

from rdn.io import copy_checkout

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread for torch, here and in every subprocess (stages under DVC, the
# Prefect worker's flow runs, torchrun workers), whatever OMP_NUM_THREADS the suite is
# started with (RDN_TEST_THREADS changes it, to look for thread-dependent results):
# * the numbers are then the same on any machine: a matmul or sum splits its reduction by
#   thread and adds the partial results in another order with another thread count, and
#   the bitwise comparisons (tests/test_dist.py: 2 ranks vs 1 process; resumed vs straight
#   runs) need equal counts on both sides;
# * on a 2-core machine, 2 OpenMP threads next to the loader's prefetch thread (or another
#   process) stall at every barrier: tests/test_train.py took 137 s with 2 threads and
#   13 s with 1 on a loaded 2-core machine.
TEST_THREADS = int(os.environ.get("RDN_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(TEST_THREADS)


def copy_project(dst: Path, skip: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Path:
    """This checkout's tracked (and unignored) files copied to ``dst`` (see rdn.io.copy_checkout)."""
    return copy_checkout(REPO, dst, skip, keep)


@pytest.fixture
def repo() -> Path:
    """The project checkout under test."""
    return REPO


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project root: stages resolve paths and the default MLflow sqlite file here."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("RDN_PROJECT_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RDN_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(root)
    return root


def run_python(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    """Run ``python args...`` with the test interpreter; returns CompletedProcess (text)."""
    import subprocess

    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> tuple[Path, Path]:
    """A small real corpus (stdlib code, many small row groups) and a 1024-id tokenizer
    trained on it, built once per test session: (data_dir, tokenizer_dir)."""
    from rdn.config import DataConfig, TokenizerConfig
    from rdn.data import build_corpus, iter_documents
    from rdn.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    data_dir, tok_dir = root / "data", root / "tokenizer"
    build_corpus(DataConfig(source="stdlib", include_tests=False, max_total_bytes=1_500_000, val_fraction=0.2,
                            docs_per_shard=64, row_group_docs=16), data_dir, seed=0, root=root)
    train_tokenizer(TokenizerConfig(vocab_size=1024, max_chars=1_000_000), iter_documents(data_dir, "train"),
                    list(iter_documents(data_dir, "val"))[:10], tok_dir)
    return data_dir, tok_dir


@pytest.fixture(scope="session")
def chat_project(tiny_artifacts, tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    """A project folder with a tokenizer and ``rl``/``sft`` checkpoints of a tiny model that
    answers 16 calculator prompts correctly (tests/chat_fixture.py): (root, conversations)."""
    from tests.chat_fixture import build_chat_project

    with torch_threads(1):
        return build_chat_project(tmp_path_factory.mktemp("chat-project"), tiny_artifacts[1])


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads (restored after). Bitwise comparisons with
    a subprocess need the same count on both sides: a reduction (matmul, sum) splits its
    work by thread and adds the partial results in another order with another count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store to copy with :func:`store_at`: creating the
    schema takes seconds (an ``mlflow server`` on a new file does the same at each start)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    assert db.is_file()
    return db


def store_at(template: Path, db: Path, artifacts: Path | None = None) -> str:
    """A copy of the empty store ``template`` at ``db``; its Default experiment keeps its
    artifacts under ``artifacts`` (else next to ``db``), as a store created there would."""
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str((artifacts or db.parent / "mlruns") / "0"),))
    con.close()
    return f"sqlite:///{db}"


# --------------------------------------------------------------------------- head starts
# The suite runs one test at a time, mostly on one core (one torch thread, one Python
# process). A long, self-contained command that a test only reads the results of (a whole
# `dvc repro` of the pipeline) can run on the other core from the start of the session:
# the test module registers it with @head_start, the session starts it if a test of that
# module is selected, and the module's fixture waits for it (or starts it itself when it
# was not started, e.g. when the module's tests are picked by -k afterwards).

_HEAD_STARTS: dict[str, tuple[str, Callable]] = {}
_STARTED: dict[str, "Background"] = {}


class Background:
    """A command running in its own process group, its output in a log file."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.cmd, self.cwd, self.env, self.log = cmd, cwd, env, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 600) -> str:
        """Its output, after asserting that it exited 0 within ``timeout`` s of now."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        out = self.log.read_text(errors="replace")
        assert code == 0, f"{' '.join(map(str, self.cmd))} failed ({code}):\n{out[-4000:]}"
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def head_start(name: str, module: str):
    """Register ``fn(tmp_path_factory) -> Background`` as job ``name``, started as the session
    starts when a test of ``tests/<module>`` is selected."""
    def register(fn: Callable) -> Callable:
        _HEAD_STARTS[name] = (module, fn)
        return fn
    return register


def started(name: str, tmp_path_factory) -> Background:
    """The head-started job ``name`` (started now if the session did not start it)."""
    if name not in _STARTED:
        _STARTED[name] = _HEAD_STARTS[name][1](tmp_path_factory)
    return _STARTED[name]


@pytest.fixture(scope="session", autouse=True)
def _head_starts(request, tmp_path_factory):
    # Under pytest-xdist (the default, see pyproject.toml) every worker collects every module
    # but runs only the modules it is handed, which it learns only as it goes: a job is then
    # started by the first test that needs it (started()), on the worker that runs its module,
    # and the other worker's tests fill the second core instead.
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        selected = {item.path.name for item in request.session.items}
        for name, (module, _) in _HEAD_STARTS.items():
            if module in selected:
                started(name, tmp_path_factory)
    yield
    for job in _STARTED.values():  # by its process group id; normally long finished
        job.stop()


# --------------------------------------------------------------------------- scheduling
# The modules that run real pipelines (Prefect flows, DVC, MLflow servers, torchrun) take
# most of the suite's time. pytest-xdist hands whole modules to its workers in collection
# order, so these go first and the many short modules fill in around them: the longest
# module does not start last and leave one core idle at the end.
SLOW_FIRST = ("test_flow.py", "test_ablate.py", "test_mlflow.py", "test_dvc.py", "test_dist.py", "test_sweep.py", "test_compare.py",
              "test_tracking.py", "test_posttrain.py", "test_train.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: order within a module kept
