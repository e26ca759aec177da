"""Val bits-per-byte over closing-bracket targets and targets at bracket depth >= 2
(rdn.eval.bpb.evaluate_bpb_by_class).

Oracle: a per-token Python loop over the model's per-token losses, the token bytes, the
bracket deltas and a depth walk written out from the contract in rdn/coords.py (depth after
the token's own delta, floored at 0, reset at every BOS), on hand-built rows with nested and
multi-level brackets, an unmatched closer, a BOS mid-row, a row starting mid-document and
masked (-1) targets. Tolerance: rel 1e-6 -- the metric sums each batch's float32 losses in
float32 (as evaluate_bpb always has), the loop sums them exactly (math.fsum); byte counts are
integers and compared exactly."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from rdn.coords import CoordinateCalculator
from rdn.eval.bpb import bracket_depth, evaluate_bpb, evaluate_bpb_by_class, target_classes
from rdn.model import GPT, GPTConfig

BOS, VOCAB, N_DIM = 0, 32, 4
# 1-5 open one level, 6-10 close one, 11 opens two ("(("), 12 closes two ("))"),
# 13 closes and reopens (")(", net 0), 14 is text with a closer ("x)", net -1); the rest text.
DELTAS = torch.zeros(VOCAB, dtype=torch.long)
DELTAS[1:6], DELTAS[6:11], DELTAS[11], DELTAS[12], DELTAS[14] = 1, -1, 2, -2, -1
TOKEN_BYTES = torch.tensor([0] + [1 + i % 3 for i in range(1, VOCAB)], dtype=torch.int32)  # BOS: 0 bytes

ROWS = torch.tensor([
    # unmatched closer at depth 0, "((" then ")(" at depth 2, a closer to 1, "))" floored at 0, BOS mid-row at depth 4
    [BOS, 20, 6, 30, 21, 11, 22, 13, 23, 7, 12, 24, 2, 3, 11, 25, BOS, 26, 4, 27, 8, 14, 28, 5, 29],
    # starts mid-document (no BOS): depth counts from the row start, as the loader's coordinates do
    [11, 20, 1, 21, 6, 22, 12, 23, 9, 2, 2, 2, 24, 10, 10, BOS, 11, 11, 25, 12, 26, 14, 14, 14, 27],
    [BOS, 1, 2, 3, 4, 30, 31, 6, 7, 8, 9, BOS, 20, 21, 22, 23, 13, 13, 11, 24, 12, 25, 6, 26, BOS],
])
MASK = torch.ones_like(ROWS, dtype=torch.bool)
MASK[0, 5:9] = False          # masked targets (e.g. a prompt), one of them an opener
MASK[1, -1] = False           # masked last target: its id is unknown to the metric
MASK[2, 16:20] = False


def calc() -> CoordinateCalculator:
    return CoordinateCalculator(DELTAS, BOS, N_DIM)


def batches(rows: torch.Tensor, mask: torch.Tensor, with_coords: bool, batch_size: int = 2):
    """Loader-shaped batches: ``(x, y, cx, cy, state)`` (RDN) or ``(x, y, state)`` (GPT)."""
    out = []
    for i in range(0, rows.size(0), batch_size):
        r, m = rows[i:i + batch_size], mask[i:i + batch_size]
        x, y = r[:, :-1], torch.where(m[:, 1:], r[:, 1:], -1)
        if with_coords:
            c = calc()(r)
            out.append((x, y, c[:, :-1], c[:, 1:], {}))
        else:
            out.append((x, y, {}))
    return out


def tiny_model(use_coordinates: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, head_dim=16,
                          use_coordinates=use_coordinates, n_coord_dim=N_DIM, vocab_pad_multiple=16))
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes the head: random weights make the losses differ per token
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def naive_depths(row: list[int]) -> list[int]:
    depth, out = 0, []
    for tok in row:
        depth = 0 if tok == BOS else max(0, depth + int(DELTAS[tok]))
        out.append(depth)
    return out


def naive(model, rows: torch.Tensor, mask: torch.Tensor, with_coords: bool) -> dict[str, float]:
    sums = {k: ([], 0) for k in ("all", "closing", "depth2")}
    model.eval()
    with torch.no_grad():  # the same batches as the metric's (the losses of other shapes round differently)
        loss = torch.cat([model(x, y, coords=rest[0] if with_coords else None, loss_reduction="none")
                          for x, y, *rest in batches(rows, mask, with_coords)])
    for b in range(rows.size(0)):
        row = rows[b].tolist()
        depths = naive_depths(row)
        for t in range(len(row) - 1):
            if not mask[b, t + 1]:
                continue
            tok = row[t + 1]
            nbytes = int(TOKEN_BYTES[tok])
            if nbytes == 0:
                continue
            for name, inside in (("all", True), ("closing", int(DELTAS[tok]) < 0), ("depth2", depths[t + 1] >= 2)):
                if inside:
                    nats, n = sums[name]
                    nats.append(float(loss[b, t]))
                    sums[name] = (nats, n + nbytes)
    out = {}
    for name, (nats, n) in sums.items():
        key = "" if name == "all" else f"_{name}"
        out[f"bpb{key}"] = math.fsum(nats) / (math.log(2) * n)
        out[f"bytes{key}"] = n
    return out


def test_depth_is_the_walk_of_rdn_coords_after_each_tokens_own_delta():
    depth = bracket_depth(ROWS, DELTAS, BOS)
    assert depth.tolist() == [naive_depths(r) for r in ROWS.tolist()]
    # the token's coordinate sits on dimension min(depth, n_dim - 1) (where its counter is non-zero)
    coords = calc()(ROWS)
    nonzero = coords.ne(0).any(-1)
    assert nonzero.sum() > 40
    assert torch.equal(coords.argmax(-1)[nonzero], depth.clamp(max=N_DIM - 1)[nonzero])
    # hand-checked: "((" enters level 2 (counts), a closer leaving level 2 for 1 does not, BOS resets
    assert depth[0, 5] == 2 and depth[0, 9] == 1 and depth[0, 2] == 0 and depth[0, 10] == 0
    assert depth[0, 15] == 4 and depth[0, 16] == 0


@pytest.mark.parametrize("with_coords", [True, False], ids=["rdn", "gpt"])
def test_matches_a_per_token_loop(with_coords):
    model = tiny_model(with_coords)
    got = evaluate_bpb_by_class(model, iter(batches(ROWS, MASK, with_coords)), 10**9, TOKEN_BYTES, nullcontext,
                                calc())
    want = naive(model, ROWS, MASK, with_coords)
    assert want["bytes_closing"] > 20 and want["bytes_depth2"] > 20 and want["bytes"] > want["bytes_closing"]
    for k in ("bytes", "bytes_closing", "bytes_depth2"):
        assert got[k] == want[k], k
    for k in ("bpb", "bpb_closing", "bpb_depth2"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert len({got["bpb"], got["bpb_closing"], got["bpb_depth2"]}) == 3


def test_gpt_and_rdn_models_are_scored_on_the_same_targets():
    x, y, _, cy, _ = batches(ROWS, MASK, True, batch_size=3)[0]
    masks = target_classes(x, y, DELTAS, BOS)
    gx, gy, _ = batches(ROWS, MASK, False, batch_size=3)[0]
    assert all(torch.equal(m, target_classes(gx, gy, DELTAS, BOS)[k]) for k, m in masks.items())
    rdn = evaluate_bpb_by_class(tiny_model(True), iter(batches(ROWS, MASK, True)), 10**9, TOKEN_BYTES,
                                nullcontext, calc())
    gpt = evaluate_bpb_by_class(tiny_model(False), iter(batches(ROWS, MASK, False)), 10**9, TOKEN_BYTES,
                                nullcontext, calc())
    assert all(rdn[k] == gpt[k] for k in ("bytes", "bytes_closing", "bytes_depth2"))
    assert rdn["bpb_closing"] != gpt["bpb_closing"]  # different models, same targets
    # masked targets are in no class; the depth mask agrees with the coordinates the RDN model reads
    assert not (masks["closing"] | masks["depth2"])[y < 0].any()
    on = cy.ne(0).any(-1) & (y >= 0)
    assert torch.equal(cy.argmax(-1)[on] >= 2, masks["depth2"][on])  # n_dim 4 > 2: dimension >= 2 iff depth >= 2


@pytest.mark.parametrize("max_tokens", [10**9, 1])
def test_unrestricted_figure_equals_evaluate_bpb(max_tokens):
    for with_coords in (True, False):
        model = tiny_model(with_coords)
        got = evaluate_bpb_by_class(model, iter(batches(ROWS, MASK, with_coords)), max_tokens, TOKEN_BYTES,
                                    nullcontext, calc())
        assert got["bpb"] == evaluate_bpb(model, iter(batches(ROWS, MASK, with_coords)), max_tokens, TOKEN_BYTES,
                                          nullcontext)
        assert model.training  # the mode is restored


def test_a_class_without_bytes_is_none():
    rows = torch.tensor([[BOS, 20, 21, 1, 22, 23, 24]])
    got = evaluate_bpb_by_class(tiny_model(True), iter(batches(rows, torch.ones_like(rows, dtype=torch.bool), True)),
                                10**9, TOKEN_BYTES, nullcontext, calc())
    assert got["bpb_closing"] is None and got["bpb_depth2"] is None and got["bytes_closing"] == 0
    assert math.isfinite(got["bpb"])


def test_real_tokenizer_and_loader_rdn_and_gpt_agree(tiny_artifacts):
    """On the tiny corpus's val split through the real loader: the tokenizer's own bracket table,
    the same targets for an RDN batch (with coordinates) and a GPT batch (without)."""
    from rdn.data.loader import get_dataloader
    from rdn.tokenizer import Tokenizer

    data_dir, tok_dir = tiny_artifacts
    tok = Tokenizer.load(tok_dir)
    c = CoordinateCalculator.from_tokenizer(tok, N_DIM)
    token_bytes = torch.tensor([len(tok.id_bytes(i)) if i not in tok.special_ids.values() else 0
                                for i in range(tok.vocab_size)], dtype=torch.int32)
    results = []
    for coords in (c, None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32,
                              head_dim=16, use_coordinates=coords is not None, n_coord_dim=N_DIM))
        model.init_weights()
        loader = get_dataloader(tok, data_dir, "val", 2, 64, coords=coords, prefetch=0, loop=False)
        results.append(evaluate_bpb_by_class(model, loader, 1024, token_bytes, nullcontext, c))
        loader.close()
    rdn, gpt = results
    assert rdn["bytes_closing"] > 0 and rdn["bytes_depth2"] > 0
    assert all(rdn[k] == gpt[k] for k in ("bytes", "bytes_closing", "bytes_depth2"))


@pytest.mark.parametrize("use_coordinates", [True, False], ids=["rdn", "gpt"])
def test_base_train_records_the_class_figures_at_its_final_evaluation_only(tiny_artifacts, tmp_path,
                                                                           use_coordinates):
    import json
    import shutil

    from rdn.train.pretrain import run_base_train
    from tests.test_train import RecordingRun, tiny_params

    data_dir, tok_dir = tiny_artifacts
    shutil.copytree(data_dir, tmp_path / "artifacts/data")
    shutil.copytree(tok_dir, tmp_path / "artifacts/tokenizer")
    params = tiny_params(use_coordinates, num_iterations=2, eval_every=1, eval_tokens=2048)  # depth 2 is rare here
    run = RecordingRun()
    summary = run_base_train(params, tmp_path, run)
    assert sorted(run.history["val/bpb"]) == [0, 1, 2]
    for c in ("closing", "depth2"):
        assert list(run.history[f"val/bpb_{c}"]) == [2]  # not at the periodic evaluations
        assert summary[f"final_val_bpb_{c}"] == run.history[f"val/bpb_{c}"][2]
        assert math.isfinite(summary[f"final_val_bpb_{c}"]) and summary[f"final_val_bpb_{c}"] != summary["final_val_bpb"]
    # a finished run is not evaluated again: its summary keeps the figures (from the checkpoint's history)
    again = run_base_train(params, tmp_path, RecordingRun())
    assert {k: again[k] for k in ("final_val_bpb_closing", "final_val_bpb_depth2")} == \
        {k: summary[k] for k in ("final_val_bpb_closing", "final_val_bpb_depth2")}
    json.dumps(summary, allow_nan=False)
    # the evaluate stage records them next to val_bpb for a text stage (eval/base/val_bpb_closing, ...)
    from rdn.config import validate_params
    from rdn.eval.evaluate import run_evaluate

    p = params.model_dump(mode="json")
    p["evaluate"].update(stages=["base"], bpb_tokens=2048, num_examples=2)
    ev_run = RecordingRun()
    row = run_evaluate(validate_params(p), tmp_path, ev_run)["base"]
    assert all(math.isfinite(row[k]) for k in ("val_bpb", "val_bpb_closing", "val_bpb_depth2"))
    assert "eval/base/val_bpb_closing" in ev_run.history and "eval/base/val_bpb_depth2" in ev_run.history
