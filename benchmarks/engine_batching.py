"""Batched generation: one left-padded batch vs one batch per prompt length vs one prompt at a time.

The engine prefills all prompts of a call together, left-padded with ``<|bos|>`` and a
per-row key mask (``rdn.inference.engine``). Before that, prompts of different lengths went in
separate batches, one per length -- RL sampling and evaluation on word problems of varied
length ran many small decode loops. This prints, side by side in one run, the time of
the same calls (calculator prompts, greedy and sampled) done three ways, and checks that
greedy tokens agree between them (they must, up to float rounding).

    python benchmarks/engine_batching.py                      # the SFT checkpoint if present, else random weights
    python benchmarks/engine_batching.py --prompts 64 --samples 4 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from rdn.config import load_params
from rdn.coords import CoordinateCalculator
from rdn.inference.engine import Engine
from rdn.tasks import get_task
from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import render_for_completion

ROOT = Path(__file__).resolve().parents[1]


def load_model(device: torch.device, tok: Tokenizer):
    from rdn.artifacts import CHECKPOINTS
    from rdn.checkpoint import coordinate_calculator, latest_checkpoint, model_from_checkpoint
    from rdn.train.pretrain import build_model

    ckpt = latest_checkpoint(ROOT / CHECKPOINTS / "sft")
    if ckpt is not None:
        model, _ = model_from_checkpoint(ckpt, device)
        return model.eval(), coordinate_calculator(ckpt, tok), f"checkpoint {ckpt.path.relative_to(ROOT)}"
    params = load_params(ROOT / "params.yaml")
    model, config = build_model(params, tok, device)
    calc = (CoordinateCalculator.from_tokenizer(tok, params.coords.n_dim, params.coords.bracket_pairs)
            if config.use_coordinates else None)
    return model.eval(), calc, "random weights (no SFT checkpoint; run `make run` for a trained one)"


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt in the sampled case")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="best of N")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    tok = Tokenizer.load(ROOT / "artifacts/tokenizer")
    model, calc, source = load_model(device, tok)
    engine = Engine(model, tok, calc)
    task = get_task("calculator")
    prompts = [render_for_completion(tok, task.prompt(c)) for c in task.generate(args.prompts, seed=3, split="test")]
    lengths = sorted({len(p) for p in prompts})
    print(f"# engine batching, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}")
    print(f"# model: {source}; {len(prompts)} calculator prompts, {len(lengths)} distinct lengths "
          f"({lengths[0]}..{lengths[-1]} tokens), max_new_tokens {args.max_new_tokens}")

    def padded(n, temp):
        return engine.generate(prompts, num_samples=n, max_new_tokens=args.max_new_tokens, temperature=temp,
                               top_k=50, seed=1)

    def by_length(n, temp):
        out: dict[int, object] = {}
        for length in lengths:
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            gens = engine.generate([prompts[i] for i in idx], num_samples=n, max_new_tokens=args.max_new_tokens,
                                   temperature=temp, top_k=50, seed=1)
            out.update(zip(idx, gens))
        return [out[i] for i in range(len(prompts))]

    def one_by_one(n, temp):
        return [engine.generate([p], num_samples=n, max_new_tokens=args.max_new_tokens, temperature=temp,
                                top_k=50, seed=1)[0] for p in prompts]

    print(f"{'case':<26}{'one batch (padded)':>20}{'batch per length':>18}{'one at a time':>15}{'speedup':>9}")
    for label, n, temp in [("greedy x1", 1, 0.0), (f"sampled x{args.samples}", args.samples, 1.0)]:
        t_pad, g_pad = timed(lambda: padded(n, temp), args.repeats)
        t_len, g_len = timed(lambda: by_length(n, temp), args.repeats)
        t_one, g_one = timed(lambda: one_by_one(n, temp), args.repeats)
        print(f"{label:<26}{t_pad:>19.2f}s{t_len:>17.2f}s{t_one:>14.2f}s{t_len / t_pad:>8.1f}x")
        if temp == 0.0:
            agree = sum(a[0].tokens == b[0].tokens == c[0].tokens for a, b, c in zip(g_pad, g_len, g_one))
            print(f"{'':<26}greedy tokens identical in all three ways for {agree}/{len(prompts)} prompts")
    print("speedup = batch per length (the engine before left padding) / one padded batch")


if __name__ == "__main__":
    main()
