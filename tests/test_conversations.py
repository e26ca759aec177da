"""Conversation rows for mid-training (cropped, no padding) and SFT (padded, never cropped)."""

from __future__ import annotations

import random

import pytest
import torch

from rdn.data.conversations import ConversationRows, MixedRows

BOS = 0


def _items(n: int, seed: int = 0, max_len: int = 40) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, max_len)
        ids = [BOS] + [100 + i] * (length - 1)          # every item has its own token value
        mask = [0] + [rng.randint(0, 1) for _ in range(length - 1)]
        out.append((ids, mask))
    return out


def test_sft_rows_hold_whole_conversations_padded_with_masked_positions():
    items = _items(50, max_len=30)
    rows = ConversationRows(items, batch_size=4, seq_len=31, bos_id=BOS, crop=False, loop=False)
    seen = []
    for ids, mask, _ in rows:
        assert ids.shape == (4, 32) and mask.shape == (4, 32)
        for r, m in zip(ids.tolist(), mask.tolist()):
            assert r[0] == BOS
            i = 0
            while i < len(r):  # walk segments: each is one whole item or the padding tail
                if r[i] == BOS and i + 1 < len(r) and r[i + 1] >= 100:
                    item = r[i + 1] - 100
                    ids_i, mask_i = items[item]
                    assert r[i:i + len(ids_i)] == ids_i and m[i:i + len(ids_i)] == mask_i  # never cropped
                    seen.append(item)
                    i += len(ids_i)
                else:  # padding: BOS tokens with no loss, to the end of the row
                    assert set(r[i:]) == {BOS} and not any(m[i:])
                    break
    assert len(seen) == len(set(seen))  # no conversation twice in one pass


def test_sft_truncates_overlong_items_once_and_counts_them():
    items = [([BOS] + [7] * 100, [0] + [1] * 100), ([BOS, 8, 8], [0, 1, 1])]
    rows = ConversationRows(items, batch_size=1, seq_len=15, bos_id=BOS, crop=False)
    assert rows.truncated == 1


def test_sft_drops_items_truncated_before_any_supervised_token():
    long_prompt = ([BOS] + [7] * 40 + [9, 9], [0] * 41 + [1, 1])  # the answer lies beyond seq_len + 1
    rows = ConversationRows([long_prompt, ([BOS, 8, 8], [0, 1, 1])], batch_size=2, seq_len=15, bos_id=BOS,
                            crop=False)
    assert rows.unsupervised == 1 and rows.truncated == 1
    for _ in range(3):  # every row still has a target: no micro-batch can have an empty (NaN) mean loss
        ids, mask, _ = next(rows)
        assert mask.sum(dim=1).min() > 0 and 7 not in ids.tolist()[0]
    with pytest.raises(ValueError, match="supervised token within seq_len"):
        ConversationRows([long_prompt], batch_size=1, seq_len=15, bos_id=BOS, crop=False)


def test_mid_rows_crop_without_padding_and_lose_nothing():
    items = _items(30, seed=1, max_len=60)
    rows = ConversationRows(items, batch_size=2, seq_len=47, bos_id=BOS, crop=True, loop=False, buffer_items=8)
    counts = torch.zeros(200, dtype=torch.long)
    for ids, mask, _ in rows:
        assert ids.shape == (2, 48) and (ids[:, 0] == BOS).all()
        counts += torch.bincount(ids.flatten(), minlength=200)
    for _, _, item, start, end in rows._buffer:  # what is still buffered at the end of the pass
        counts[100 + item] += end - start
    for i, (ids, _) in enumerate(items):
        # every token of every item was emitted or is still buffered, except the final partial batch
        assert counts[100 + i] <= len(ids) - 1
    assert counts[100:130].sum() >= sum(len(ids) - 1 for ids, _ in items) - 2 * 48


def test_resume_is_exact_for_conversations_and_the_mixture(tiny_artifacts):
    from rdn.data.loader import PackedRows
    from rdn.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_artifacts[1])
    items = [([tok.bos_id] + ids, [0] + [1] * len(ids)) for ids in
             tok.encode_batch([f"question {i}: " + "x" * (i % 37) for i in range(80)])]

    def make(state=None):
        conv = ConversationRows(items, 2, 64, tok.bos_id, crop=True, seed=3,
                                state=None if state is None else state["conversations"])
        text = PackedRows(tok, tiny_artifacts[0], "train", 2, 64, seed=3,
                          state=None if state is None else state["text"])
        return MixedRows(text, conv, 0.5, seed=3, state=state)

    straight = make()
    batches = [next(straight) for _ in range(30)]
    resumed = make(batches[11][2])
    for j in range(12, 30):
        ids, mask, _ = next(resumed)
        assert torch.equal(ids, batches[j][0]) and torch.equal(mask, batches[j][1])
    # both sources appear, at about the requested fraction
    text_rows = sum(int(m.all()) for b in batches for m in b[1])
    assert 15 <= text_rows <= 45
