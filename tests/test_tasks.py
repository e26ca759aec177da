"""Task families: determinism, disjoint splits, scorers against hand-written replies, the oracles."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdn.tasks import TASKS, get_task
from rdn.tasks.families import minimax, optimal_moves
from rdn.tasks.loaders import load_jsonl_conversations, load_parquet_task
from rdn.tokenizer.chat import validate_conversation
from rdn.tools import calculator


def _reference_reply(conv) -> str:
    content = conv[-1]["content"]
    if isinstance(content, str):
        return content + "<|assistant_end|>"
    out = ""
    for part in content:
        out += {"python": "<|python_start|>{}<|python_end|>", "python_output": "<|output_start|>{}<|output_end|>",
                "text": "{}"}[part["type"]].format(part["text"])
    return out + "<|assistant_end|>"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_disjoint_valid_and_reference_scores_one(name):
    task = get_task(name)
    assert task.generate(50, seed=3) == task.generate(50, seed=3)
    assert task.generate(50, seed=3) != task.generate(50, seed=4)
    n = 800 if name == "spelling" else 2000  # spelling has ~1,800 distinct problems in all
    train = task.generate(n, seed=0, split="train")
    test = task.generate(100, seed=0, split="test")
    keys = lambda convs: {c[-1]["key"] for c in convs}  # noqa: E731
    assert not keys(train) & keys(test)
    assert len(keys(train)) == n
    for conv in train[:300] + test:
        validate_conversation(conv)
        assert task.score(conv, _reference_reply(conv)) == 1.0


def test_get_task_names_the_unknown():
    with pytest.raises(ValueError, match="unknown task 'calc'.*calculator"):
        get_task("calc")


def test_calculator_reference_uses_the_tool_and_scores_only_the_final_text():
    task = get_task("calculator")
    conv = task.generate(1, seed=0)[0]
    expr, out, text = conv[-1]["content"]
    assert out["text"] == calculator(expr["text"]) and float(out["text"]) == conv[-1]["truth"]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "truth": 42.0}]
    s = task.score
    assert s(conv, "The answer is 42.") == 1.0
    assert s(conv, "  The answer is   42 <|assistant_end|>") == 1.0
    assert s(conv, "<|python_start|>40+2<|python_end|><|output_start|>42<|output_end|>The answer is 42.") == 1.0
    assert s(conv, "<|python_start|>40+2<|python_end|><|output_start|>42<|output_end|>I do not know.") == 0.0
    assert s(conv, "The answer is 43.") == 0.0      # off by one
    assert s(conv, "The answer is 24.") == 0.0      # digits swapped
    big = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "truth": 1234.0}]
    assert s(big, "The answer is 1,234.") == 1.0


def test_tictactoe_oracle_on_hand_solved_positions():
    # X to move with X X . on top: playing cell 3 wins at once
    assert optimal_moves("XX.OO....") == [2]
    # O (centre) to move must block X's row: X X . / . O . / . . .
    assert optimal_moves("XX..O....") == [2]
    # ... while with O on an edge every move loses (X forks after the block): all "optimal"
    assert minimax("XX.O.....") == -1 and optimal_moves("XX.O.....") == [2, 4, 5, 6, 7, 8]
    assert minimax(".........") == 0            # perfect play draws
    # X has a fork available: X . . / . O . / . . X ; X to move? (X=2, O=1 -> O to move)
    board = "X...O...X"
    assert minimax(board) == 0 and set(optimal_moves(board)) <= {1, 3, 5, 7}  # O must play an edge
    task = get_task("tictactoe")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "truth": "XX.OO...."}]
    assert task.score(conv, "Play 3.") == 1.0
    assert task.score(conv, "Play 6.") == 0.0      # legal but loses the win
    assert task.score(conv, "Play 1.") == 0.0      # occupied
    assert task.score(conv, "no idea") == 0.0


def _closers(prefix: str) -> str:
    stack = []
    for ch in prefix:
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            stack.pop()
    return "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(stack))


def test_brackets_answer_matches_an_independent_stack():
    task = get_task("brackets")
    for conv in task.generate(300, seed=1):
        prefix = conv[0]["content"].split("\n", 1)[1]
        stripped = prefix.replace("'k'", "")
        assert conv[-1]["truth"] == _closers(stripped)
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "truth": ")]}"}]
    assert task.score(conv, " ) ] }\n") == 1.0
    assert task.score(conv, ")}]") == 0.0


def test_spelling_scores_exactly():
    task = get_task("spelling")
    count = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "truth": "3"}]
    assert task.score(count, "3") == 1.0 and task.score(count, "3.") == 1.0 and task.score(count, "2") == 0.0
    spell = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "truth": "a-p-p-l-e"}]
    assert task.score(spell, "a-p-p-l-e") == 1.0 and task.score(spell, "a-p-l-e") == 0.0


def test_jsonl_loader_names_the_line(tmp_path):
    good = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]'
    bad = '[{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]'
    path = tmp_path / "c.jsonl"
    path.write_text(good + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:3: message 1"):
        load_jsonl_conversations(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
        load_jsonl_conversations(path)
    path.write_text(good + "\n" + '{"messages": ' + good + "}\n")
    assert len(load_jsonl_conversations(path)) == 2


def test_parquet_loaders(tmp_path):
    p = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.table({"question": ["2+2?"], "answer": ["2+2=4\n#### 4"]}), p)
    conv = load_parquet_task(p, "gsm8k")[0]
    assert conv[-1]["truth"] == "4"
    p = tmp_path / "mmlu.parquet"
    pq.write_table(pa.table({"question": ["Sky?"], "choices": [["red", "blue"]], "answer": [1]}), p)
    assert load_parquet_task(p, "mmlu")[0][-1]["truth"] == "B"
    p = tmp_path / "arc.parquet"
    pq.write_table(pa.table({"question": ["?"], "choices": [{"text": ["x", "y"], "label": ["1", "2"]}],
                             "answerKey": ["2"]}), p)
    assert load_parquet_task(p, "arc")[0][-1]["truth"] == "B"
    with pytest.raises(ValueError, match=r"mmlu\.parquet: no column 'answerKey'"):
        load_parquet_task(tmp_path / "mmlu.parquet", "arc")
