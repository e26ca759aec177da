"""rdn.inference.engine: KV-cache decoding against full recomputation, sampling, coordinates, the tool state machine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from rdn.coords import CoordinateCalculator, hierarchical_coordinates
from rdn.inference.engine import Engine, Generation, _CoordinateState, greedy_reference
from rdn.model import GPT, GPTConfig
from rdn.tokenizer import Tokenizer

N_DIM = 4
MODES = {"gpt": False, "rdn": True}


@pytest.fixture(scope="module")
def tok(tiny_artifacts) -> Tokenizer:
    return Tokenizer.load(tiny_artifacts[1])


@pytest.fixture(scope="module")
def calc(tok) -> CoordinateCalculator:
    return CoordinateCalculator.from_tokenizer(tok, n_dim=N_DIM)


@torch.no_grad()
def random_gpt(tok: Tokenizer, use_coordinates: bool, seed: int = 0, never: tuple[str, ...] = ()) -> GPT:
    """A tiny GPT with every parameter random (zero-initialised paths would hide cache bugs):
    window pattern SL with a short window of 8, so sliding-window layers drop keys during decoding.
    ``never``: special tokens whose lm_head row is zeroed, so their logit is 0 and (among 1024
    random logits) never the argmax."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                          head_dim=16, window_pattern="SL", short_window=8, use_coordinates=use_coordinates,
                          n_coord_dim=N_DIM))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "lambdas" in name:
            p.copy_(0.8 + 0.2 * r if name.startswith("resid") else 0.2 * r)
        elif name.startswith("lm_head"):
            p.copy_(2 * r / math.sqrt(p.size(1)))
        elif p.dim() == 2 and "embed" not in name and "wte" not in name:
            p.copy_(r / math.sqrt(p.size(1)))
        else:
            p.copy_(r)
    for name in never:
        model.lm_head.weight[tok.special_id(name)] = 0
    return model.eval()


def prompts_of(tok: Tokenizer) -> list[list[int]]:
    """Prompts of different lengths (two of equal length, to share a prefill batch), with brackets,
    one with a second document (an interior BOS resets the coordinates)."""
    texts = ["def f(x):", "return [g(a), {b: (c", "x = 1", "if (a[0]", "print(len(items))"]
    prompts = [tok.encode(t, prepend="<|bos|>") for t in texts]
    prompts[4] = prompts[4] + tok.encode("((", prepend="<|bos|>")
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) < len(lengths) and len(set(lengths)) > 2, lengths
    return prompts


def engine_for(model, tok, calc) -> Engine:
    return Engine(model, tok, calc if model.config.use_coordinates else None)


# --------------------------------------------------------------------------- greedy == full recomputation

@pytest.mark.parametrize("mode", MODES)
def test_greedy_with_cache_equals_full_recompute(tok, calc, mode):
    model = random_gpt(tok, MODES[mode], never=("<|bos|>", "<|assistant_end|>", "<|python_start|>"))
    engine = engine_for(model, tok, calc)
    prompts = prompts_of(tok)
    new = 30  # past sequence_len (32) for the longer prompts: rotary headroom, clamped coordinates
    out = engine.generate(prompts, num_samples=2, max_new_tokens=new, temperature=0.0)
    assert len(out) == len(prompts) and all(len(gens) == 2 for gens in out)
    for prompt, gens in zip(prompts, out):
        ref = greedy_reference(model, prompt, new, calc if model.config.use_coordinates else None)
        assert len(ref) == new
        for g in gens:
            assert g.tokens == ref
            assert g.mask == [1] * new and not g.finished
            assert g.text == tok.decode(ref)


@pytest.mark.parametrize("mode", MODES)
def test_top_k_1_equals_greedy(tok, calc, mode):
    model = random_gpt(tok, MODES[mode], seed=3)
    engine = engine_for(model, tok, calc)
    prompts = prompts_of(tok)
    greedy = engine.generate(prompts, max_new_tokens=12, temperature=0.0)
    top1 = engine.generate(prompts, num_samples=2, max_new_tokens=12, temperature=0.8, top_k=1, seed=5)
    for g, pair in zip(greedy, top1):
        assert [s.tokens for s in pair] == [g[0].tokens] * 2


# --------------------------------------------------------------------------- sampling

def tokens_of(out: list[list[Generation]]) -> list[list[int]]:
    return [g.tokens for gens in out for g in gens]


@pytest.mark.parametrize("mode", MODES)
def test_sampling_is_deterministic_per_seed(tok, calc, mode):
    model = random_gpt(tok, MODES[mode], seed=1)
    engine = engine_for(model, tok, calc)
    prompts = prompts_of(tok)
    run = lambda seed: tokens_of(engine.generate(prompts, num_samples=3, max_new_tokens=16, temperature=1.0,
                                                 top_k=50, seed=seed))
    first = run(7)
    assert run(7) == first
    assert run(8) != first
    # forks of the same prompt are independent samples, not copies
    assert len({tuple(t) for t in first[:3]}) > 1


@pytest.mark.parametrize("mode", MODES)
def test_samples_fork_one_prefill_and_stay_in_the_top_k(tok, calc, mode):
    """All prompts are prefilled once, in one batch left-padded with <|bos|> (the batch is prompts,
    not samples); every sampled token lies in the top-k of logits recomputed over the full, unpadded
    sequence (so the forked caches hold the prefix and the pads stay invisible)."""
    model = random_gpt(tok, MODES[mode], seed=2)
    engine = engine_for(model, tok, calc)
    prompts = prompts_of(tok)
    prefills = []
    forward = model.forward

    def spy(idx, targets=None, coords=None, kv_cache=None, **kw):
        if kv_cache is not None and kv_cache.pos == 0:
            prefills.append(idx.tolist())
        return forward(idx, targets=targets, coords=coords, kv_cache=kv_cache, **kw)

    model.forward = spy
    k = 3
    out = engine.generate(prompts, num_samples=4, max_new_tokens=10, temperature=1.5, top_k=k, seed=0)
    del model.forward
    width = max(map(len, prompts))
    assert prefills == [[[tok.bos_id] * (width - len(p)) + p for p in prompts]]
    with torch.no_grad():
        for prompt, gens in zip(prompts, out):
            for g in gens:
                seq = torch.tensor([prompt + g.tokens])
                c = calc(seq) if model.config.use_coordinates else None
                logits = model(seq, coords=c)[0, len(prompt) - 1:-1]
                topk = logits.topk(k, dim=-1).indices
                for t, (token, allowed) in enumerate(zip(g.tokens, topk.tolist())):
                    assert token in allowed, (t, token, allowed)


# --------------------------------------------------------------------------- RDN coordinates

def test_rdn_coordinates_during_decoding_equal_full_sequence_coordinates(tok, calc):
    model = random_gpt(tok, True, seed=4)
    engine = Engine(model, tok, calc)
    prompts = prompts_of(tok)
    calls = []
    forward = model.forward

    def spy(idx, targets=None, coords=None, kv_cache=None, **kw):
        calls.append((idx.clone(), coords.clone()))
        return forward(idx, targets=targets, coords=coords, kv_cache=kv_cache, **kw)

    model.forward = spy
    engine.generate(prompts, num_samples=3, max_new_tokens=40, temperature=1.0, seed=11)
    del model.forward
    checked, deep = 0, 0
    seqs = None
    width = max(map(len, prompts))
    for idx, coords in calls:
        if seqs is None or idx.size(1) > 1:   # the prefill: left-padded prompts
            seqs = idx
            for row, p in zip(coords, prompts):  # real tokens get their coordinates as if unpadded
                alone = hierarchical_coordinates(torch.tensor([p]), calc.deltas, tok.bos_id, N_DIM)[0]
                assert torch.equal(row[width - len(p):], alone)
        else:
            if seqs.size(0) != idx.size(0):   # the group was forked for its samples
                seqs = seqs.repeat_interleave(idx.size(0) // seqs.size(0), dim=0)
            seqs = torch.cat([seqs, idx], dim=1)
        expected = hierarchical_coordinates(seqs, calc.deltas, tok.bos_id, N_DIM)[:, -idx.size(1):]
        assert torch.equal(coords, expected)
        checked += 1
        deep += int((coords[:, :, 1:] > 0).any())
    assert checked == 40 and deep > 10  # one prefill + 39 decode steps; tokens really move between depths


def test_incremental_coordinate_state_matches_the_vectorised_rule(tok, calc):
    """Token by token (prompt state from the host loop, the rest from ``step``) against
    ``hierarchical_coordinates`` over the whole rows: random ids rich in brackets, BOS anywhere
    (decoding never feeds BOS to a running row -- it stops it -- so this is where its reset is checked)."""
    g = torch.Generator().manual_seed(0)
    brackets = torch.nonzero(calc.deltas).flatten()
    for trial in range(20):
        B, T, cut = 3, 40, trial % 10 + 1
        ids = torch.randint(0, tok.vocab_size, (B, T), generator=g)
        pick = torch.rand(B, T, generator=g)
        ids = torch.where(pick < 0.5, brackets[torch.randint(len(brackets), (B, T), generator=g)], ids)
        ids = torch.where(pick > 0.93, tok.bos_id, ids)
        expected = hierarchical_coordinates(ids, calc.deltas, tok.bos_id, N_DIM)
        state = _CoordinateState(calc, ids[:, :cut].tolist(), ids.device)
        got = torch.stack([state.step(ids[:, t]) for t in range(cut, T)], dim=1)
        assert torch.equal(got, expected[:, cut:])


def test_engine_requires_coords_for_rdn_models(tok, calc):
    with pytest.raises(ValueError, match="coords"):
        Engine(random_gpt(tok, True), tok)
    with pytest.warns(UserWarning, match="ignored"):
        Engine(random_gpt(tok, False), tok, calc)


def test_bad_arguments(tok):
    engine = Engine(random_gpt(tok, False), tok)
    for kwargs in ({"prompts": []}, {"prompts": [[]]}, {"prompts": [[tok.vocab_size]]}, {"temperature": -1},
                   {"top_k": 0}, {"num_samples": 0}, {"max_new_tokens": 1000}):
        args = {"prompts": [[tok.bos_id]], **kwargs}
        with pytest.raises(ValueError):
            engine.generate(**args)


# --------------------------------------------------------------------------- the tool state machine

class ScriptedModel(nn.Module):
    """A fake model that, after each prompt, emits that prompt's script token by token.

    Its next token is ``script[k]``, ``k`` = the tokens fed after the prompt outside
    ``<|output_start|>``..``<|output_end|>`` spans (which the engine, not the model, writes), so
    forced tool output does not advance the script. It advances the KV cache like a real model."""

    def __init__(self, tok: Tokenizer, scripts: dict[tuple[int, ...], list[int]]):
        super().__init__()
        self.config = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8,
                                head_dim=8, use_coordinates=False)
        self.wte = nn.Embedding(1, 8)
        self.scripts = scripts
        self.span = (tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>"))
        self.rows: list[tuple[tuple[int, ...], list[int]]] = []

    def get_device(self) -> torch.device:
        return self.wte.weight.device

    def _next(self, prompt, fed) -> int:
        k, inside = 0, False
        for t in fed:
            if t == self.span[0]:
                inside = True
            elif t == self.span[1]:
                inside = False
            elif not inside:
                k += 1
        script = self.scripts[prompt]
        return script[k] if k < len(script) else script[-1]

    def forward(self, idx, targets=None, coords=None, kv_cache=None):
        B, T = idx.shape
        if kv_cache.pos == 0:  # the prefill: drop each row's left padding to find its prompt
            mask = kv_cache.key_mask(T)
            pads = [0] * B if mask is None else (~mask).sum(dim=1).tolist()
            self.rows = [(tuple(row[n:]), []) for row, n in zip(idx.tolist(), pads)]
        else:
            reps = B // len(self.rows)  # forked for samples
            self.rows = [(p, list(fed)) for p, fed in self.rows for _ in range(reps)]
            for (_, fed), t in zip(self.rows, idx[:, 0].tolist()):
                fed.append(t)
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b, (prompt, fed) in enumerate(self.rows):
            logits[b, -1, self._next(prompt, fed)] = 30.0
        return logits


def specials(tok, *names):
    return [tok.special_id(n) for n in names]


def test_tool_call_output_is_forced_with_mask_0(tok):
    ps, pe, os_, oe, ae = specials(tok, "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                                   "<|assistant_end|>")
    prompt = tok.encode("1+2?", prepend="<|bos|>") + specials(tok, "<|assistant_start|>")
    script = [ps, *tok.encode("1+2"), pe, *tok.encode("x"), ae]
    engine = Engine(ScriptedModel(tok, {tuple(prompt): script}), tok)
    for temperature in (0.0, 1.0):
        [[g]] = engine.generate([prompt], max_new_tokens=30, temperature=temperature)
        forced = [os_, *tok.encode("3"), oe]
        assert g.tokens == [ps, *tok.encode("1+2"), pe, *forced, *tok.encode("x"), ae]
        assert g.mask == [1] * 5 + [0] * len(forced) + [1, 1]
        assert g.finished
        assert g.text == "<|python_start|>1+2<|python_end|><|output_start|>3<|output_end|>x<|assistant_end|>"
    # the streaming interface yields the same tokens with the forced flags
    assert list(engine.stream(prompt, max_new_tokens=30, temperature=0.0)) == \
        [(t, m == 0) for t, m in zip(g.tokens, g.mask)]


@pytest.mark.parametrize("expression", ["__import__('os').system('echo pwned')", "9**9**9**9", "open('x')", "1/0"])
def test_malicious_or_failing_expressions_become_error_output(tok, expression):
    ps, pe, ae = specials(tok, "<|python_start|>", "<|python_end|>", "<|assistant_end|>")
    prompt = tok.encode("hi", prepend="<|bos|>") + specials(tok, "<|assistant_start|>")
    engine = Engine(ScriptedModel(tok, {tuple(prompt): [ps, *tok.encode(expression), pe, ae]}), tok)
    [[g]] = engine.generate([prompt], max_new_tokens=80, temperature=0.0)
    assert g.finished and g.tokens[-1] == ae
    output = g.text.split("<|output_start|>")[1].split("<|output_end|>")[0]
    assert output.startswith("error: "), output


def test_rows_stop_independently_and_results_keep_prompt_order(tok):
    ae = tok.special_id("<|assistant_end|>")
    a, b, c = (tok.encode(t, prepend="<|bos|>") for t in ("first prompt here", "second", "third one"))
    x, y = tok.encode("x"), tok.encode("y")
    scripts = {tuple(a): [*x, ae, *y], tuple(b): [*y, *y, *y, ae], tuple(c): [*x] * 20}
    engine = Engine(ScriptedModel(tok, scripts), tok)
    out = engine.generate([a, b, c], num_samples=2, max_new_tokens=6, temperature=0.0)
    for gens, (tokens, finished) in zip(out, [([*x, ae], True), ([*y] * 3 + [ae], True), ([*x] * 6, False)]):
        for g in gens:
            assert (g.tokens, g.finished, g.mask) == (tokens, finished, [1] * len(tokens))


def test_bos_also_stops(tok):
    prompt = tok.encode("a", prepend="<|bos|>")
    engine = Engine(ScriptedModel(tok, {tuple(prompt): [*tok.encode("b"), tok.bos_id, *tok.encode("c")]}), tok)
    [[g]] = engine.generate([prompt], max_new_tokens=10, temperature=0.0)
    assert g.finished and g.tokens == [*tok.encode("b"), tok.bos_id]
