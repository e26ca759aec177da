"""The model variants (MoE, mHC, MTP, ternary) across the whole stack: off is the plain model
bitwise; on, each decodes with its KV cache exactly as full recomputation does, survives a
checkpoint round trip, resumes exactly after a kill, and (all four together) runs base, mid,
SFT, RL, evaluate and chat.

Oracles: a fingerprint of the model as it was before the variants existed (state-dict
sha256 and loss at a fixed seed), full recomputation for cached decoding, a straight run for
resume. The variants' own oracles live in test_moe, test_mhc, test_mtp and test_ternary."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rdn.checkpoint import latest_checkpoint, model_from_checkpoint, save_checkpoint
from rdn.config import ParamsError, validate_params
from rdn.coords import CoordinateCalculator
from rdn.inference.engine import Engine, greedy_reference
from rdn.model import GPT, GPTConfig
from rdn.model.mhc import MHCConfig
from rdn.model.moe import MoEConfig
from rdn.model.mtp import MTPConfig
from rdn.model.ternary import TernaryConfig
from rdn.tokenizer import Tokenizer
from rdn.train.pretrain import run_base_train
from tests.test_train import RecordingRun, kill_base_loader, tiny_params

# params-file form of each variant (tiny sizes), and the same as GPTConfig fields
VARIANT_PARAMS = {
    "moe": {"moe": {"enabled": True, "num_experts": 4, "num_shared": 1, "top_k": 2, "expert_hidden": 64,
                    "first_dense_layers": 1}},
    "mhc": {"mhc": {"streams": 3}},
    "mtp": {"mtp": {"num_future": 2}},
    "ternary": {"ternary": {"enabled": True}},
}
VARIANT_PARAMS["all"] = {k: v for d in VARIANT_PARAMS.values() for k, v in d.items()}
KINDS = {"moe": MoEConfig, "mhc": MHCConfig, "mtp": MTPConfig, "ternary": TernaryConfig}


def variant_config(name: str, **base) -> GPTConfig:
    fields = {k: KINDS[k](**v) for k, v in VARIANT_PARAMS[name].items()}
    return GPTConfig(**base, **fields)


# --------------------------------------------------------------------------- off == the plain model

# The model before the variants existed (commit 88ca94c), torch.manual_seed(0) then GPT(config)
# with the config below: sha256 over (name, float32 bytes) of the sorted state dict, and the
# loss on a fixed batch (one torch thread; allclose, since float sums may differ across CPUs).
PLAIN_FINGERPRINT = {
    True: ("8bb962d7ea1b88d4331f1173f20bff6a005825b5eb7b4c5720a1529ae6906cef", 5.703450679779053),
    False: ("e4587e67d0b9013e94b919ef94012b0b3a06fe61a652d1523665070a873f9d68", 5.703450679779053),
}


@pytest.mark.parametrize("use_coordinates", [True, False], ids=["rdn", "gpt"])
def test_every_variant_off_is_bitwise_the_plain_model(use_coordinates):
    off = {k: KINDS[k]() for k in KINDS}
    cfg = GPTConfig(sequence_len=32, vocab_size=300, n_layer=3, n_head=2, n_embd=64, head_dim=32, n_coord_dim=3,
                    use_coordinates=use_coordinates, window_pattern="SL", **off)
    torch.manual_seed(0)
    model = GPT(cfg)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (2, 32), generator=g)
    coords = torch.randint(0, 32, (2, 32, 3), generator=g)
    sha, loss = PLAIN_FINGERPRINT[use_coordinates]
    assert h.hexdigest() == sha
    with torch.no_grad():
        got = model(idx, idx, coords=coords if use_coordinates else None)
    assert abs(got.item() - loss) < 1e-5
    assert model.hyper is None and model.mtp is None and not model.moe_layers()
    assert model.variant_metrics() == {}


def test_params_sections_reach_the_model_and_bad_keys_are_named():
    p = tiny_params().model_dump(mode="json")
    for section in VARIANT_PARAMS["all"].values():
        assert section  # not vacuous
    p["model"].update(VARIANT_PARAMS["all"])
    params = validate_params(p)
    cfg = GPTConfig.from_params(params.model, vocab_size=512, n_coord_dim=4, bos_token_id=3)
    assert cfg.moe.enabled and cfg.moe.num_experts == 4 and cfg.mhc.streams == 3
    assert cfg.mtp.num_future == 2 and cfg.ternary.enabled and cfg.bos_token_id == 3
    # a checkpoint's meta.json holds dataclasses.asdict(config): it rebuilds the same config
    assert GPTConfig(**dataclasses.asdict(cfg)) == cfg

    bad = tiny_params().model_dump(mode="json")
    bad["model"]["moe"] = {"enabled": True, "num_experts": 2, "top_k": 3}
    bad["model"]["mhc"] = {"streams": 0}
    bad["model"]["mtp"] = {"num_future": 3, "weights": [1.0]}
    bad["model"]["ternary"] = {"enabled": True, "bits": 4}
    with pytest.raises(ParamsError) as e:
        validate_params(bad)
    text = "\n".join(e.value.problems)
    for key in ("model.moe.top_k", "model.mhc.streams", "model.mtp.weights", "model.ternary.bits"):
        assert key in text, text


# --------------------------------------------------------------------------- decoding with the KV cache

N_DIM = 4


@pytest.fixture(scope="module")
def tok(tiny_artifacts) -> Tokenizer:
    return Tokenizer.load(tiny_artifacts[1])


@torch.no_grad()
def random_variant_gpt(tok: Tokenizer, name: str, seed: int = 0) -> GPT:
    """Every parameter random (zero-initialised paths would hide cache bugs)."""
    torch.manual_seed(seed)
    model = GPT(variant_config(name, sequence_len=32, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2,
                               n_embd=64, head_dim=16, window_pattern="SL", short_window=8, n_coord_dim=N_DIM,
                               bos_token_id=tok.bos_id))
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "lambdas" in pname:
            p.copy_(0.8 + 0.2 * r if pname.startswith("resid") else 0.2 * r)
        elif pname.startswith("lm_head"):
            p.copy_(2 * r / p.size(1) ** 0.5)
        elif p.dim() >= 2 and "embed" not in pname and "wte" not in pname:
            p.copy_(r / p.size(-1) ** 0.5)
        else:
            p.copy_(0.5 * r)
    for special in ("<|bos|>", "<|assistant_end|>", "<|python_start|>"):
        model.lm_head.weight[tok.special_id(special)] = 0
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANT_PARAMS))
def test_cached_decoding_equals_full_recomputation(tok, name):
    calc = CoordinateCalculator.from_tokenizer(tok, n_dim=N_DIM)
    model = random_variant_gpt(tok, name)
    prompts = [tok.encode(t, prepend="<|bos|>") for t in ("def f(x):", "return [g(a), {b: (c", "x = 1")]
    out = Engine(model, tok, calc).generate(prompts, num_samples=1, max_new_tokens=12, temperature=0.0)
    for prompt, gens in zip(prompts, out):
        assert gens[0].tokens == greedy_reference(model, prompt, 12, calc)


@pytest.mark.parametrize("name", list(VARIANT_PARAMS))
def test_checkpoint_round_trip_rebuilds_the_same_model(tok, name, tmp_path):
    model = random_variant_gpt(tok, name)
    for moe in model.moe_layers():  # a routing bias that is not the initial zeros
        moe.expert_bias.copy_(torch.linspace(-0.5, 0.5, moe.expert_bias.numel()))
    meta = {"model_config": dataclasses.asdict(model.config), "tokenizer_sha256": tok.hash,
            "coords": {"n_dim": N_DIM, "bracket_pairs": ["()", "[]", "{}", "<>"]}}
    save_checkpoint(tmp_path, 1, model, None, {}, None, meta)
    loaded, cfg = model_from_checkpoint(latest_checkpoint(tmp_path), torch.device("cpu"))
    assert cfg == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.tensor([tok.encode("x = [1, (2)]", prepend="<|bos|>")])
    calc = CoordinateCalculator.from_tokenizer(tok, n_dim=N_DIM)
    with torch.no_grad():
        assert torch.equal(model(idx, coords=calc(idx)), loaded.eval()(idx, coords=calc(idx)))


# --------------------------------------------------------------------------- training: metrics and exact resume

@pytest.fixture
def root(tmp_path, tiny_artifacts):
    data_dir, tok_dir = tiny_artifacts
    shutil.copytree(data_dir, tmp_path / "artifacts/data")
    shutil.copytree(tok_dir, tmp_path / "artifacts/tokenizer")
    return tmp_path


def variant_params(name: str, **train):
    p = tiny_params(**{"num_iterations": 4, "eval_every": 4, "save_every": 2, "sample_every": 100, **train})
    p = p.model_dump(mode="json")
    p["model"].update(VARIANT_PARAMS[name])
    return validate_params(p)


def _weights(root: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(root / f"artifacts/checkpoints/base/step_{step:06d}/model.safetensors"))


@pytest.mark.parametrize("name", list(VARIANT_PARAMS))
def test_variant_trains_logs_its_metrics_and_resumes_exactly(root, tmp_path_factory, monkeypatch, name):
    params = variant_params(name)
    straight_root = tmp_path_factory.mktemp("straight")
    shutil.copytree(root / "artifacts", straight_root / "artifacts")
    straight = RecordingRun()
    run_base_train(params, straight_root, straight)
    logged = set(straight.history)
    if "moe" in VARIANT_PARAMS[name]:
        assert {"moe/load_cv", "moe/max_load"} <= logged
        counts = straight.params["model"]
        assert counts["params_active"] < counts["params_total"]
    if "mtp" in VARIANT_PARAMS[name]:
        assert {"train/mtp_loss_1", "train/mtp_loss_2"} <= logged

    restore = kill_base_loader(monkeypatch, 2 * 2 + 1)  # dies while producing step 3's batches (after checkpoint 2)
    with pytest.raises(KeyboardInterrupt):
        run_base_train(params, root, RecordingRun())
    restore()
    assert latest_checkpoint(root / "artifacts/checkpoints/base").step == 2
    resumed = RecordingRun()
    run_base_train(params, root, resumed)
    for key in sorted(k for k in straight.history if k.startswith(("train/loss", "train/mtp", "moe/"))):
        for step in (3, 4):
            assert resumed.history[key][step] == straight.history[key][step], (key, step)
    a, b = _weights(straight_root, 4), _weights(root, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- every stage, all four at once

def test_all_variants_run_every_stage_evaluate_and_chat(tiny_artifacts, tmp_path_factory, capsys):
    """MoE + mHC + MTP + ternary in one model through base, mid, SFT, RL, evaluate and
    `rdn chat` (the smoke preset runs the same through `dvc repro`)."""
    from rdn.cli.chat import chat_main
    from rdn.eval.evaluate import run_evaluate
    from rdn.train.posttrain import run_chat_sft, run_mid_train
    from rdn.train.rl import run_chat_rl
    from tests.test_posttrain import post_params

    root = tmp_path_factory.mktemp("variants_chain")
    shutil.copytree(tiny_artifacts[0], root / "artifacts/data")
    shutil.copytree(tiny_artifacts[1], root / "artifacts/tokenizer")
    p = post_params().model_dump(mode="json")
    p["model"].update(VARIANT_PARAMS["all"])
    p["evaluate"].update(num_examples=4, rl_task_examples=4, bpb_tokens=512, max_new_tokens=8, batch_size=4)
    params = validate_params(p)
    runs = {}
    for stage, runner in (("base", run_base_train), ("mid", run_mid_train), ("sft", run_chat_sft),
                          ("rl", run_chat_rl)):
        runs[stage] = RecordingRun()
        summary = runner(params, root, runs[stage])
        assert summary["steps"] > 0
    for stage in ("base", "mid", "sft"):
        assert "train/mtp_loss_2" in runs[stage].history and "moe/load_cv" in runs[stage].history
    assert "moe/load_cv" in runs["rl"].history   # RL keeps balancing the experts
    meta = latest_checkpoint(root / "artifacts/checkpoints/rl").meta["model_config"]
    assert meta["moe"]["enabled"] and meta["mhc"]["streams"] == 3 and meta["mtp"]["num_future"] == 2
    assert meta["ternary"]["enabled"]
    results = run_evaluate(params, root, RecordingRun())
    assert all(0 <= results[s]["calculator_accuracy"] <= 1 for s in ("mid", "sft", "rl"))
    assert results["base"]["val_bpb"] > 0
    rc = chat_main(root / "artifacts/checkpoints/rl", root / "artifacts/tokenizer", "what is 2+3?",
                   temperature=0.0, top_k=None, max_new_tokens=8, device="cpu")
    assert rc == 0 and capsys.readouterr().out.strip()


# --------------------------------------------------------------------------- the size presets

@pytest.mark.parametrize("preset, millions", [("nano_125m", 125), ("small_560m", 560), ("medium_3b_moe", 3000)])
def test_size_presets_have_the_parameters_their_names_say(preset, millions, capsys):
    """Counted on the meta device by `rdn validate --counts` (no memory, no GPU): total
    parameters within 5 % of the name; the MoE preset activates fewer per token."""
    from rdn.cli.main import main
    from tests.conftest import REPO

    assert main(["validate", "--counts", str(REPO / "configs" / f"{preset}.yaml")]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    total, active = int(lines["total"].replace(",", "")), int(lines["active"].replace(",", ""))
    assert abs(total / 1e6 - millions) <= 0.05 * millions, total
    assert (active < total / 2) if "moe" in preset else active == total
    assert float(lines["FLOPs/token"]) > 6 * active * 0.5


@pytest.mark.parametrize("use_coordinates", [True, False], ids=["rdn", "gpt"])
def test_mhc_gpt_backward_passes_anomaly_detection(use_coordinates):
    """The seed's mHC crashed in GPT mode (a tensor saved for backward modified in place);
    the whole model with 4 streams backpropagates under anomaly detection in both modes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, head_dim=16,
                          n_coord_dim=2, use_coordinates=use_coordinates, mhc=MHCConfig(streams=4)))
    idx = torch.randint(0, 64, (2, 16))
    coords = torch.randint(0, 16, (2, 16, 2)) if use_coordinates else None
    with torch.autograd.set_detect_anomaly(True):
        model(idx, torch.roll(idx, -1, 1), coords=coords).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.hyper.parameters())
