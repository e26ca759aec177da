"""Per-step dynamic batching of chat requests over one model: the serving loop of ``rdn serve-chat``.

A :class:`Batcher` owns one :class:`~rdn.inference.engine.Engine` and one thread. Requests
(:class:`Row`, one per requested choice) wait in a FIFO queue; the thread decodes every
running row one token per step in a single forward pass over a left-padded batch, the same
KV-cache layout the engine's own ``generate`` uses. Between two steps it

* **admits** waiting rows: they are prefilled together (one forward over their prompts,
  left-padded to the longest) so that their last prompt token sits at the batch's current
  position ``P`` -- the cache's key mask hides the positions before each prompt, and rotary
  positions are relative, so a row decodes as it would alone -- and their keys/values are
  appended to the batch's cache as new rows;
* **drops** rows that finished (a stop token, their ``max_tokens``) or whose client went away
  (:meth:`Row.cancel`), compacting the cache.

A waiting row joins only when its prompt fits before ``P`` (prompt length <= ``P``) and its
generation fits the rotary table (``P + max_tokens <= positions``); otherwise it waits
until the running rows advance far enough or finish (an idle batch restarts at position
0). Admission is first come, first served: a row that cannot join yet holds back the rows
behind it, so none waits forever.

Each row samples with its own temperature, top-p and ``torch.Generator`` (seeded per
request); temperature 0 is argmax. Tool calls run per row exactly as in the engine: the
calculator's output is forced into that row's stream, one token per step.

Tokens reach the requester through ``Row.sink(event)`` called on the batcher thread:
``("token", id, forced)`` for each token, then one ``("end", reason)`` with reason
``"stop"``, ``"length"`` or ``"cancelled"``, or ``("error", message)`` if the step failed
(every running row gets it; the batcher keeps serving).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from rdn.coords import hierarchical_coordinates
from rdn.inference.engine import Engine, _CoordinateState, _ToolState
from rdn.model.attention import KVCache

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One choice of one request: a prompt and how to sample its continuation."""
    prompt: list[int]
    max_tokens: int
    sink: Callable[[tuple], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0  # tokens emitted so far (counted by the batcher)

    def cancel(self) -> None:
        """Stop generating for this row; the batcher frees its slot before the next step."""
        self.cancelled.set()


class _Running:
    """Per-row decoding state of a row in the batch."""

    def __init__(self, row: Row, engine: Engine, device: torch.device):
        self.row = row
        self.tool = _ToolState(engine.tok)
        self.generator = torch.Generator(device=device).manual_seed(row.seed)
        self.last = 0


class Batcher:
    """Serves :class:`Row` s for one engine from a background thread (module docstring)."""

    def __init__(self, engine: Engine, max_batch: int = 16, name: str = "model"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.engine, self.max_batch, self.name = engine, max_batch, name
        self.context = engine.model.config.sequence_len    # prompt + completion of one row
        self.positions = engine.max_len                      # the rotary table: the batch's span
        self.device = engine.model.get_device()
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._rows: list[_Running] = []
        self._cache: KVCache | None = None
        self._coords: _CoordinateState | None = None
        self._logits: torch.Tensor | None = None
        self._closed = False
        self.steps = 0          # decode steps run (for /health)
        self.tokens = 0         # tokens emitted
        self.max_rows_seen = 0  # the largest batch a step ran with
        self._thread = threading.Thread(target=self._loop, name=f"rdn-batcher-{name}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------- requester side

    def submit(self, rows: list[Row]) -> None:
        """Queue ``rows`` (all choices of one request, admitted in order)."""
        for row in rows:
            if not row.prompt:
                raise ValueError("empty prompt")
            if len(row.prompt) + row.max_tokens > self.context:
                raise ValueError(f"{len(row.prompt)} prompt tokens + max_tokens {row.max_tokens} exceed the "
                                 f"model's context of {self.context} tokens")
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            self._waiting.extend(rows)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._rows), "waiting": len(self._waiting),
                    "position": self._cache.pos if self._cache is not None else 0,
                    "steps": self.steps, "tokens": self.tokens, "max_batch_seen": self.max_rows_seen}

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ----------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._rows and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    for r in self._rows:
                        r.row.sink(("end", "cancelled"))
                    for row in self._waiting:
                        row.sink(("end", "cancelled"))
                    return
                joining = self._admissible()
            try:
                with torch.inference_mode():
                    if joining:
                        self._admit(joining)
                    self._drop_cancelled()
                    if self._rows:
                        self._step()
            except Exception as e:  # a failed step must not take the server down
                log.exception("batcher %s: step failed", self.name)
                for r in self._rows:
                    r.row.sink(("error", f"{type(e).__name__}: {e}"))
                for row in joining:
                    if all(row is not r.row for r in self._rows):
                        row.sink(("error", f"{type(e).__name__}: {e}"))
                self._reset()

    def _admissible(self) -> list[Row]:
        """Waiting rows (FIFO) that can join now; removed from the queue. Caller holds the lock."""
        out: list[Row] = []
        while self._waiting and len(self._rows) + len(out) < self.max_batch:
            row = self._waiting[0]
            if row.cancelled.is_set():
                self._waiting.popleft()
                row.sink(("end", "cancelled"))
                continue
            if self._rows:
                P = self._cache.pos
                if len(row.prompt) > P or P + row.max_tokens > self.positions:
                    break
            else:  # a fresh batch: the joining prompts end at the longest one's length
                P = max(len(r.prompt) for r in [*out, row])
                if any(P + r.max_tokens > self.positions for r in [*out, row]):
                    break
            out.append(self._waiting.popleft())
        return out

    def _reset(self) -> None:
        self._rows, self._cache, self._coords, self._logits = [], None, None, None

    def _admit(self, rows: list[Row]) -> None:
        """Prefill ``rows`` so their prompts end at the batch's position and append them."""
        engine, device = self.engine, self.device
        width = max(len(r.prompt) for r in rows)
        P = self._cache.pos if self._cache is not None else width
        pad = [P - len(r.prompt) for r in rows]
        ids = torch.tensor([[engine.tok.bos_id] * (width - len(r.prompt)) + r.prompt for r in rows],
                           dtype=torch.long, device=device)
        need = max(P + r.max_tokens for r in rows)
        length = max(need, self._cache.max_len if self._cache is not None else 0)
        cache = KVCache.for_model(engine.model, batch_size=len(rows), max_len=length)
        cache.set_padding(pad)
        cache.pos = P - width        # positions before are padding for every joining row
        coords = coord_state = None
        if engine.coords is not None:
            c = engine.coords
            coords = hierarchical_coordinates(ids, c.deltas, c.bos_id, c.n_dim)
            coord_state = _CoordinateState(c, [r.prompt for r in rows], device)
        logits = engine.model(ids, coords=coords, kv_cache=cache)[:, -1]
        new = [_Running(r, engine, device) for r in rows]
        if self._cache is None:
            self._cache, self._coords, self._logits, self._rows = cache, coord_state, logits, new
            return
        old = self._cache
        if old.max_len < length:
            old = _grown(old, length)
        merged = KVCache.__new__(KVCache)
        merged.k = torch.cat([old.k, cache.k], dim=1)
        merged.v = torch.cat([old.v, cache.v], dim=1)
        merged.pos = P
        merged.real = torch.cat([_real(old), _real(cache)], dim=0)
        self._cache = merged
        if coord_state is not None:
            self._coords.depth = torch.cat([self._coords.depth, coord_state.depth])
            self._coords.counters = torch.cat([self._coords.counters, coord_state.counters])
        self._logits = torch.cat([self._logits, logits])
        self._rows = self._rows + new

    def _keep(self, keep: list[int]) -> None:
        """Keep only the batch rows at indices ``keep`` (cache, coordinates, logits)."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.device)
        c = self._cache
        c.k, c.v = c.k.index_select(1, idx), c.v.index_select(1, idx)
        if c.real is not None:
            c.real = c.real.index_select(0, idx)
        if self._coords is not None:
            self._coords.depth = self._coords.depth.index_select(0, idx)
            self._coords.counters = self._coords.counters.index_select(0, idx)
        self._logits = self._logits.index_select(0, idx)
        self._rows = [self._rows[i] for i in keep]

    def _drop_cancelled(self) -> None:
        keep = []
        for i, r in enumerate(self._rows):
            if r.row.cancelled.is_set():
                r.row.sink(("end", "cancelled"))
            else:
                keep.append(i)
        self._keep(keep)

    def _sample(self) -> list[int]:
        logits = self._logits
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, r in enumerate(self._rows):
            t, p = r.row.temperature, r.row.top_p
            if t == 0:
                out.append(greedy[i])
                continue
            probs = torch.softmax(logits[i] / t, dim=-1)
            if p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                # keep the smallest prefix whose mass reaches p (the top token always)
                drop = sorted_p.cumsum(0) - sorted_p >= p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                choice = torch.multinomial(sorted_p, 1, generator=r.generator)
                out.append(int(order[choice]))
            else:
                out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        return out

    def _step(self) -> None:
        """Emit one token per running row, drop finished rows, run the next forward."""
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        sampled = self._sample()
        keep = []
        for i, r in enumerate(self._rows):
            forced = bool(r.tool.forced)
            token = r.tool.forced.popleft() if forced else sampled[i]
            r.tool.observe(token)
            r.row.generated += 1
            r.last = token
            r.row.sink(("token", token, forced))
            self.tokens += 1
            if not forced and token in self.engine.stop_ids:
                r.row.sink(("end", "stop"))
            elif r.row.generated >= r.row.max_tokens:
                r.row.sink(("end", "length"))
            else:
                keep.append(i)
        self.steps += 1
        with self._cond:
            self._keep(keep)
        if not self._rows:
            return
        nxt = torch.tensor([r.last for r in self._rows], dtype=torch.long, device=self.device)
        coords = self._coords.step(nxt).unsqueeze(1) if self._coords is not None else None
        self._logits = self.engine.model(nxt.unsqueeze(1), coords=coords, kv_cache=self._cache)[:, -1]


def _real(cache: KVCache) -> torch.Tensor:
    """The cache's ``[B, max_len]`` real-key mask (all True when nothing is padded)."""
    if cache.real is not None:
        return cache.real
    return torch.ones(cache.batch_size, cache.max_len, dtype=torch.bool, device=cache.k.device)


def _grown(cache: KVCache, length: int) -> KVCache:
    """``cache`` with room for ``length`` positions (zeros appended; the mask extended)."""
    extra = length - cache.max_len
    new = KVCache.__new__(KVCache)
    pad = list(cache.k.shape)
    pad[3] = extra
    new.k = torch.cat([cache.k, cache.k.new_zeros(pad)], dim=3)
    new.v = torch.cat([cache.v, cache.v.new_zeros(pad)], dim=3)
    new.pos = cache.pos
    real = _real(cache)
    new.real = torch.cat([real, real.new_ones(real.size(0), extra)], dim=1)
    return new
