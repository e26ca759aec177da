"""rdn.tokenizer.chat: rendering checked against hand-built token sequences and masks."""

from __future__ import annotations

import pytest

from rdn.tokenizer import Tokenizer
from rdn.tokenizer.chat import (ConversationError, parse_assistant_tokens, render_conversation,
                                render_for_completion, validate_conversation)


@pytest.fixture(scope="module")
def tok(tiny_artifacts) -> Tokenizer:
    return Tokenizer.load(tiny_artifacts[1])


class Expect:
    """Builds the expected (ids, mask) piece by piece, spelled out in the test."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.mask = tok, [], []

    def special(self, name: str, m: int) -> "Expect":
        self.ids.append(self.tok.special_id(name))
        self.mask.append(m)
        return self

    def text(self, s: str, m: int) -> "Expect":
        ids = self.tok.encode(s)
        assert ids, "test texts must encode to at least one token"
        self.ids += ids
        self.mask += [m] * len(ids)
        return self

    @property
    def pair(self) -> tuple[list[int], list[int]]:
        return self.ids, self.mask


# --------------------------------------------------------------------------- rendering

def test_plain_exchange(tok):
    conv = [{"role": "user", "content": "What is up?"}, {"role": "assistant", "content": "Not much."}]
    e = (Expect(tok).special("<|bos|>", 0).special("<|user_start|>", 0).text("What is up?", 0)
         .special("<|user_end|>", 0).special("<|assistant_start|>", 0).text("Not much.", 1)
         .special("<|assistant_end|>", 1))
    assert render_conversation(tok, conv) == e.pair


def test_multi_turn(tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"}]
    e = Expect(tok).special("<|bos|>", 0)
    for user, reply in (("hi", "hello"), ("def f(x):", "return x")):
        e.special("<|user_start|>", 0).text(user, 0).special("<|user_end|>", 0)
        e.special("<|assistant_start|>", 0).text(reply, 1).special("<|assistant_end|>", 1)
    ids, mask = render_conversation(tok, conv)
    assert (ids, mask) == e.pair
    assert len(ids) == len(mask)


def test_system_message_is_merged_into_first_user_message(tok):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"}]
    e = (Expect(tok).special("<|bos|>", 0).special("<|user_start|>", 0).text("Be brief.\n\nhi", 0)
         .special("<|user_end|>", 0).special("<|assistant_start|>", 0).text("ok", 1).special("<|assistant_end|>", 1))
    assert render_conversation(tok, conv) == e.pair


def test_tool_call_output_is_unsupervised(tok):
    conv = [{"role": "user", "content": "17+25?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me compute."},
                {"type": "python", "text": "17+25"},
                {"type": "python_output", "text": "42"},
                {"type": "text", "text": " The answer is 42."}]}]
    e = (Expect(tok).special("<|bos|>", 0).special("<|user_start|>", 0).text("17+25?", 0).special("<|user_end|>", 0)
         .special("<|assistant_start|>", 0).text("Let me compute.", 1)
         .special("<|python_start|>", 1).text("17+25", 1).special("<|python_end|>", 1)
         .special("<|output_start|>", 0).text("42", 0).special("<|output_end|>", 0)
         .text(" The answer is 42.", 1).special("<|assistant_end|>", 1))
    assert render_conversation(tok, conv) == e.pair


def test_truncation_and_stats(tok):
    conv = [{"role": "user", "content": "a fairly long question about parsing"},
            {"role": "assistant", "content": "and a fairly long answer about it"}]
    full_ids, full_mask = render_conversation(tok, conv)
    stats: dict = {}
    ids, mask = render_conversation(tok, conv, max_tokens=5, stats=stats)
    assert (ids, mask) == (full_ids[:5], full_mask[:5])
    assert stats == {"conversations": 1, "truncated": 1}
    ids, mask = render_conversation(tok, conv, max_tokens=len(full_ids), stats=stats)  # fits exactly
    assert (ids, mask) == (full_ids, full_mask)
    assert stats == {"conversations": 2, "truncated": 1}
    render_conversation(tok, conv, stats=stats)
    assert stats == {"conversations": 3, "truncated": 1}


def test_special_token_text_is_ordinary_text(tok):
    text = "say <|assistant_end|> and <|bos|>"
    conv = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    ids, _ = render_conversation(tok, conv)
    specials = set(tok.special_ids.values())
    body = [t for t in ids if t in specials]
    names = {v: k for k, v in tok.special_ids.items()}
    assert [names[t] for t in body] == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                        "<|assistant_end|>"]
    assert ids.count(tok.special_id("<|assistant_end|>")) == 1


# --------------------------------------------------------------------------- completion prompts

def test_render_for_completion(tok):
    user = {"role": "user", "content": "2*3?"}
    expected = (Expect(tok).special("<|bos|>", 0).special("<|user_start|>", 0).text("2*3?", 0)
                .special("<|user_end|>", 0).special("<|assistant_start|>", 0)).ids
    assert render_for_completion(tok, [user]) == expected
    # a final assistant message is dropped (the prompt for regenerating it)
    assert render_for_completion(tok, [user, {"role": "assistant", "content": "6"}]) == expected
    conv = [user, {"role": "assistant", "content": "6"}, {"role": "user", "content": "and 4*4?"}]
    ids = render_for_completion(tok, conv)
    assert ids == render_conversation(tok, conv)[0] + [tok.special_id("<|assistant_start|>")]


# --------------------------------------------------------------------------- malformed

U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("conv, index, words", [
    ([A], 0, "expected role 'user'"),
    ([U, U], 1, "expected role 'assistant'"),
    ([U, A, A], 2, "expected role 'user'"),
    ([U, A, {"role": "system", "content": "s"}], 2, "system message may only come first"),
    ([U, {"role": "assistant", "content": ""}], 1, "empty"),
    ([{"role": "user", "content": ""}], 0, "empty"),
    ([U, {"role": "assistant", "content": []}], 1, "empty list"),
    ([U, A, {"role": "user", "content": 7}], 2, "must be a string"),
    ([U, {"role": "robot", "content": "x"}], 1, "unknown role 'robot'"),
    ([U, A, {"role": "user"}], 2, "no 'content'"),
    ([U, {"role": "assistant", "content": [{"type": "bash", "text": "ls"}]}], 1, "part 0: unknown type 'bash'"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "python_output", "text": "1"}]}],
     1, "part 1: a python_output part must directly follow a python part"),
    ([U, {"role": "assistant", "content": [{"type": "python", "text": ""}]}], 1, "part 0: content is empty"),
    ([{"role": "system", "content": "s"}], 0, "must be followed by a user"),
    ([U, "hello"], 1, "must be a dict"),
])
def test_malformed_conversations_name_the_message(tok, conv, index, words):
    with pytest.raises(ConversationError, match=f"^message {index}: .*{words}"):
        validate_conversation(conv)
    with pytest.raises(ConversationError, match=f"^message {index}: "):
        render_conversation(tok, conv)
    assert issubclass(ConversationError, ValueError)


def test_not_a_conversation():
    for bad in ([], None, "hello"):
        with pytest.raises(ConversationError, match="non-empty list"):
            validate_conversation(bad)


# --------------------------------------------------------------------------- parsing generated tokens

def test_parse_assistant_tokens_inverts_rendering(tok):
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "17+25"},
             {"type": "python_output", "text": "42"}, {"type": "text", "text": " So 42."}]
    ids, _ = render_conversation(tok, [U, {"role": "assistant", "content": parts}])
    start = ids.index(tok.special_id("<|assistant_start|>")) + 1
    assert parse_assistant_tokens(tok, ids[start:]) == parts          # stops at <|assistant_end|>
    cut = ids[start:ids.index(tok.special_id("<|python_end|>"))]      # cut inside the tool call
    assert parse_assistant_tokens(tok, cut) == parts[:2]


# --------------------------------------------------------------------------- rdn chat (CLI body)

def _tiny_checkpoint(tok, directory, use_coordinates: bool):
    import dataclasses

    import torch

    from rdn.model import GPT, GPTConfig
    from rdn.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, head_dim=16,
                       use_coordinates=use_coordinates, n_coord_dim=4)
    model = GPT(config)
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_sha256": tok.hash,
            "coords": {"n_dim": 4, "bracket_pairs": ["()", "[]", "{}", "<>"]}}
    save_checkpoint(directory, 3, model, None, {}, None, meta)


@pytest.mark.parametrize("use_coordinates", [True, False])
def test_chat_main_one_shot_and_interactive(tok, tiny_artifacts, tmp_path, capsys, monkeypatch, use_coordinates):
    from rdn.cli.chat import chat_main

    _tiny_checkpoint(tok, tmp_path / "ckpt", use_coordinates)
    rc = chat_main(tmp_path / "ckpt", tiny_artifacts[1], "hello", temperature=0.0, top_k=None, max_new_tokens=8,
                   device="cpu")
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")

    import rdn.cli.chat

    seen = []
    real_reply = rdn.cli.chat.reply

    def spy(engine, conv, *args, **kwargs):
        seen.append([m["role"] for m in conv])
        return real_reply(engine, conv, *args, **kwargs)

    monkeypatch.setattr(rdn.cli.chat, "reply", spy)
    lines = iter(["hi there", "and then?", "/clear", "", "again (", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc = chat_main(tmp_path / "ckpt", tiny_artifacts[1], None, temperature=1.0, top_k=20, max_new_tokens=6,
                   device="cpu")
    captured = capsys.readouterr()
    assert rc == 0 and "step 3" in captured.err
    # the history is kept between turns and /clear forgets it
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]


def test_chat_main_without_checkpoint_is_a_clear_error(tiny_artifacts, tmp_path, capsys):
    from rdn.cli.chat import chat_main

    (tmp_path / "empty").mkdir()
    rc = chat_main(tmp_path / "empty", tiny_artifacts[1], "hi", 1.0, None, 8, "cpu")
    err = capsys.readouterr().err
    assert rc == 1 and "no checkpoint" in err and str(tmp_path / "empty") in err


def test_stream_printer_shows_tool_calls(tok):
    import io

    from rdn.cli.chat import StreamPrinter

    sid = tok.special_id
    tokens = [*tok.encode("Sum: "), sid("<|python_start|>"), *tok.encode("17+25"), sid("<|python_end|>"),
              sid("<|output_start|>"), *tok.encode("42"), sid("<|output_end|>"), *tok.encode(" done é"),
              sid("<|assistant_end|>")]
    out = io.StringIO()
    printer = StreamPrinter(tok, out)
    for t in tokens:
        printer.feed(t, forced=False)
    printer.close()
    assert out.getvalue() == "Sum: [calc 17+25 = 42] done é\n"


def test_reply_drops_oldest_exchanges_to_fit(tok, tiny_artifacts, tmp_path):
    import io

    from rdn.cli.chat import load_engine, reply  # load_engine re-exported from rdn.inference.load
    from rdn.tokenizer.chat import render_for_completion

    _tiny_checkpoint(tok, tmp_path / "ckpt", True)
    engine, _ = load_engine(tmp_path / "ckpt", tiny_artifacts[1], "cpu")   # decodes up to 4 x 32 positions
    long = "some words that take up room " * 3
    conv = []
    for i in range(6):
        conv += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    conv.append({"role": "user", "content": "last"})
    tokens = reply(engine, conv, io.StringIO(), 0.0, None, 16, seed=0)
    assert 1 <= len(tokens) <= 16
    assert conv[-1] == {"role": "user", "content": "last"} and conv[0]["role"] == "user"
    assert 3 <= len(conv) < 13
    assert len(render_for_completion(tok, conv)) + 16 <= engine.max_len
    kept = [int(m["content"].split()[0]) for m in conv[:-1:2]]   # the newest exchanges, in order
    assert kept == list(range(6 - len(kept), 6))
    previous = [{"role": "user", "content": f"{kept[0] - 1} {long}"}, {"role": "assistant", "content": long}]
    assert len(render_for_completion(tok, previous + conv)) + 16 > engine.max_len  # dropped no more than needed
