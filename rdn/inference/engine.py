"""Batched sampling with a KV cache, hierarchical coordinates and the calculator tool.

:class:`Engine` turns prompts (token ids, e.g. from :func:`rdn.tokenizer.chat.render_for_completion`)
into generations, nanochat-style:

* **Prefill once, fork for samples.** All prompts are prefilled together as one batch, once
  each, and the cache is forked ``num_samples`` times with :meth:`KVCache.expand`; then every
  row decodes one token per step. Prompts of different lengths are left-padded with
  ``<|bos|>`` and the cache's key mask hides the pads from every query; rotary positions are
  relative and ``<|bos|>`` resets the coordinates, so a padded prompt decodes as it would
  alone (up to float rounding; the tests check greedy tokens against per-prompt recomputation).
* **Coordinates.** In RDN mode every fed token needs its hierarchical coordinate, which depends on
  the whole prefix. The prompt's come from the :class:`~rdn.coords.CoordinateCalculator`; each new
  token's from a per-row running state (depth, per-depth counters) that applies the rule of
  :mod:`rdn.coords` one token at a time, on the device -- O(1) per token instead of rescanning
  the sequence. The tests check it equals ``hierarchical_coordinates`` over the full sequence.
* **Tool use.** Each row runs a small state machine: after the model emits ``<|python_start|>``
  the tokens up to ``<|python_end|>`` are the expression; :func:`rdn.inference.tools.calculator` (an
  ``ast`` evaluator, never ``eval``) computes it and ``<|output_start|>`` RESULT
  ``<|output_end|>`` is *forced* into that row, one token per step like any other token, so the
  cache and the coordinates see it (mask 0 in the :class:`Generation`). Rows stay in lock step:
  a forced step still runs the batch forward, the row's own sample is simply discarded.
* **Sampling.** ``temperature == 0`` is argmax; otherwise ``softmax(logits / temperature)``
  restricted to the ``top_k`` largest logits, drawn with a ``torch.Generator`` seeded from
  ``seed``: the same call gives the same tokens.

``max_new_tokens`` counts every generated token, forced ones included. A row stops at
``<|assistant_end|>`` or ``<|bos|>`` (kept as its last token, ``finished=True``).
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Iterator

import torch

from rdn.coords import CoordinateCalculator, hierarchical_coordinates
from rdn.model.attention import KVCache
from rdn.inference.tools import calculator


@dataclass
class Generation:
    """One sampled continuation of one prompt."""
    tokens: list[int] = field(default_factory=list)  # after the prompt: sampled and forced tokens
    mask: list[int] = field(default_factory=list)    # 1 = sampled by the model, 0 = forced by the tool
    text: str = ""                                    # tokens decoded, special-token strings included
    finished: bool = False                            # ended on <|assistant_end|> or <|bos|>


# --------------------------------------------------------------------------- per-row state

class _ToolState:
    """The calculator state machine of one row: collects an expression, queues the forced output."""

    def __init__(self, tok):
        self.tok = tok
        self.python_start = tok.special_id("<|python_start|>")
        self.python_end = tok.special_id("<|python_end|>")
        self.output = (tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>"))
        self.in_python = False
        self.expression: list[int] = []
        self.forced: deque[int] = deque()

    def observe(self, token: int) -> None:
        """Advance on the token just emitted (sampled or forced) for this row."""
        if token == self.python_start:
            self.in_python, self.expression = True, []
        elif token == self.python_end and self.in_python:
            self.in_python = False
            result = calculator(self.tok.decode(self.expression))
            self.forced.extend([self.output[0], *self.tok.encode(result), self.output[1]])
        elif self.in_python:
            self.expression.append(token)


class _CoordinateState:
    """Running hierarchical-coordinate state of each row: ``depth[B]`` and ``counters[B, n_dim]``.

    :meth:`step` applies the rule of :mod:`rdn.coords` to one token per row, vectorised over rows."""

    def __init__(self, calc: CoordinateCalculator, prompts: list[list[int]], device: torch.device):
        self.deltas = calc.deltas.to(device)
        self.bos_id, self.n_dim = calc.bos_id, calc.n_dim
        # The state after each prompt: a plain loop over ints on the host (prefill only; far
        # cheaper than one small device op per prompt token).
        delta = calc.deltas.tolist()
        depths, counters = [], []
        for prompt in prompts:
            depth, count = 0, [0] * self.n_dim
            for t in prompt:
                if t == self.bos_id:
                    depth, count = 0, [0] * self.n_dim
                else:
                    depth = max(0, depth + delta[t])
                    count[min(depth, self.n_dim - 1)] += 1
            depths.append(depth)
            counters.append(count)
        self.depth = torch.tensor(depths, dtype=torch.long, device=device)
        self.counters = torch.tensor(counters, dtype=torch.long, device=device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coordinates ``[B, n_dim]`` of ``tokens`` ``[B]``, then advance the state past them."""
        is_bos = tokens == self.bos_id
        depth = (self.depth + self.deltas[tokens]).clamp(min=0)
        self.depth = torch.where(is_bos, 0, depth)
        self.counters = torch.where(is_bos.unsqueeze(-1), 0, self.counters)
        d = self.depth.clamp(max=self.n_dim - 1)
        onehot = torch.nn.functional.one_hot(d, self.n_dim) * (~is_bos).unsqueeze(-1)
        coords = self.counters * onehot
        self.counters = self.counters + onehot
        return coords

    def expand(self, reps: int) -> None:
        self.depth = self.depth.repeat_interleave(reps, dim=0)
        self.counters = self.counters.repeat_interleave(reps, dim=0)


# --------------------------------------------------------------------------- engine

class Engine:
    """Sampling from a :class:`rdn.model.GPT` (or any module with its ``forward``, ``config`` and ``get_device``)."""

    def __init__(self, model: torch.nn.Module, tokenizer, coords: CoordinateCalculator | None = None):
        cfg = model.config
        if cfg.use_coordinates and coords is None:
            raise ValueError("RDN model (use_coordinates=True): Engine needs coords=CoordinateCalculator, e.g. "
                             "CoordinateCalculator.from_tokenizer(tok, n_dim=..., bracket_pairs=...)")
        if cfg.use_coordinates and coords.n_dim != cfg.n_coord_dim:
            raise ValueError(f"coords.n_dim ({coords.n_dim}) != model n_coord_dim ({cfg.n_coord_dim})")
        if not cfg.use_coordinates and coords is not None:
            warnings.warn("GPT model (use_coordinates=False): the coords calculator is ignored", stacklevel=2)
            coords = None
        self.model, self.tok, self.coords = model, tokenizer, coords
        self.stop_ids = {tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id}
        self.max_len = getattr(model, "rotary_len", cfg.sequence_len)

    # ----------------------------------------------------------------------- public API

    def generate(self, prompts: list[list[int]], num_samples: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> list[list[Generation]]:
        """``num_samples`` generations for each prompt: ``result[i][j]`` is sample ``j`` of prompt ``i``."""
        self._check(prompts, num_samples, max_new_tokens, temperature, top_k)
        rows = [Generation() for _ in range(len(prompts) * num_samples)]
        for step in self._decode(prompts, num_samples, max_new_tokens, temperature, top_k, self._generator(seed)):
            for r, (token, forced) in step.items():
                rows[r].tokens.append(token)
                rows[r].mask.append(0 if forced else 1)
                rows[r].finished = token in self.stop_ids
        out = [rows[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
        for gens in out:
            for g in gens:
                g.text = self.tok.decode(g.tokens)
        return out

    def stream(self, prompt: list[int], max_new_tokens: int = 256, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 0) -> Iterator[tuple[int, bool]]:
        """Yield ``(token_id, forced)`` for one prompt as they are produced (``rdn chat``)."""
        self._check([prompt], 1, max_new_tokens, temperature, top_k)
        for step in self._decode([prompt], 1, max_new_tokens, temperature, top_k, self._generator(seed)):
            yield step[0]

    # ----------------------------------------------------------------------- internals

    def _check(self, prompts, num_samples, max_new_tokens, temperature, top_k) -> None:
        V = self.model.config.vocab_size
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if not all(isinstance(t, int) and 0 <= t < V for t in p):
                raise ValueError(f"prompt {i}: every token must be an int in [0, {V})")
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the "
                                 f"model's maximum decoding length {self.max_len}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {temperature})")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (got {top_k})")

    def _device(self) -> torch.device:
        return self.model.get_device()

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self._device()).manual_seed(seed)

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> torch.Tensor:
        """Next token ``[B]`` from last-position logits ``[B, V]``."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.size(-1):
            values, indices = torch.topk(logits, top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
            return indices.gather(-1, choice).squeeze(-1)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)

    @torch.inference_mode()
    def _decode(self, prompts: list[list[int]], num_samples: int, max_new_tokens: int, temperature: float,
                top_k: int | None, generator: torch.Generator) -> Iterator[dict[int, tuple[int, bool]]]:
        """Decode ``prompts`` x ``num_samples`` rows (prompt-major), the prompts left-padded to
        one length. Yields, per step, ``{row: (token, forced)}`` for every row still running."""
        model = self.model
        device = self._device()
        was_training = model.training
        model.eval()
        try:
            width = max(len(p) for p in prompts)
            pad = [width - len(p) for p in prompts]
            ids = torch.tensor([[self.tok.bos_id] * n + p for n, p in zip(pad, prompts)],
                               dtype=torch.long, device=device)                 # [P, T], left-padded
            B = len(prompts) * num_samples
            cache = KVCache.for_model(model, batch_size=len(prompts), max_len=width + max_new_tokens)
            cache.set_padding(pad)
            coord_state = None
            coords = None
            if self.coords is not None:
                # Eager, not calc(ids): on CUDA the calculator compiles per shape, and every
                # prompt length would recompile; one prefill's few small scans cost nothing.
                # <|bos|> pads reset the state, so the real tokens get their unpadded coordinates.
                coords = hierarchical_coordinates(ids, self.coords.deltas, self.coords.bos_id, self.coords.n_dim)
                coord_state = _CoordinateState(self.coords, prompts, device)
            logits = model(ids, coords=coords, kv_cache=cache)[:, -1]          # prefill: once per prompt
            if num_samples > 1:
                cache = cache.expand(B)
                logits = logits.repeat_interleave(num_samples, dim=0)
                if coord_state is not None:
                    coord_state.expand(num_samples)

            tools = [_ToolState(self.tok) for _ in range(B)]
            running = [True] * B
            last = [0] * B
            for step in range(max_new_tokens):
                sampled = self._sample(logits, temperature, top_k, generator).tolist()
                emitted: dict[int, tuple[int, bool]] = {}
                for r in range(B):
                    if not running[r]:
                        continue
                    forced = bool(tools[r].forced)
                    token = tools[r].forced.popleft() if forced else sampled[r]
                    tools[r].observe(token)
                    if not forced and token in self.stop_ids:
                        running[r] = False
                    last[r] = token
                    emitted[r] = (token, forced)
                yield emitted
                if not any(running) or step == max_new_tokens - 1:
                    break
                # Finished rows are fed their last token again; their outputs are never read.
                nxt = torch.tensor(last, dtype=torch.long, device=device)
                step_coords = coord_state.step(nxt).unsqueeze(1) if coord_state is not None else None
                logits = model(nxt.unsqueeze(1), coords=step_coords, kv_cache=cache)[:, -1]
        finally:
            model.train(was_training)


# --------------------------------------------------------------------------- reference

@torch.no_grad()
@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
                     coords: CoordinateCalculator | None = None, stop_ids: Collection[int] = (),
                     window: int | None = None) -> list[int]:
    """Greedy decoding by full recomputation (no cache, no tools): the slow, obvious oracle for
    :meth:`Engine.generate` at temperature 0, and the short samples training logs. With
    ``window`` the model sees only that many newest tokens. Stops after a token in ``stop_ids``."""
    device = model.get_device()
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        seen = ids if window is None else ids[:, -window:]
        c = coords(seen) if model.config.use_coordinates else None
        nxt = int(model(seen, coords=c)[0, -1].argmax())
        out.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return out


def greedy_text(model: torch.nn.Module, tokenizer, coords: CoordinateCalculator | None, prompt: str,
                max_new_tokens: int = 32) -> str:
    """``prompt`` and its greedy continuation as text (the samples training logs)."""
    ids = tokenizer.encode(prompt, prepend="<|bos|>")
    new = greedy_reference(model, ids, max_new_tokens, coords, window=model.config.sequence_len)
    return tokenizer.decode(ids[1:] + new)
