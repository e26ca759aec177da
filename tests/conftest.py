"""Shared test setup: keep every tool's state inside temp dirs, quiet and offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rdn.io import copy_checkout

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
