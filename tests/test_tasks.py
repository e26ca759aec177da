"""Task families and loaders, checked against independent oracles and hand-written replies.

Oracles written here, not imported: a Fraction evaluator for the calculator's expressions,
a bracket stack, the 8 board symmetries, hand-solved tic-tac-toe positions, and replies
typed out by hand (right, off by one, digits swapped, answer only in the tool output...).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdn.config import TASK_NAMES
from rdn.tasks import TASKS, get_task, split_of
from rdn.tasks.calculator import canonical_expression
from rdn.tasks.loaders import (load_jsonl_conversations, load_parquet_task, score_gsm8k,
                               validate_conversation)
from rdn.tasks.spelling import load_words
from rdn.tasks.tictactoe import best_move, game_value, legal_moves, optimal_moves, reachable_positions, winner
from rdn.inference.tools import calculator

N_TRAIN = 2000
N_TEST = 300


def render_reply(message: dict) -> str:
    """An assistant message as the engine would decode it: special-token strings included."""
    content = message["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    fmt = {"text": "{}", "python": "<|python_start|>{}<|python_end|>",
           "python_output": "<|output_start|>{}<|output_end|>"}
    return "".join(fmt[p["type"]].format(p["text"]) for p in parts) + "<|assistant_end|>"


def conv_with_answer(question: str, answer) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def board_of(conv) -> str:
    """The tic-tac-toe board in a question, as 9 cells of X, O and '.'."""
    rows = [ln for ln in conv[0]["content"].splitlines() if re.fullmatch(r"[XO1-9]\|[XO1-9]\|[XO1-9]", ln)]
    assert len(rows) == 3, conv[0]["content"]
    return "".join("." if c.isdigit() else c for ln in rows for c in ln.split("|"))


def problem_identity(name: str, conv) -> tuple:
    """What makes two problems the same, read from the conversation by this test's own rules."""
    question, answer = conv[0]["content"], conv[-1]["content"]
    if name == "calculator":
        return (answer[0]["text"],)
    if name == "tictactoe":
        return (board_of(conv),)
    if name == "brackets":
        return (question.split("\n\n", 1)[1],)
    return ("spell" if "-" in answer else "count", *sorted(re.findall(r"'([a-z]+)'", question), key=len))


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[list, list]]:
    return {name: (task.generate(N_TRAIN, seed=0, split="train"), task.generate(N_TEST, seed=0, split="test"))
            for name, task in TASKS.items()}


# --------------------------------------------------------------------------- the protocol

def test_registry_matches_config_and_rejects_unknown_names():
    assert tuple(TASKS) == TASK_NAMES
    assert all(get_task(name).name == name for name in TASK_NAMES)
    with pytest.raises(ValueError, match=r"unknown task 'calc'.*calculator, tictactoe, brackets, spelling"):
        get_task("calc")


def test_every_task_field_of_the_params_accepts_exactly_the_registered_families():
    """The params take task names from one list; each field that names a task agrees with the
    registry (oracle: the ``name`` of each registered family)."""
    from rdn.config import ChatRLConfig, ChatSFTConfig, EvaluateConfig, MidTrainConfig

    registered = [task.name for task in TASKS.values()]
    assert EvaluateConfig().tasks == registered
    assert EvaluateConfig(tasks=registered).tasks == registered
    for name in registered:
        assert ChatRLConfig(task=name).task == name
        assert MidTrainConfig(tasks={name: 1}).tasks == {name: 1} and ChatSFTConfig(tasks={name: 1}).tasks == {name: 1}
    assert set(MidTrainConfig().tasks) == set(ChatSFTConfig().tasks) == set(registered)
    for bad in (lambda: ChatRLConfig(task="chess"), lambda: EvaluateConfig(tasks=["chess"]),
                lambda: MidTrainConfig(tasks={"chess": 1})):
        with pytest.raises(ValueError, match=".*".join(registered)):  # the message lists every family
            bad()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generation_is_deterministic_per_seed_and_split(name):
    task = get_task(name)
    first = task.generate(40, seed=7)
    assert first == task.generate(40, seed=7)
    assert first != task.generate(40, seed=8)
    assert task.generate(40, seed=7, split="test") != first
    assert task.generate(60, seed=7)[:40] == first          # a longer request extends a shorter one
    with pytest.raises(ValueError, match="split"):
        task.generate(1, seed=0, split="val")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_and_problems_distinct(name, generated):
    task = get_task(name)
    train, test = generated[name]
    assert len(train) == N_TRAIN and len(test) == N_TEST
    train_keys, test_keys = {task.key(c) for c in train}, {task.key(c) for c in test}
    assert not train_keys & test_keys
    assert {split_of(name, k) for k in train_keys} == {"train"} and {split_of(name, k) for k in test_keys} == {"test"}
    for convs in (train, test):   # one problem, however it is phrased, appears once
        assert len({problem_identity(name, c) for c in convs}) == len(convs)
    # another seed draws other problems but never crosses the split
    assert not {task.key(c) for c in task.generate(500, seed=99, split="test")} & train_keys


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_generated_conversation_is_valid_and_its_reference_scores_one(name, generated):
    task = get_task(name)
    for conv in generated[name][0] + generated[name][1]:
        validate_conversation(conv)
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert set(conv[0]) == set(conv[1]) == {"role", "content"}   # plain messages, JSON-safe
        assert task.prompt(conv) == conv[:1]
        assert task.score(conv, render_reply(conv[-1])) == 1.0
    assert json.loads(json.dumps(generated[name][0][:5])) == generated[name][0][:5]


def test_asking_for_more_problems_than_a_family_has_is_an_error():
    with pytest.raises(ValueError, match=r"tictactoe: found only \d+ distinct test problems of the 1000 requested"):
        get_task("tictactoe").generate(1000, seed=0, split="test")   # about 600 test positions exist


def test_prompt_needs_the_reference_answer():
    with pytest.raises(ValueError, match="assistant"):
        get_task("spelling").prompt([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- calculator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def exact_value(expr: str) -> Fraction:
    def ev(node):
        if isinstance(node, ast.Constant):
            return Fraction(str(node.value))
        assert isinstance(node, ast.BinOp) and type(node.op) in _OPS, ast.dump(node)
        return _OPS[type(node.op)](ev(node.left), ev(node.right))
    return ev(ast.parse(expr, mode="eval").body)


def _numbers(text: str) -> set[Fraction]:
    return {Fraction(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}


UNIT_CONSTANTS = {Fraction(60), Fraction(100), Fraction(1000)}  # minutes, percent, metres: not spelled out


def test_calculator_reference_uses_the_tool_and_states_the_true_answer(generated):
    train, test = generated["calculator"]
    shapes = set()
    for conv in train + test:
        (call, output, text) = conv[-1]["content"]
        assert (call["type"], output["type"], text["type"]) == ("python", "python_output", "text")
        expr = call["text"]
        truth = exact_value(expr)
        assert output["text"] == calculator(expr)
        assert Fraction(output["text"]) == truth
        assert text["text"] == f"The answer is {output['text']}."
        assert truth >= 0 and (truth * 100).denominator == 1          # exact, at most two decimals
        assert _numbers(expr) - UNIT_CONSTANTS <= _numbers(conv[0]["content"]), (expr, conv[0]["content"])
        shapes.add(re.sub(r"[\d.]+", "N", expr))
    assert {"N+N", "N-N", "N*N", "N/N", "N*N+N", "(N+N)/N", "N*N+N*N"} <= shapes
    assert max(Fraction(c[-1]["content"][1]["text"]) for c in train) > 1_000_000   # sizes vary
    assert min(Fraction(c[-1]["content"][1]["text"]) for c in train) < 10


def test_calculator_canonical_key_ignores_operand_order_only():
    assert canonical_expression("25+17") == canonical_expression("17+25")
    assert canonical_expression("2*3+4") == canonical_expression("4+3*2")
    assert canonical_expression("5-3") != canonical_expression("3-5")
    assert canonical_expression("8/2") != canonical_expression("2/8")
    assert canonical_expression("3.50*2") == canonical_expression("2*3.5")


def test_calculator_scorer_on_hand_written_replies():
    score = get_task("calculator").score
    conv = conv_with_answer("What is 17 plus 25?", [
        {"type": "python", "text": "17+25"}, {"type": "python_output", "text": "42"},
        {"type": "text", "text": "The answer is 42."}])
    tool = "<|python_start|>17+25<|python_end|><|output_start|>42<|output_end|>"
    assert score(conv, tool + "The answer is 42.<|assistant_end|>") == 1.0
    assert score(conv, "The answer is 42.") == 1.0
    assert score(conv, tool + "  \n The answer is   42 \n<|assistant_end|>") == 1.0
    assert score(conv, tool + "17 + 25 = 42") == 1.0
    assert score(conv, tool + "The answer is 42.0.") == 1.0
    assert score(conv, tool + "The answer is 43.") == 0.0                    # off by one
    assert score(conv, tool + "The answer is 24.") == 0.0                    # digits swapped
    assert score(conv, tool + "The answer is 420.") == 0.0
    assert score(conv, tool + "I am not sure.<|assistant_end|>") == 0.0      # 42 only in the tool output
    assert score(conv, tool) == 0.0
    assert score(conv, "The answer is 42.<|assistant_end|>43") == 1.0        # text after the turn ends is ignored
    assert score(conv, "The answer is 42. <|python_start|>41+1<|python_end|>") == 0.0  # answer must come last
    assert score(conv, "<|python_start|>42") == 0.0                          # cut off inside a tool call
    assert score(conv, "") == 0.0

    big = conv_with_answer("q", [{"type": "python", "text": "1000+234"}, {"type": "python_output", "text": "1234"},
                                 {"type": "text", "text": "The answer is 1234."}])
    assert score(big, "The answer is 1,234.") == 1.0
    assert score(big, "The answer is 1234.") == 1.0
    assert score(big, "The answer is 1,243.") == 0.0
    assert score(big, "The answer is 12,34.") == 0.0
    million = conv_with_answer("q", "The answer is 1000000.")
    assert score(million, "1,000,000") == 1.0
    assert score(million, "1000001") == 0.0          # a relative tolerance must not accept off-by-one
    price = conv_with_answer("q", "The answer is 59.97.")
    assert score(price, "It costs $59.97 in total.") == 1.0
    assert score(price, "59.970000001") == 1.0       # within 1e-6 relative
    assert score(price, "59.98") == 0.0
    assert score(price, "59.79") == 0.0


# --------------------------------------------------------------------------- tictactoe

def test_tictactoe_oracle_on_hand_solved_positions():
    # cells:  0 1 2 / 3 4 5 / 6 7 8
    # X X . / O O . / . . .  X to move: only cell 2 wins (elsewhere O completes its row or draws)
    assert optimal_moves("XX.OO....") == [2] and game_value("XX.OO....") == 1
    # X X . / . O . / . . .  O to move: must block at 2; then it is a draw
    assert optimal_moves("XX..O....") == [2] and game_value("XX..O....") == 0
    # X O . / . X . / . . O  X to move: 3 (threats 5 and 6) and 6 (threats 2 and 3) are forks
    assert optimal_moves("XO..X...O") == [3, 6] and game_value("XO..X...O") == 1
    # X . . / . O . / . . X  O to move: a corner lets X fork; only the edges hold the draw
    assert optimal_moves("X...O...X") == [1, 3, 5, 7] and game_value("X...O...X") == 0
    # X in the centre: O must answer in a corner
    assert optimal_moves("....X....") == [0, 2, 6, 8]
    # empty board: every first move draws
    assert game_value(".........") == 0 and optimal_moves(".........") == list(range(9))
    # X . . / O X O / . . .  X to move: 1, 2, 6, 7 win later, 8 wins now; the reference wins now
    assert optimal_moves("X..OXO...") == [1, 2, 6, 7, 8] and best_move("X..OXO...") == 8
    # finished games: a line of three, or a full board, leaves no legal move
    assert winner("XXX.OO...") == "X" and legal_moves("XXX.OO...") == []
    assert winner("XOXXOOOXX") is None and legal_moves("XOXXOOOXX") == []


def test_tictactoe_positions_are_reachable_unfinished_and_symmetry_split(generated):
    assert len(reachable_positions()) == 4520   # known count of non-terminal reachable positions
    rotate = lambda b: "".join(b[i] for i in (6, 3, 0, 7, 4, 1, 8, 5, 2))  # noqa: E731
    mirror = lambda b: "".join(b[i] for i in (2, 1, 0, 5, 4, 3, 8, 7, 6))  # noqa: E731

    def orbit(b: str) -> set[str]:
        out = set()
        for _ in range(4):
            b = rotate(b)
            out |= {b, mirror(b)}
        return out

    train, test = generated["tictactoe"]
    train_boards = {board_of(c) for c in train}
    for conv in test:
        board = board_of(conv)
        assert not orbit(board) & train_boards
        assert board.count("X") - board.count("O") in (0, 1) and legal_moves(board)
        side = "X" if board.count("X") == board.count("O") else "O"
        assert re.search(rf"you are {side}\.|{side} to move|{side}'s turn", conv[0]["content"])


def test_tictactoe_scorer_on_hand_written_replies():
    score = get_task("tictactoe").score
    conv = conv_with_answer("You are X.\nX|X|3\nO|O|6\n7|8|9\nWhich cell?", "Play 3.")
    assert score(conv, "Play 3.<|assistant_end|>") == 1.0
    assert score(conv, "  3  ") == 1.0
    assert score(conv, "Play 6.") == 0.0          # legal, but throws the win away
    assert score(conv, "Play 1.") == 0.0          # occupied
    assert score(conv, "Play 0.") == 0.0          # no such cell, and no digit 1-9
    assert score(conv, "I would play the corner.") == 0.0
    assert score(conv, "<|python_start|>3<|python_end|><|output_start|>3<|output_end|>Play 7.") == 0.0
    slow = conv_with_answer("You are X.\nX|2|3\nO|X|O\n7|8|9\nWhich cell?", "Play 9.")
    assert score(slow, "Play 2.") == 1.0          # wins more slowly than 9: still optimal
    assert score(slow, "Play 9.") == 1.0


# --------------------------------------------------------------------------- brackets

def stack_closers(text: str) -> str:
    closer = {"(": ")", "[": "]", "{": "}"}
    stack = []
    for ch in text:
        if ch in closer:
            stack.append(ch)
        elif ch in ")]}":
            assert stack and closer[stack.pop()] == ch, text
    return "".join(closer[o] for o in reversed(stack))


def test_brackets_answers_match_an_independent_stack(generated):
    train, test = generated["brackets"]
    depths, code_like = set(), 0
    for conv in train + test:
        prefix = conv[0]["content"].split("\n\n", 1)[1]
        assert conv[-1]["content"] == stack_closers(prefix)
        assert "<" not in prefix and ">" not in prefix
        depths.add(len(conv[-1]["content"]))
        code_like += any(ch.isalnum() for ch in prefix)
    assert depths == set(range(1, 9))
    assert 0.4 < code_like / len(train + test) < 0.9


def test_brackets_scorer_on_hand_written_replies():
    score = get_task("brackets").score
    conv = conv_with_answer("Close them.\n\nf(a[1, {\"k\": (2", ")}])")
    assert stack_closers("f(a[1, {\"k\": (2") == ")}])"
    assert score(conv, ")}])<|assistant_end|>") == 1.0
    assert score(conv, " ) } ] )\n") == 1.0
    assert score(conv, ")]})") == 0.0             # wrong order
    assert score(conv, ")}]") == 0.0              # one short
    assert score(conv, ")}]))") == 0.0            # one too many
    assert score(conv, "The answer is )}])") == 0.0
    assert score(conv, "<|python_start|>x<|python_end|><|output_start|>)}])<|output_end|>") == 0.0


# --------------------------------------------------------------------------- spelling

def test_spelling_words_and_answers(generated):
    words = load_words()
    assert len(words) >= 2500 and len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]{3,}", w) for w in words)
    train, test = generated["spelling"]
    kinds = set()
    for conv in train + test:
        question, answer = conv[0]["content"], conv[-1]["content"]
        quoted = re.findall(r"'([a-z]+)'", question)
        if "-" in answer:
            kinds.add("spell")
            assert answer == "-".join(quoted[0])
        else:
            kinds.add("count")
            letter, word = sorted(quoted, key=len)
            assert answer == str(sum(ch == letter for ch in word))
    assert kinds == {"spell", "count"}
    test_words = {re.findall(r"'([a-z]{3,})'", c[0]["content"])[0] for c in test}
    assert not test_words & {re.findall(r"'([a-z]{3,})'", c[0]["content"])[0] for c in train}


def test_spelling_scorer_on_hand_written_replies():
    score = get_task("spelling").score
    count = conv_with_answer("How many times does the letter 'r' appear in 'strawberry'?", "3")
    assert score(count, "3<|assistant_end|>") == 1.0
    assert score(count, "  3. \n") == 1.0
    assert score(count, "2") == 0.0 and score(count, "4") == 0.0
    assert score(count, "33") == 0.0 and score(count, "three") == 0.0
    assert score(count, "<|python_start|>1+2<|python_end|><|output_start|>3<|output_end|>") == 0.0
    spell = conv_with_answer("Spell 'apple' with dashes.", "a-p-p-l-e")
    assert score(spell, "a-p-p-l-e") == 1.0
    assert score(spell, " a - p - p - l - e \n<|assistant_end|>") == 1.0
    assert score(spell, "a-p-l-e") == 0.0         # a letter dropped
    assert score(spell, "a-p-p-e-l") == 0.0       # letters swapped
    assert score(spell, "apple") == 0.0           # no dashes
    assert score(spell, "A-P-P-L-E") == 0.0       # exact letters, case included


# --------------------------------------------------------------------------- loaders

GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_validate_conversation_names_the_message():
    validate_conversation([{"role": "system", "content": "Be brief."}, *GOOD])
    validate_conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}, {"type": "text", "text": "4"}]}])
    bad = [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"message 1: .*'assistant'.*'user'"),
        ([{"role": "assistant", "content": "a"}], r"message 0: .*'user'"),
        ([{"role": "user", "content": ""}], r"message 0: .*empty"),
        ([{"role": "robot", "content": "a"}], r"message 0: .*'robot'"),
        ([*GOOD, {"role": "system", "content": "late"}], r"message 2: "),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "python_output", "text": "4"}]}],
         r"message 1: part 0"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}],
         r"message 1: part 0: .*'code'"),
    ]
    for conv, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            validate_conversation(conv)


def test_jsonl_loader_reads_lists_and_objects_and_names_the_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({"messages": GOOD, "source": "x"}) + "\n")
    assert load_jsonl_conversations(path) == [GOOD, GOOD]
    cases = [
        (json.dumps([GOOD[0], GOOD[0], GOOD[1]]), r"chat\.jsonl:2: message 1: .*'assistant'.*'user'"),
        ("{not json", r"chat\.jsonl:2: not valid JSON"),
        (json.dumps({"msgs": GOOD}), r"chat\.jsonl:2: .*'messages'"),
        (json.dumps(GOOD[:1]), r"chat\.jsonl:2: message 0: the last message must be the assistant's"),
        (json.dumps([GOOD[0], {"role": "assistant", "content": 5}]), r"chat\.jsonl:2: message 1: .*string"),
    ]
    for line, pattern in cases:
        path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=pattern):
            load_jsonl_conversations(path)
    with pytest.raises(ValueError, match="missing.jsonl: .*not found"):
        load_jsonl_conversations(tmp_path / "missing.jsonl")


def test_gsm8k_parquet_becomes_tool_calls_and_is_scored(tmp_path):
    path = tmp_path / "gsm8k.parquet"
    solution = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72")
    pq.write_table(pa.table({"question": ["How many clips?"], "answer": [solution]}), path)
    (conv,) = load_parquet_task(path, "gsm8k")
    validate_conversation(conv)
    parts = conv[-1]["content"]
    assert [p["text"] for p in parts if p["type"] == "python"] == ["48/2", "48+24"]
    assert [p["text"] for p in parts if p["type"] == "python_output"] == ["24", "72"]
    assert "".join(p["text"] for p in parts if p["type"] == "text").endswith("72 clips altogether.\n#### 72")
    assert score_gsm8k(conv, render_reply(conv[-1])) == 1.0
    assert score_gsm8k(conv, "She sold 72 clips.\n#### 72") == 1.0
    assert score_gsm8k(conv, "#### 72 clips, not 24") == 1.0
    assert score_gsm8k(conv, "So 72") == 1.0
    assert score_gsm8k(conv, "#### 27") == 0.0
    assert score_gsm8k(conv, "#### 71") == 0.0
    assert score_gsm8k(conv, "<|python_start|>48+24<|python_end|><|output_start|>72<|output_end|>no idea") == 0.0


def test_multiple_choice_and_chat_parquet_layouts(tmp_path):
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": ["Sky colour?"], "subject": ["x"],
                             "choices": [["red", "blue", "green", "grey"]], "answer": [1]}), mmlu)
    (conv,) = load_parquet_task(mmlu, "mmlu")
    assert conv[-1]["content"] == "B"
    assert "A. red\nB. blue\nC. green\nD. grey" in conv[0]["content"]
    arc = tmp_path / "arc.parquet"
    pq.write_table(pa.table({"question": ["?"], "choices": [{"text": ["x", "y", "z"], "label": ["1", "2", "3"]}],
                             "answerKey": ["3"]}), arc)
    assert load_parquet_task(arc, "arc")[0][-1]["content"] == "C"
    smol = tmp_path / "smoltalk.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "system", "content": "s"}, *GOOD], GOOD]}), smol)
    assert load_parquet_task(smol, "smoltalk") == [[{"role": "system", "content": "s"}, *GOOD], GOOD]


def test_parquet_loader_errors_name_the_path_column_and_row(tmp_path):
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": ["q", "q"], "choices": [["a", "b"], ["a", "b"]], "answer": [0, 5]}), mmlu)
    with pytest.raises(ValueError, match=r"mmlu\.parquet: missing column 'answerKey'"):
        load_parquet_task(mmlu, "arc")
    with pytest.raises(ValueError, match=r"mmlu\.parquet: row 1: column 'answer': .*\(got 5\)"):
        load_parquet_task(mmlu, "mmlu")
    gsm = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["no final line"]}), gsm)
    with pytest.raises(ValueError, match=r"gsm8k\.parquet: row 0: column 'answer': .*####"):
        load_parquet_task(gsm, "gsm8k")
    smol = tmp_path / "smoltalk.parquet"
    pq.write_table(pa.table({"messages": [GOOD, [GOOD[0], GOOD[0]]]}), smol)
    with pytest.raises(ValueError, match=r"smoltalk\.parquet: row 1: message 1: "):
        load_parquet_task(smol, "smoltalk")
    with pytest.raises(ValueError, match=r"nothere\.parquet: parquet file not found"):
        load_parquet_task(tmp_path / "nothere.parquet", "gsm8k")
    with pytest.raises(ValueError, match=r"unknown parquet task kind 'squad'"):
        load_parquet_task(mmlu, "squad")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file"):
        load_parquet_task(junk, "gsm8k")
