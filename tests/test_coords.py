"""Hierarchical coordinates against a slow, obvious per-token reference loop."""

from __future__ import annotations

import pytest
import torch

from rdn.coords import CoordinateCalculator, bracket_deltas, hierarchical_coordinates


def reference_coordinates(row: list[int], deltas: list[int], bos_id: int, n_dim: int) -> list[list[int]]:
    """The contract in docs/design.md, written as the plain loop it describes."""
    depth, counter, out = 0, [0] * n_dim, []
    for tok in row:
        coord = [0] * n_dim
        if tok == bos_id:
            depth, counter = 0, [0] * n_dim
        else:
            depth = max(0, depth + deltas[tok])
            d = min(depth, n_dim - 1)
            coord[d] = counter[d]
            counter[d] += 1
        out.append(coord)
    return out


def _check(ids: torch.Tensor, deltas: torch.Tensor, bos: int, n_dim: int) -> None:
    got = hierarchical_coordinates(ids, deltas, bos, n_dim)
    assert got.shape == (*ids.shape, n_dim) and got.dtype == torch.long
    rows = ids.view(-1, ids.shape[-1]).tolist()
    want = torch.tensor([reference_coordinates(r, deltas.tolist(), bos, n_dim) for r in rows])
    assert torch.equal(got.view(-1, ids.shape[-1], n_dim), want)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n_dim", [1, 2, 4, 8])
def test_random_rows_match_reference(seed, n_dim):
    g = torch.Generator().manual_seed(seed)
    V, bos = 40, 0
    # deltas in [-3, 3] (multi-bracket tokens), many closers -> unmatched closers are common
    deltas = torch.randint(-3, 4, (V,), generator=g)
    deltas[bos] = 5  # BOS's table entry must be ignored
    ids = torch.randint(1, V, (6, 257), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.03] = bos  # several documents per row, some rows none
    ids[0, 0] = bos
    _check(ids, deltas, bos, n_dim)


def test_deep_nesting_past_n_dim_and_leading_closers():
    # vocab: 0 BOS, 1 "(", 2 ")", 3 "x", 4 "((", 5 "))", 6 "()"
    deltas = torch.tensor([0, 1, -1, 0, 2, -2, 0])
    row = [2, 2, 3, 1, 3] + [4] * 6 + [3, 3, 6] + [5] * 5 + [0, 3, 1, 3, 2, 2, 2, 3]
    _check(torch.tensor([row]), deltas, 0, 4)
    # hand-checked start: two unmatched closers stay at depth 0, counting 0, 1, then "x" is 2
    coords = hierarchical_coordinates(torch.tensor(row), deltas, 0, 4)
    assert coords[:3, 0].tolist() == [0, 1, 2]
    assert coords[3].tolist() == [0, 0, 0, 0]  # "(" -> depth 1, first token there
    assert coords[4].tolist() == [0, 1, 0, 0]


def test_bos_resets_documents_and_gets_zero():
    deltas = torch.tensor([0, 1, -1, 0])
    row = torch.tensor([1, 1, 3, 0, 3, 3])  # depth 2 before BOS; after it the doc starts at 0
    c = hierarchical_coordinates(row, deltas, 0, 3)
    assert c[3].tolist() == [0, 0, 0]
    assert c[4].tolist() == [0, 0, 0] and c[5].tolist() == [1, 0, 0]


def test_batched_equals_row_by_row_and_calculator_interface():
    g = torch.Generator().manual_seed(3)
    deltas = torch.randint(-2, 3, (30,), generator=g)
    ids = torch.randint(0, 30, (4, 64), generator=g)
    calc = CoordinateCalculator(deltas, bos_id=0, n_dim=8)
    batch = calc(ids)
    for b in range(4):
        assert torch.equal(batch[b], calc(ids[b]))
    assert torch.equal(batch, hierarchical_coordinates(ids, deltas, 0, 8))


def test_works_under_torch_compile():
    deltas = torch.tensor([0, 1, -1, 0, 2])
    ids = torch.randint(0, 5, (2, 32), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(hierarchical_coordinates, backend="eager", fullgraph=True)
    assert torch.equal(compiled(ids, deltas, 0, 4), hierarchical_coordinates(ids, deltas, 0, 4))


class _FakeTokenizer:
    """Ids whose texts are given directly: an oracle independent of BPE training."""

    def __init__(self, texts: list[str], special: dict[str, int]):
        self.texts, self.special_ids, self.vocab_size = texts, special, len(texts)

    def id_bytes(self, i: int) -> bytes:
        return self.texts[i].encode()


def test_bracket_deltas_counts_net_brackets_and_ignores_specials():
    texts = ["<|bos|>", "((", "()", "))", "x", "[{", "}]>", "<", "a(b", "«"]
    tok = _FakeTokenizer(texts, {"<|bos|>": 0})
    d = bracket_deltas(tok, ["()", "[]", "{}", "<>"])
    assert d.tolist() == [0, 2, 0, -2, 0, 2, -3, 1, 1, 0]
    assert bracket_deltas(tok, ["()"]).tolist() == [0, 2, 0, -2, 0, 0, 0, 0, 1, 0]


def test_bracket_deltas_on_a_real_tokenizer(tmp_path):
    from rdn.config import DataConfig, TokenizerConfig
    from rdn.data import build_corpus, iter_documents
    from rdn.tokenizer import Tokenizer, train_tokenizer

    build_corpus(DataConfig(source="stdlib", include_tests=False, max_total_bytes=1_500_000), tmp_path / "d",
                 seed=0, root=tmp_path)
    train_tokenizer(TokenizerConfig(vocab_size=1024, max_chars=1_000_000), iter_documents(tmp_path / "d", "train"),
                    list(iter_documents(tmp_path / "d", "val"))[:5], tmp_path / "t")
    tok = Tokenizer.load(tmp_path / "t")
    d = bracket_deltas(tok)
    for i in range(tok.vocab_size):
        if i in tok.special_ids.values():
            assert d[i] == 0
            continue
        text = tok.hf.decode([i])  # HF's own decoding as the oracle for the token text
        if "\ufffd" in text:
            continue  # a partial UTF-8 sequence: no whole bracket characters in it
        want = sum(text.count(c) for c in "([{<") - sum(text.count(c) for c in ")]}>")
        assert d[i] == want, (i, text)
    assert (d > 0).any() and (d < 0).any()
    # coordinates of real code match the reference loop
    ids = torch.tensor(tok.encode("def f(a, b=[1, {2: (3)}]):\n    return g(h(a)[0])", prepend="<|bos|>"))
    got = hierarchical_coordinates(ids, d, tok.bos_id, 4)
    assert got.tolist() == reference_coordinates(ids.tolist(), d.tolist(), tok.bos_id, 4)
