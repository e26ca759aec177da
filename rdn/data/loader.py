"""Training batches from the parquet corpus: BOS-aligned best-fit packing, exact resume.

Pipeline, per rank:

1. **Stream.** Row groups of the split's shards in an order reshuffled each epoch from
   the seed. Each row group's documents are tokenized together through tiktoken's
   threaded batch encoder. (``PackedRows(rank=, world_size=)`` can stripe row groups
   over ranks -- row group ``g`` to rank ``g % world_size`` -- but training does not use
   it: see 5.)
2. **Pieces.** A document's tokens are cut into pieces of at most ``T`` tokens and each
   piece is prefixed with BOS, so every piece fits an empty row of ``T + 1`` tokens.
3. **Best-fit packing.** A row is filled by repeatedly taking the largest buffered piece
   that fits the space left; only when nothing fits is a piece cropped to fill the row,
   and its remainder goes back into the buffer as a new BOS-prefixed piece. Every row
   therefore starts with BOS and no row is padded; no token is dropped.
4. **Device.** Rows go to the device through a pinned buffer with a non-blocking copy;
   hierarchical coordinates are computed there from the ids (:mod:`rdn.coords`).
5. **Ranks.** Under torchrun every rank packs the same global stream and
   :class:`DeviceBatches` keeps batch ``rank`` of each run of ``world_size`` consecutive
   batches. The ranks' batches are disjoint and together are exactly the batches one
   process with the same global batch (gradient accumulation) consumes, so a 2-rank run
   trains on the same tokens as a 1-rank run; every rank's stream state is the same, so
   one saved state resumes all of them, and all ranks reach the end of a finite (eval)
   stream at the same batch -- no rank waits for a batch another never gets. The price is
   that each rank tokenizes and packs the whole stream on the host (cheap next to a GPU
   step at these sizes; pre-tokenized shards would remove it).

**Exact resume.** The state yielded with each batch describes the stream position and
the buffer *by reference* -- (row group, document, token range) per buffered piece --
so it is small, JSON-serialisable, and restoring it re-reads and re-tokenizes just those
documents: the next batch is identical to the one an uninterrupted run would produce.
(nanochat's resume restarts at a row group boundary and so is only approximate.)
"""

from __future__ import annotations

import bisect
import logging
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import torch

from rdn.data.corpus import SPLITS, read_manifest

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class RowGroup:
    shard: str
    index: int  # row group index inside the shard
    rows: int


def list_row_groups(data_dir: str | Path, split: str) -> list[RowGroup]:
    """Every row group of a split, in manifest order (the global numbering ranks stripe over)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    data_dir = Path(data_dir)
    out = []
    for shard in read_manifest(data_dir)["splits"][split]["shards"]:
        meta = pq.ParquetFile(data_dir / split / shard["file"]).metadata
        out.extend(RowGroup(shard["file"], i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups))
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- packing on the host

class PackedRows:
    """Iterator of ``(rows LongTensor[B, T+1], state)`` on the CPU.

    ``loop=True`` (training) cycles over epochs forever; ``loop=False`` (evaluation)
    stops after one pass, emitting only full batches."""

    def __init__(self, tokenizer, data_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 buffer_docs: int = 256, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 loop: bool = True, state: dict | None = None, threads: int = 4):
        if batch_size < 1 or seq_len < 2 or buffer_docs < 1:
            raise ValueError(f"batch_size >= 1, seq_len >= 2, buffer_docs >= 1 required "
                             f"(got {batch_size}, {seq_len}, {buffer_docs})")
        self.tok, self.data_dir, self.split = tokenizer, Path(data_dir), split
        self.B, self.T, self.buffer_docs, self.seed, self.loop, self.threads = batch_size, seq_len, buffer_docs, seed, loop, threads
        self.rank, self.world = (0 if rank is None else rank), (1 if world_size is None else world_size)
        self.groups = list_row_groups(self.data_dir, split)
        self.mine = [g for g in range(len(self.groups)) if g % self.world == self.rank]
        if not self.mine:
            raise ValueError(f"{self.data_dir / split}: {len(self.groups)} row groups cannot feed rank {self.rank} "
                             f"of {self.world}; write smaller row groups (data.row_group_docs)")
        self._files: dict[str, pq.ParquetFile] = {}
        self._cached: tuple[int, list[str]] | None = None  # the row group being read
        self._doc_tokens: dict[tuple[int, int], list[int]] = {}  # (group, doc) -> tokens, while referenced
        # stream position: epoch, position in this epoch's order of my row groups, next doc in that group
        self.epoch, self.order_pos, self.doc_pos = 0, 0, 0
        # buffer: sorted list of (length, serial, group, doc, start, end); a piece is BOS + tokens[start:end]
        self._buffer: list[tuple[int, int, int, int, int, int]] = []
        self._serial = 0
        self.exhausted = False
        self.dropped_at_end = 0  # loop=False: tokens of the final partial batch, which is not emitted
        if state is not None:
            self._restore(state)

    # -- stream
    def _order(self, epoch: int) -> list[int]:
        order = list(self.mine)
        if self.loop:
            random.Random(f"{self.seed}-{self.split}-{epoch}").shuffle(order)
        return order

    def _texts(self, group: int) -> list[str]:
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1]
        rg = self.groups[group]
        pf = self._files.get(rg.shard)
        if pf is None:
            pf = self._files[rg.shard] = pq.ParquetFile(self.data_dir / self.split / rg.shard)
        texts = pf.read_row_group(rg.index, columns=["text"]).column(0).to_pylist()
        self._cached = (group, texts)
        return texts

    def _add_piece(self, group: int, doc: int, start: int, end: int) -> None:
        self._serial += 1
        bisect.insort(self._buffer, (end - start + 1, self._serial, group, doc, start, end))

    def _add_document(self, group: int, doc: int, tokens: list[int]) -> None:
        self._doc_tokens[(group, doc)] = tokens
        for start in range(0, max(len(tokens), 1), self.T):
            self._add_piece(group, doc, start, min(start + self.T, len(tokens)))

    def _refill(self) -> None:
        """Top the buffer up to ``buffer_docs`` pieces from the stream."""
        while len(self._buffer) < self.buffer_docs and not self.exhausted:
            order = self._order(self.epoch)
            if self.order_pos >= len(order):
                if not self.loop:
                    self.exhausted = True
                    return
                self.epoch, self.order_pos, self.doc_pos = self.epoch + 1, 0, 0
                continue
            group = order[self.order_pos]
            texts = self._texts(group)
            take = texts[self.doc_pos:]
            need = max(1, self.buffer_docs - len(self._buffer))
            take = take[:need]
            for offset, ids in enumerate(self.tok.encode_batch(take, num_threads=self.threads)):
                self._add_document(group, self.doc_pos + offset, ids)
            self.doc_pos += len(take)
            if self.doc_pos >= len(texts):
                self.order_pos, self.doc_pos = self.order_pos + 1, 0

    def _take(self, index: int) -> tuple[int, int, int, int]:
        _, _, group, doc, start, end = self._buffer.pop(index)
        return group, doc, start, end

    def _row(self) -> list[int] | None:
        cap = self.T + 1
        row: list[int] = []
        while len(row) < cap:
            self._refill()
            if not self._buffer:
                self.dropped_at_end += sum(t != self.tok.bos_id for t in row)
                return None
            space = cap - len(row)
            # largest piece with length <= space: bisect on (space, +inf)
            i = bisect.bisect_right(self._buffer, (space, float("inf"))) - 1
            if i >= 0:
                group, doc, start, end = self._take(i)
            else:  # nothing fits: crop the smallest piece, requeue its remainder
                group, doc, start, end = self._take(0)
                cut = start + space - 1
                self._add_piece(group, doc, cut, end)
                end = cut
            row.append(self.tok.bos_id)
            row.extend(self._doc_tokens[(group, doc)][start:end])
        self._forget_unreferenced()
        return row

    def _forget_unreferenced(self) -> None:
        live = {(g, d) for _, _, g, d, _, _ in self._buffer}
        for key in [k for k in self._doc_tokens if k not in live]:
            del self._doc_tokens[key]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, dict]:
        rows: list[list[int]] = []
        for _ in range(self.B):
            row = self._row()
            if row is None:
                self.dropped_at_end += sum(t != self.tok.bos_id for r in rows for t in r)
                raise StopIteration
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long), self.state_dict()

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands; passing it back as ``state=`` resumes exactly here."""
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world,
            "seq_len": self.T, "seed": self.seed, "epoch": self.epoch, "order_pos": self.order_pos,
            "doc_pos": self.doc_pos, "serial": self._serial,
            "buffer": [[s, g, d, a, b] for _, s, g, d, a, b in self._buffer],
        }

    def _restore(self, state: dict) -> None:
        expect = {"version": STATE_VERSION, "split": self.split, "rank": self.rank, "world_size": self.world,
                  "seq_len": self.T, "seed": self.seed}
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expect.items() if state.get(k) != v]
        if wrong:
            raise ValueError("loader state does not match this run (" + "; ".join(wrong) + ")")
        self.epoch, self.order_pos, self.doc_pos = state["epoch"], state["order_pos"], state["doc_pos"]
        self._serial = state["serial"]
        needed: dict[int, set[int]] = {}
        for _, g, d, _, _ in state["buffer"]:
            needed.setdefault(g, set()).add(d)
        for group, docs in needed.items():
            texts = self._texts(group)
            docs = sorted(docs)
            for doc, ids in zip(docs, self.tok.encode_batch([texts[d] for d in docs], num_threads=self.threads)):
                self._doc_tokens[(group, doc)] = ids
        self._buffer = sorted((b - a + 1, s, g, d, a, b) for s, g, d, a, b in state["buffer"])


# --------------------------------------------------------------------------- background prefetch

_END = object()


class PrefetchLoader:
    """Run an iterator in a background thread, ``depth`` items ahead.

    An exception in the producer is re-raised in the consumer with its original
    traceback. Nothing is dropped on a timeout: the producer blocks until there is room
    or :meth:`close` is called; close() always joins the thread."""

    def __init__(self, iterable, depth: int = 2):
        self._it = iter(iterable)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="rdn-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._it:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            self._put(e)

    def __iter__(self) -> "PrefetchLoader":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            raise item.with_traceback(item.__traceback__)
        return item

    def close(self) -> None:
        self._stop.set()
        self._done = True
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("prefetch thread did not stop within 30 s")

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not self._done:
            self.close()


# --------------------------------------------------------------------------- onto the device

class DeviceBatches:
    """``(x, y, cx, cy, state)`` (RDN) or ``(x, y, state)`` (GPT mode) on ``device``.

    The source yields ``(rows, state)`` or ``(rows, target_mask, state)``; masked-out
    targets become -1 (ignored by the loss). Host rows are copied through a pinned buffer with ``non_blocking=True`` on CUDA;
    coordinates are computed on the device from the ids, so only ids cross the bus.

    With ``world_size`` > 1 (default: the initialised process group) it takes
    ``world_size`` source batches per call and keeps number ``rank``; the state is the one
    after the last of them, i.e. the same on every rank (module docstring, 5.)."""

    def __init__(self, rows, device: str | torch.device, coords=None, rank: int | None = None,
                 world_size: int | None = None):
        self.rows, self.device, self.coords = rows, torch.device(device), coords
        self._pin = self.device.type == "cuda"
        r, w = dist_info()
        self.rank, self.world = (r if rank is None else rank), (w if world_size is None else world_size)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    def __iter__(self):
        return self

    def _next_host(self):
        if self.world == 1:
            return next(self.rows)
        group = [next(self.rows) for _ in range(self.world)]  # a partial group ends the stream on every rank
        return (*group[self.rank][:-1], group[-1][-1])

    def __next__(self):
        *host, state = self._next_host()  # (rows, state) or (rows, target_mask, state)
        if self._pin:
            host = [t.pin_memory() for t in host]
        rows = host[0].to(self.device, non_blocking=self._pin)
        x, y = rows[:, :-1], rows[:, 1:]
        if len(host) > 1:  # masked targets: -1 is ignored by the loss
            mask = host[1].to(self.device, non_blocking=self._pin)
            y = torch.where(mask[:, 1:], y, torch.full_like(y, -1))
        if self.coords is None:
            return x, y, state
        c = self.coords(rows)
        return x, y, c[:, :-1], c[:, 1:], state

    def close(self) -> None:
        if hasattr(self.rows, "close"):
            self.rows.close()


def get_dataloader(tokenizer, data_dir: str | Path, split: str, batch_size: int, seq_len: int,
                   device: str | torch.device = "cpu", coords=None, state: dict | None = None,
                   buffer_docs: int = 256, seed: int = 0, prefetch: int = 2, loop: bool = True,
                   rank: int | None = None, world_size: int | None = None) -> DeviceBatches:
    """The training/eval loader. ``coords`` is a :class:`rdn.coords.CoordinateCalculator`
    (RDN mode) or None (GPT mode); ``state`` is a value from an earlier batch. ``rank`` and
    ``world_size`` (default: the process group) pick this rank's share of the global stream."""
    r, w = dist_info()
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    rows = PackedRows(tokenizer, data_dir, split, batch_size, seq_len, buffer_docs=buffer_docs, seed=seed,
                      loop=loop, state=state)
    # prefetch counts this rank's batches; each of them takes world_size batches of the source
    source = PrefetchLoader(rows, prefetch * world_size) if prefetch > 0 else rows
    return DeviceBatches(source, device, coords, rank=rank, world_size=world_size)
