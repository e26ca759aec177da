"""Packing loader: BOS-aligned rows, no padding, nothing lost, exact resume, rank stripes, prefetch."""

from __future__ import annotations

import threading
import traceback
from collections import Counter

import pytest
import torch

from rdn.coords import CoordinateCalculator, hierarchical_coordinates
from rdn.data import iter_documents
from rdn.data.loader import PackedRows, PrefetchLoader, get_dataloader, list_row_groups
from rdn.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_artifacts):
    return Tokenizer.load(tiny_artifacts[1])


def _segments(row: list[int], bos: int) -> list[list[int]]:
    """Split a row at BOS tokens (each segment is what followed one BOS)."""
    out: list[list[int]] = []
    for t in row:
        if t == bos:
            out.append([])
        else:
            out[-1].append(t)
    return out


def test_rows_start_with_bos_have_exact_size_and_are_document_slices(tiny_artifacts, tok):
    data_dir, _ = tiny_artifacts
    B, T = 3, 64
    docs = [tok.encode(d) for d in iter_documents(data_dir, "val")]
    # all documents as one string, one character per token, separated by a non-token char
    corpus = "\U0010ffff".join("".join(map(chr, d)) for d in docs)
    rows = PackedRows(tok, data_dir, "val", B, T, buffer_docs=32, loop=False)
    total_tokens = 0
    for batch, _ in rows:
        assert batch.shape == (B, T + 1) and batch.dtype == torch.long
        for row in batch.tolist():
            assert row[0] == tok.bos_id
            for seg in _segments(row, tok.bos_id):
                # each segment is a contiguous slice of one document (crop remainders included)
                assert "".join(map(chr, seg)) in corpus, seg[:10]
                total_tokens += len(seg)
    leftover = sum(e - s for _, _, _, _, s, e in rows._buffer)
    # nothing lost, nothing duplicated: emitted + still buffered + the final partial batch
    # (not emitted by design) == every document token
    assert total_tokens + leftover + rows.dropped_at_end == sum(len(d) for d in docs)


def test_best_fit_fills_rows_without_cropping_when_something_fits(tiny_artifacts, tok):
    """With a large buffer most rows close exactly with a whole piece: count crops via the
    requeue counter (serial grows by one per requeued remainder beyond the pieces read)."""
    data_dir, _ = tiny_artifacts
    rows = PackedRows(tok, data_dir, "train", 4, 256, buffer_docs=128, loop=True)
    for _ in range(20):
        next(rows)
    segs = [len(s) for b in [next(rows)[0] for _ in range(5)] for r in b.tolist() for s in _segments(r, tok.bos_id)]
    assert sum(segs) + len(segs) == 5 * 4 * 257  # every slot is a token or a BOS: no padding


def test_resume_is_exact(tiny_artifacts, tok):
    data_dir, _ = tiny_artifacts
    kw = dict(batch_size=8, seq_len=512, buffer_docs=16, seed=3)
    straight = PackedRows(tok, data_dir, "val", **kw)
    batches = [next(straight) for _ in range(100)]  # past the end of this small split
    assert straight.epoch >= 1
    for k in (0, 9, 90):
        resumed = PackedRows(tok, data_dir, "val", state=batches[k][1], **kw)
        for j in range(k + 1, 100):
            got, _ = next(resumed)
            assert torch.equal(got, batches[j][0]), (k, j)


def test_resume_refuses_mismatched_state(tiny_artifacts, tok):
    data_dir, _ = tiny_artifacts
    _, state = next(PackedRows(tok, data_dir, "train", 2, 128, seed=1))
    with pytest.raises(ValueError, match="seq_len: saved 128, now 64"):
        PackedRows(tok, data_dir, "train", 2, 64, seed=1, state=state)


def test_ranks_read_disjoint_row_groups_covering_the_split(tiny_artifacts, tok):
    data_dir, _ = tiny_artifacts
    n = len(list_row_groups(data_dir, "train"))
    mine = [PackedRows(tok, data_dir, "train", 1, 64, rank=r, world_size=3).mine for r in range(3)]
    assert sorted(g for m in mine for g in m) == list(range(n))
    assert all(set(a).isdisjoint(b) for i, a in enumerate(mine) for b in mine[i + 1:])


def test_device_batches_shift_targets_and_compute_coordinates(tiny_artifacts, tok):
    data_dir, _ = tiny_artifacts
    calc = CoordinateCalculator.from_tokenizer(tok, n_dim=4)
    rdn = get_dataloader(tok, data_dir, "train", 2, 64, coords=calc, prefetch=2, seed=5)
    gpt = get_dataloader(tok, data_dir, "train", 2, 64, coords=None, prefetch=0, seed=5)
    try:
        x, y, cx, cy, state = next(rdn)
        x2, y2, state2 = next(gpt)
    finally:
        rdn.close()
    assert torch.equal(x, x2) and torch.equal(y, y2) and state == state2
    assert torch.equal(x[:, 1:], y[:, :-1])
    full = hierarchical_coordinates(torch.cat([x, y[:, -1:]], 1), calc.deltas, tok.bos_id, 4)
    assert torch.equal(cx, full[:, :-1]) and torch.equal(cy, full[:, 1:])


def _exploding():
    yield 1
    yield 2
    raise RuntimeError("boom in producer")


def test_prefetch_reraises_with_original_traceback_and_stops_cleanly():
    before = threading.active_count()
    loader = PrefetchLoader(_exploding(), depth=1)
    assert next(loader) == 1 and next(loader) == 2
    with pytest.raises(RuntimeError, match="boom in producer") as info:
        next(loader)
    assert "_exploding" in "".join(traceback.format_tb(info.value.__traceback__))
    loader.close()
    assert threading.active_count() == before


def test_prefetch_close_unblocks_a_full_queue_and_keeps_order():
    before = threading.active_count()
    loader = PrefetchLoader(iter(range(1000)), depth=2)
    assert [next(loader) for _ in range(5)] == [0, 1, 2, 3, 4]
    loader.close()  # producer is blocked on a full queue right now
    assert threading.active_count() == before
    with PrefetchLoader(iter(range(50)), depth=3) as pl:
        assert list(pl) == list(range(50))


def test_val_pass_token_counts_match_documents(tiny_artifacts, tok):
    """Counter oracle: the multiset of non-BOS tokens over a whole val pass (plus what is
    left in the buffer) equals the multiset of every val document's tokens."""
    data_dir, _ = tiny_artifacts
    want = Counter(t for d in iter_documents(data_dir, "val") for t in tok.encode(d))
    rows = PackedRows(tok, data_dir, "val", 2, 100, buffer_docs=8, loop=False)
    got = Counter(t for b, _ in rows for t in b.flatten().tolist() if t != tok.bos_id)
    for _, _, g, d, s, e in rows._buffer:
        got.update(rows._doc_tokens[(g, d)][s:e])
    assert sum(want.values()) - sum(got.values()) == rows.dropped_at_end
    assert not (got - want)  # nothing emitted that is not in the documents
