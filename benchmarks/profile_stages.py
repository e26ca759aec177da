"""Where the CPU time of each pipeline stage goes: torch.profiler over one step of each.

Stages (random weights of the default ``params.yaml`` model; no trained checkpoint needed):

* ``base``: one pretraining step -- ``total_batch_size / (B * T)`` micro-batches from the real
  packed-text loader (coordinates included), forward + backward each, then the MuonAdamW step;
* ``mid``: the same on mid-training rows (text and task conversations, every token supervised);
* ``sft``: the same on SFT rows (whole conversations, padded, assistant tokens supervised);
* ``rl``: one chat_rl step -- ``prompts_per_step x samples_per_prompt`` sampled rollouts
  (Engine.generate, temperature/top-k from params), scoring, the policy-gradient loss over
  micro-batches of ``device_batch_size`` sequences, backward and the optimizer step;
* ``eval``: one evaluate pass -- greedy generation for ``evaluate.batch_size`` held-out
  calculator problems, scoring, and bits-per-byte over ``--bpb-tokens`` of val text.

Generation never stops early: the engines' stop tokens are switched off, so every rollout and
every evaluated answer runs its full ``max_new_tokens`` (an untrained model would otherwise
stop at whichever step its random weights happen to emit a stop token, differently under
another ISA). Each stage runs once untimed (warm-up: oneDNN primitives, allocator) and is then profiled
once. Printed per stage: wall time, the time inside each phase (``data``, ``fwd+bwd``,
``optimizer``, ``rollout``, ...; user annotations, so their self time is Python work between
ops), and the top ops by self CPU time with their share of the stage's total self CPU
time. ``--cprofile`` adds the top Python functions (a second, separately timed run).

The tokenizer and corpus come from ``--artifacts`` (``data/`` and ``tokenizer/`` of a
``dvc repro``) when present; otherwise a corpus of stdlib sources is built and a tokenizer of
``tokenizer.vocab_size`` trained on it in a temporary directory (about a minute).

    python benchmarks/profile_stages.py                    # this CPU as it is
    python benchmarks/profile_stages.py --force-avx2       # as an AVX2-only CPU (re-executes itself
        # with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import math
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

FORCED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _maybe_reexec(argv: list[str]) -> None:
    """--force-avx2: both variables are read once at library load, so restart with them set."""
    if "--force-avx2" in argv and any(os.environ.get(k) != v for k, v in FORCED_AVX2.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **FORCED_AVX2})


_maybe_reexec(sys.argv)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from rdn.config import DataConfig, TokenizerConfig, load_params  # noqa: E402
from rdn.coords import CoordinateCalculator  # noqa: E402
from rdn.data import build_corpus, iter_documents  # noqa: E402
from rdn.data.conversations import ConversationRows, MixedRows  # noqa: E402
from rdn.data.loader import DeviceBatches, PackedRows, get_dataloader  # noqa: E402
from rdn.device import (cpu_bf16_matmul_native, cpu_capability, dtype_name, orthogonalization_dtype,  # noqa: E402
                        resolve_device)
from rdn.inference.engine import Engine  # noqa: E402
from rdn.model import GPT, GPTConfig  # noqa: E402
from rdn.tasks import get_task  # noqa: E402
from rdn.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from rdn.tokenizer.chat import render_conversation, render_for_completion  # noqa: E402

try:  # the stages' own helpers where they live now; the fallbacks are the same few lines
    from rdn.train.rl import group_advantages, policy_gradient_loss
except ImportError:  # pragma: no cover
    def group_advantages(rewards, normalize):
        adv = rewards - rewards.mean(dim=1, keepdim=True)
        return adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + 1e-4) if normalize else adv

    def policy_gradient_loss(logp, advantages, mask, n_tokens=None, **_):
        return (-advantages[:, None] * logp * mask).sum() / (n_tokens or mask.sum().clamp(min=1))


# --------------------------------------------------------------------------- setup

def artifacts(args, params, workdir: Path) -> tuple[Path, Tokenizer]:
    src = Path(args.artifacts)
    if (src / "tokenizer" / "tokenizer.json").exists() and (src / "data").is_dir():
        return src / "data", Tokenizer.load(src / "tokenizer")
    t0 = time.perf_counter()
    data_dir, tok_dir = workdir / "data", workdir / "tokenizer"
    build_corpus(DataConfig(source="stdlib", include_tests=False, max_total_bytes=args.corpus_bytes,
                            val_fraction=0.1), data_dir, seed=0, root=workdir)
    train_tokenizer(TokenizerConfig(vocab_size=params.tokenizer.vocab_size, max_chars=args.corpus_bytes),
                    iter_documents(data_dir, "train"), list(iter_documents(data_dir, "val"))[:10], tok_dir)
    print(f"(built a {args.corpus_bytes / 1e6:.0f} MB stdlib corpus and a tokenizer in "
          f"{time.perf_counter() - t0:.0f} s under {workdir})")
    return data_dir, Tokenizer.load(tok_dir)


def build_model(params, vocab: int, device: torch.device) -> GPT:
    config = GPTConfig.from_params(params.model, vocab_size=vocab, n_coord_dim=params.coords.n_dim)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def rendered(tok, tasks: dict[str, int], seed: int, split: str, full_supervision: bool) -> list:
    items = []
    for name, n in sorted(tasks.items()):
        for conv in get_task(name).generate(n, seed=seed, split=split) if n > 0 else []:
            ids, mask = render_conversation(tok, conv)
            items.append((ids, [0] + [1] * (len(ids) - 1) if full_supervision else mask))
    return items


# --------------------------------------------------------------------------- one step of each stage

def lm_step(model, opt, batches, accum: int) -> None:
    """A pretraining/mid/SFT optimizer step, as rdn's trainer takes it."""
    for _ in range(accum):
        with record_function("data"):
            x, y, cx, _cy, _state = next(batches)
        with record_function("fwd+bwd"):
            loss = model(x, y, coords=cx)
            (loss / accum).backward()
    with record_function("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def rl_step(model, opt, engine, tok, calc, task, convs, cfg, device, seed: int) -> None:
    """One chat_rl step: rollouts, scores, policy-gradient micro-batches, the optimizer step."""
    P, S = cfg.prompts_per_step, cfg.samples_per_prompt
    with record_function("rollout"):
        prompts = [render_for_completion(tok, task.prompt(c)) for c in convs[:P]]
        model.eval()
        gens = engine.generate(prompts, num_samples=S, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_k=cfg.top_k, seed=seed)
        model.train()
    with record_function("score"):
        rewards = torch.tensor([[task.score(c, g.text) for g in samples] for c, samples in zip(convs, gens)])
        adv = group_advantages(rewards, cfg.normalize_advantages).flatten()
    flat_prompts = [p for p in prompts for _ in range(S)]
    flat_gens = [g for samples in gens for g in samples]
    n_tokens = max(1, sum(sum(g.mask) for g in flat_gens))
    for i in range(0, len(flat_gens), cfg.device_batch_size):
        with record_function("data"):
            seqs = [p + g.tokens for p, g in zip(flat_prompts[i:i + cfg.device_batch_size],
                                                  flat_gens[i:i + cfg.device_batch_size])]
            masks = [[0] * len(p) + g.mask for p, g in zip(flat_prompts[i:i + cfg.device_batch_size],
                                                         flat_gens[i:i + cfg.device_batch_size])]
            T = max(len(s) for s in seqs)
            ids = torch.tensor([s + [tok.bos_id] * (T - len(s)) for s in seqs], device=device)
            m = torch.tensor([mk + [0] * (T - len(mk)) for mk in masks], dtype=torch.bool, device=device)[:, 1:]
            x, y = ids[:, :-1], torch.where(m, ids[:, 1:], -1)
            coords = calc(ids)[:, :-1]
        with record_function("fwd+bwd"):
            logp = -model(x, y, coords=coords, loss_reduction="none")
            policy_gradient_loss(logp, adv[i:i + cfg.device_batch_size], m.float(), n_tokens=n_tokens).backward()
    with record_function("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def eval_step(model, engine, tok, task, convs, val_batches, bpb_tokens: int, token_bytes, cfg) -> None:
    """One evaluate pass: greedy answers to a batch of problems, scores, bits per byte."""
    model.eval()
    with record_function("generate"):
        prompts = [render_for_completion(tok, task.prompt(c)) for c in convs[:cfg.batch_size]]
        gens = engine.generate(prompts, num_samples=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    with record_function("score"):
        sum(task.score(c, g[0].text) for c, g in zip(convs, gens))
    nats, nbytes, seen = 0.0, 0, 0
    while seen < bpb_tokens:
        with record_function("data"):
            x, y, cx, _cy, _state = next(val_batches)
        with record_function("bpb forward"):
            loss = model(x, y, coords=cx, loss_reduction="none")
            tb = token_bytes[y.clamp(min=0)] * (y >= 0)
            nats += float((loss * (tb > 0)).sum())
            nbytes += int(tb.sum())
        seen += y.numel()
    model.train()
    return nats / (math.log(2) * max(nbytes, 1))


# --------------------------------------------------------------------------- reporting

def report(name: str, prof, wall: float, top: int) -> None:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    phases = [e for e in events if e.key in PHASES]
    ops = sorted((e for e in events if e.key not in PHASES), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"\n=== {name}: wall {wall * 1e3:,.0f} ms, self CPU total {total / 1e3:,.0f} ms")
    print("  phases (total incl. children | self = Python between ops): " + ", ".join(
        f"{e.key} {e.cpu_time_total / 1e3:,.0f} | {e.self_cpu_time_total / 1e3:,.0f} ms"
        for e in sorted(phases, key=lambda e: -e.cpu_time_total)))
    print(f"  {'op':42} {'self ms':>9} {'%':>6} {'calls':>7}")
    for e in ops[:top]:
        print(f"  {e.key[:42]:42} {e.self_cpu_time_total / 1e3:9.1f} {100 * e.self_cpu_time_total / total:5.1f}% "
              f"{e.count:7d}")


def python_report(fn, top: int) -> None:
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print(f"  cProfile ({(time.perf_counter() - t0) * 1e3:,.0f} ms wall, top {top} by own time):")
    for ln in lines[start:start + top + 1]:
        print("   " + ln[:150])


PHASES = {"data", "fwd+bwd", "optimizer", "rollout", "score", "generate", "bpb forward"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stages", default="base,mid,sft,rl,eval")
    ap.add_argument("--artifacts", default="artifacts", help="dir with data/ and tokenizer/ (else built here)")
    ap.add_argument("--corpus-bytes", type=int, default=6_000_000, help="stdlib corpus size when building one")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ortho", default="auto", help="optim.orthogonalization_dtype: auto | float32 | bfloat16")
    ap.add_argument("--bpb-tokens", type=int, default=8192, help="val tokens of the eval pass's bits per byte")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--cprofile", action="store_true", help="also list the top Python functions per stage")
    ap.add_argument("--force-avx2", action="store_true", help="run as an AVX2-only CPU (see the docstring)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    device = resolve_device(args.device)
    ortho = orthogonalization_dtype(args.ortho, device)
    print(f"date {datetime.date.today()}  torch {torch.__version__}  {platform.machine()}, "
          f"{torch.get_num_threads()} threads  device {device}")
    print(f"CPU capability {cpu_capability()}  bf16 matmul native (oneDNN) {cpu_bf16_matmul_native()}  "
          f"orthogonalization {dtype_name(ortho)} ({args.ortho})  "
          f"env {' '.join(f'{k}={os.environ[k]}' for k in FORCED_AVX2 if k in os.environ) or '-'}")
    stages = args.stages.split(",")
    seed = params.run.seed

    with tempfile.TemporaryDirectory(prefix="rdn-profile-") as tmp:
        data_dir, tok = artifacts(args, params, Path(tmp))
        calc = CoordinateCalculator.from_tokenizer(tok, n_dim=params.coords.n_dim,
                                                   bracket_pairs=params.coords.bracket_pairs)
        token_bytes = torch.tensor(tok.token_bytes(), device=device)
        model = build_model(params, tok.vocab_size, device)
        print(f"model: depth {params.model.depth}, {model.num_scaling_params()['total']:,} params, "
              f"vocab {tok.vocab_size}")

        def optimizer(cfg):
            return model.setup_optimizer(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                         matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr,
                                         weight_decay=cfg.weight_decay, adam_betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         ortho_dtype=dtype_name(ortho))

        runs = {}
        for stage in stages:
            if stage in ("base", "mid", "sft"):
                cfg = {"base": params.base_train, "mid": params.mid_train, "sft": params.chat_sft}[stage]
                B, T = cfg.device_batch_size, cfg.seq_len
                accum = cfg.total_batch_size // (B * T)
                if stage == "base":
                    batches = get_dataloader(tok, data_dir, "train", B, T, device=device, coords=calc, seed=seed,
                                             prefetch=0)
                else:
                    mid = stage == "mid"
                    items = rendered(tok, cfg.tasks, seed, "train", full_supervision=mid)
                    conv = ConversationRows(items, B, T, tok.bos_id, crop=mid, seed=seed,
                                            buffer_items=cfg.loader_buffer_docs)
                    text = PackedRows(tok, data_dir, "train", B, T, seed=seed) if mid else None
                    batches = DeviceBatches(MixedRows(text, conv, cfg.pretrain_fraction if mid else 0.0, seed=seed),
                                            device, calc)
                opt = optimizer(cfg)
                runs[stage] = (lambda b=batches, o=opt, a=accum: lm_step(model, o, b, a))
            elif stage == "rl":
                cfg = params.chat_rl
                task = get_task(cfg.task)
                convs = task.generate(cfg.prompts_per_step * 3, seed=seed, split="train")
                engine = Engine(model, tok, calc)
                engine.stop_ids = set()  # full-length rollouts (see the module docstring)
                opt = optimizer(params.chat_sft)
                counter = iter(range(10**6))

                def rl(opt=opt, engine=engine, task=task, convs=convs, cfg=cfg):
                    k = next(counter) % 3
                    P = cfg.prompts_per_step
                    rl_step(model, opt, engine, tok, calc, task, convs[k * P:(k + 1) * P], cfg, device, seed + k)
                runs[stage] = rl
            elif stage == "eval":
                cfg = params.evaluate
                task = get_task("calculator")
                convs = task.generate(cfg.batch_size, seed=seed + 1, split="test")
                engine = Engine(model, tok, calc)
                engine.stop_ids = set()
                val = get_dataloader(tok, data_dir, "val", params.base_train.device_batch_size,
                                     params.base_train.seq_len, device=device, coords=calc, seed=seed, prefetch=0)
                runs[stage] = (lambda e=engine, t=task, c=convs, v=val, cfg=cfg:
                               eval_step(model, e, tok, t, c, v, args.bpb_tokens, token_bytes, cfg))
            else:
                ap.error(f"unknown stage {stage!r}")

        for stage, fn in runs.items():
            fn()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
            report(stage, prof, wall, args.top)
            if args.cprofile:
                python_report(fn, args.top)
            sys.stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
