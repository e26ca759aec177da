"""Post-training stages resume exactly after a kill, like base_train.

Oracle: the same stage run straight through in a copy of the project. An interrupted run
resumed from its last checkpoint must log the same losses/rewards for the remaining steps
and end on bit-identical weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rdn.config import validate_params
from rdn.data.conversations import ConversationRows
from rdn.train import posttrain
from rdn.train import rl as rl_mod
from rdn.train.pretrain import run_base_train
from rdn.checkpoint import latest_checkpoint
from rdn.train.posttrain import run_chat_sft, run_mid_train
from rdn.train.rl import run_chat_rl
from tests.test_train import RecordingRun, tiny_params

TASKS = {"calculator": 20, "tictactoe": 5, "brackets": 10, "spelling": 5}


def post_params():
    p = tiny_params(num_iterations=2, eval_every=2, save_every=2).model_dump(mode="json")
    for stage in ("mid_train", "chat_sft"):
        p[stage].update(num_iterations=4, eval_every=4, eval_tokens=256, save_every=2, keep_last=10, tasks=TASKS,
                        prefetch=1, loader_buffer_docs=32)
    p["chat_rl"].update(num_steps=4, prompts_per_step=2, samples_per_prompt=3, device_batch_size=4,
                        max_new_tokens=8, eval_examples=2, eval_every=2, save_every=2)
    return validate_params(p)


@pytest.fixture(scope="module")
def trained(tiny_artifacts, tmp_path_factory) -> Path:
    """A project with base, mid and SFT checkpoints of a tiny model."""
    data_dir, tok_dir = tiny_artifacts
    root = tmp_path_factory.mktemp("post")
    shutil.copytree(data_dir, root / "artifacts/data")
    shutil.copytree(tok_dir, root / "artifacts/tokenizer")
    params = post_params()
    run_base_train(params, root, RecordingRun())
    run_mid_train(params, root, RecordingRun())
    run_chat_sft(params, root, RecordingRun())
    return root


def _copy(root: Path, dest: Path, keep: tuple[str, ...]) -> Path:
    shutil.copytree(root / "artifacts/data", dest / "artifacts/data")
    shutil.copytree(root / "artifacts/tokenizer", dest / "artifacts/tokenizer")
    for name in keep:
        shutil.copytree(root / "artifacts/checkpoints" / name, dest / "artifacts/checkpoints" / name)
    return dest


def _weights(root: Path, stage_dir: str) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(root / "artifacts/checkpoints" / stage_dir)
    return load_file(str(ckpt.path / "model.safetensors"))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, runner, source, out", [
    ("mid_train", run_mid_train, "base", "mid"),
    ("chat_sft", run_chat_sft, "mid", "sft"),
])
def test_post_training_resumes_exactly(trained, tmp_path_factory, monkeypatch, stage, runner, source, out):
    params = post_params()
    straight_root = _copy(trained, tmp_path_factory.mktemp("straight"), (source,))
    straight = RecordingRun()
    runner(params, straight_root, straight)

    root = _copy(trained, tmp_path_factory.mktemp("killed"), (source,))
    real = posttrain.DeviceBatches
    served = {"n": 0}

    class Dying(real):  # dies while producing step 3's batches, after the step-2 checkpoint
        def __init__(self, source, *args, **kwargs):
            super().__init__(source, *args, **kwargs)
            self.counts = not (isinstance(source, ConversationRows) and not source.loop)  # not SFT's val batches

        def __next__(self):
            if not self.counts:
                return super().__next__()
            if served["n"] == 2 * 2 + 1:  # 2 steps x 2 micro-batches, then one more
                raise KeyboardInterrupt("simulated kill")
            served["n"] += 1
            return super().__next__()

    monkeypatch.setattr(posttrain, "DeviceBatches", Dying)
    with pytest.raises(KeyboardInterrupt):
        runner(params, root, RecordingRun())
    assert latest_checkpoint(root / "artifacts/checkpoints" / out).step == 2
    monkeypatch.setattr(posttrain, "DeviceBatches", real)

    resumed = RecordingRun()
    runner(params, root, resumed)
    assert sorted(resumed.history["train/loss"]) == [3, 4]  # it did not redo steps 1-2
    for step in (3, 4):
        assert resumed.history["train/loss"][step] == straight.history["train/loss"][step], stage
    assert _same_weights(_weights(straight_root, out), _weights(root, out))


def test_chat_rl_resumes_exactly(trained, tmp_path_factory, monkeypatch):
    params = post_params()
    straight_root = _copy(trained, tmp_path_factory.mktemp("rl_straight"), ("sft",))
    straight = RecordingRun()
    summary = run_chat_rl(params, straight_root, straight)
    assert summary["steps"] == 4 and set(straight.history["rl/reward_mean"]) == {1, 2, 3, 4}
    csv_rows = (straight_root / "metrics/chat_rl_history.csv").read_text()
    (straight_root / "metrics/chat_rl_history.csv").unlink()  # as DVC does before it reruns a stage
    again = RecordingRun()  # a finished run resumed: nothing to redo, nothing appended, outputs rewritten
    assert run_chat_rl(params, straight_root, again)["final_eval_accuracy"] == summary["final_eval_accuracy"]
    assert again.history == {} and (straight_root / "metrics/chat_rl_history.csv").read_text() == csv_rows

    root = _copy(trained, tmp_path_factory.mktemp("rl_killed"), ("sft",))
    real = rl_mod.group_advantages
    calls = {"n": 0}

    def dying(rewards, normalize):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3, after the step-2 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real(rewards, normalize)

    monkeypatch.setattr(rl_mod, "group_advantages", dying)
    with pytest.raises(KeyboardInterrupt):
        run_chat_rl(params, root, RecordingRun())
    assert latest_checkpoint(root / "artifacts/checkpoints/rl").step == 2
    monkeypatch.setattr(rl_mod, "group_advantages", real)

    resumed = RecordingRun()
    run_chat_rl(params, root, resumed)
    assert set(resumed.history["rl/reward_mean"]) == {3, 4}
    for key in ("rl/reward_mean", "rl/seq_len"):
        for step in (3, 4):
            assert resumed.history[key][step] == straight.history[key][step], key
    assert _same_weights(_weights(straight_root, "rl"), _weights(root, "rl"))
