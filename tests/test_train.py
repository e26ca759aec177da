"""The shared training loop on CPU: learning, exact resume, NaN stop, checkpoint safety."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rdn.config import TrackingConfig, validate_params
from rdn.tracking.run import StageRun
from rdn.train import pretrain as base_mod
from rdn.train.pretrain import run_base_train
from rdn.checkpoint import CheckpointError, check_compatible, latest_checkpoint, list_checkpoints
from rdn.train.trainer import TrainingDiverged
from tests.conftest import REPO


class RecordingRun(StageRun):
    """A tracking-disabled run that remembers every metric (the test's window on the loop)."""

    def __init__(self):
        super().__init__("test", TrackingConfig(enabled=False))
        self.history: dict[str, dict[int, float]] = {}
        self.params: dict = {}

    def log_metrics(self, metrics, step=0, flush=False):
        for k, v in metrics.items():
            self.history.setdefault(k, {})[step] = float(v)

    def log_params(self, params):
        self.params.update(params)


def tiny_params(use_coordinates: bool = True, **train):
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"].update(depth=2, head_dim=64, sequence_len=64, use_coordinates=use_coordinates)
    p["coords"]["n_dim"] = 4
    for later in ("mid_train", "chat_sft"):
        p[later].update(seq_len=64, device_batch_size=2, total_batch_size=256)
    p["base_train"].update(dict(device_batch_size=2, seq_len=64, total_batch_size=256, num_iterations=6,
                                eval_every=3, eval_tokens=512, save_every=2, keep_last=10, sample_every=4,
                                prefetch=1, loader_buffer_docs=32), **train)
    p["run"]["device"] = "cpu"
    return validate_params(p)


@pytest.fixture
def root(tmp_path, tiny_artifacts):
    data_dir, tok_dir = tiny_artifacts
    (tmp_path / "artifacts").mkdir()
    shutil.copytree(data_dir, tmp_path / "artifacts/data")
    shutil.copytree(tok_dir, tmp_path / "artifacts/tokenizer")
    return tmp_path


def _weights(root: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / f"artifacts/checkpoints/base/step_{step:06d}/model.safetensors"))


def kill_base_loader(monkeypatch, after_batches: int):
    """Make base_train's training stream raise KeyboardInterrupt (a simulated kill) when asked
    for batch ``after_batches + 1``; validation streams are left alone. Returns a function that
    puts the real loader back."""
    real = base_mod.get_dataloader

    def dying_loader(*args, **kwargs):
        inner = real(*args, **kwargs)
        if kwargs.get("loop", True) is False:
            return inner

        class Dying:
            served = 0

            def __next__(self):
                if Dying.served == after_batches:
                    raise KeyboardInterrupt("simulated kill")
                Dying.served += 1
                return next(inner)

            def close(self):
                inner.close()
        return Dying()

    monkeypatch.setattr(base_mod, "get_dataloader", dying_loader)
    return lambda: monkeypatch.setattr(base_mod, "get_dataloader", real)


@pytest.mark.parametrize("use_coordinates", [True, False], ids=["rdn", "gpt"])
def test_trains_and_val_bpb_falls(root, use_coordinates):
    run = RecordingRun()
    summary = run_base_train(tiny_params(use_coordinates, num_iterations=12, eval_every=12, matrix_lr=0.04),
                             root, run)
    bpb = run.history["val/bpb"]
    assert bpb[12] < bpb[0] - 0.3, bpb  # visibly learning within a dozen steps
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 256
    assert math.isfinite(summary["final_val_bpb"]) and summary["min_val_bpb"] <= summary["final_val_bpb"]
    # the optimizer-state size it reports is what the checkpoint's optimizer file holds
    final = latest_checkpoint(root / "artifacts/checkpoints/base")
    saved = torch.load(final.path / "optim_rank0.pt", weights_only=False)["state"]
    held = sum(t.numel() * t.element_size() for st in saved.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)
    assert summary["optimizer_state_mib"] == pytest.approx(held / 2**20, abs=2e-3)
    assert [c.step for c in list_checkpoints(root / "artifacts/checkpoints/base")] == [2, 4, 6, 8, 10, 12]


def test_resume_continues_exactly(root, tmp_path_factory, monkeypatch, caplog):
    """Killed after checkpoint 4 and resumed: steps 5-6 and the final weights equal a straight
    run's bitwise. Both runs start on a "CPU without native bf16" (the probe patched to say
    no), so optim.orthogonalization_dtype auto picks float32; the resumed process sees a
    CPU *with* it (auto would pick bf16) and must keep the checkpoint's float32, or its
    steps would differ from the straight run's."""
    monkeypatch.setattr("rdn.device.cpu_bf16_matmul_native", lambda: False)
    params = tiny_params()
    assert params.optim.orthogonalization_dtype == "auto"
    straight_root = tmp_path_factory.mktemp("straight")
    shutil.copytree(root / "artifacts", straight_root / "artifacts")
    straight = RecordingRun()
    run_base_train(params, straight_root, straight)
    assert straight.params["hardware"]["orthogonalization_dtype"] == "float32"
    assert straight.params["hardware"]["bf16_matmul_native"] == "False"

    # interrupted run: the loader dies while producing step 5's batches (after checkpoint 4)
    restore = kill_base_loader(monkeypatch, 4 * 2 + 1)  # 4 steps x 2 micro-batches, then one more
    with pytest.raises(KeyboardInterrupt):
        run_base_train(params, root, RecordingRun())
    assert latest_checkpoint(root / "artifacts/checkpoints/base").step == 4
    restore()

    # the earlier process's peak memory (here set far above anything real) is part of the run's
    trainer = root / "artifacts/checkpoints/base/step_000004/trainer.pt"
    state = torch.load(trainer, weights_only=True)
    assert state["peak_memory_mib"] > 0
    torch.save({**state, "peak_memory_mib": 1e7}, trainer)
    assert latest_checkpoint(root / "artifacts/checkpoints/base").meta["orthogonalization_dtype"] == "float32"
    monkeypatch.setattr("rdn.device.cpu_bf16_matmul_native", lambda: True)  # "another machine"
    resumed = RecordingRun()
    with caplog.at_level("INFO", logger="rdn.train.trainer"):
        summary = run_base_train(params, root, resumed)
    assert "resuming with the checkpoint's Muon orthogonalization dtype float32" in caplog.text
    assert "would pick bfloat16" in caplog.text
    assert resumed.params["hardware"]["orthogonalization_dtype"] == "float32"
    assert latest_checkpoint(root / "artifacts/checkpoints/base").meta["orthogonalization_dtype"] == "float32"
    assert summary["peak_memory_mib"] == 1e7
    for step in (5, 6):
        assert resumed.history["train/loss"][step] == straight.history["train/loss"][step]
    assert resumed.history["val/bpb"][6] == straight.history["val/bpb"][6]
    a, b = _weights(straight_root, 6), _weights(root, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(root, monkeypatch):
    params = tiny_params(save_every=1)
    from rdn.model import GPT

    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 2:  # steps 1-2 fine, step 3 diverges
                return out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 2.*step_000002"):
        run_base_train(params, root, RecordingRun())
    assert [c.step for c in list_checkpoints(root / "artifacts/checkpoints/base")] == [1, 2]


def test_half_written_checkpoints_are_never_resumed(root):
    run_base_train(tiny_params(num_iterations=2, save_every=1), root, RecordingRun())
    ckpts = root / "artifacts/checkpoints/base"
    # a kill mid-write leaves a hidden temp folder; a folder missing its meta is incomplete too
    (ckpts / ".step_000009.abcd.tmp").mkdir()
    (ckpts / ".step_000009.abcd.tmp" / "model.safetensors").write_bytes(b"partial")
    (ckpts / "step_000010").mkdir()
    (ckpts / "step_000010" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(ckpts).step == 2


def test_mismatched_checkpoint_is_refused_naming_the_field(root):
    run_base_train(tiny_params(num_iterations=2), root, RecordingRun())
    ckpt = latest_checkpoint(root / "artifacts/checkpoints/base")
    with pytest.raises(CheckpointError, match=r"model_config: checkpoint has .* this run has"):
        check_compatible(ckpt, {"model_config": {"n_layer": 3}})
    with pytest.raises(CheckpointError, match=r"tokenizer_sha256"):
        check_compatible(ckpt, {"tokenizer_sha256": "0" * 64})
    # the loop itself: a changed LR means another run -> start fresh, do not resume
    run = RecordingRun()
    run_base_train(tiny_params(num_iterations=2, matrix_lr=0.03), root, run)
    assert 0 in run.history["val/bpb"]  # evaluated from step 0 again: it started fresh
    # same params again: resumes the finished run instead of training, validating or saving again
    final = latest_checkpoint(root / "artifacts/checkpoints/base")
    before = {f.name: f.stat().st_mtime_ns for f in final.path.iterdir()}
    first_summary = run_base_train(tiny_params(num_iterations=2, matrix_lr=0.03), root, RecordingRun())
    again = RecordingRun()
    summary = run_base_train(tiny_params(num_iterations=2, matrix_lr=0.03), root, again)
    assert "val/bpb" not in again.history and "train/loss" not in again.history
    assert {f.name: f.stat().st_mtime_ns for f in final.path.iterdir()} == before  # not rewritten
    assert summary["final_val_bpb"] == first_summary["final_val_bpb"] == run.history["val/bpb"][2]
    assert summary["checkpoint"] == first_summary["checkpoint"] and summary["checkpoint"].endswith(final.path.name)
    rows = [(h["step"], "val_bpb" in h) for h in latest_checkpoint(root / "artifacts/checkpoints/base").history()]
    assert len(rows) == len(set(rows))  # no duplicate final row


def test_changed_training_code_starts_fresh(root, monkeypatch):
    run_base_train(tiny_params(num_iterations=2), root, RecordingRun())
    monkeypatch.setattr(base_mod, "code_sha256", lambda: "edited-model-code")
    run = RecordingRun()
    run_base_train(tiny_params(num_iterations=2), root, run)
    assert 0 in run.history["val/bpb"] and 1 in run.history["train/loss"]
