"""The four task families: calculator, tictactoe, brackets, spelling."""

from __future__ import annotations

import functools
import random
import re

from rdn.tasks.base import Task, final_text
from rdn.tools import calculator

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


# --------------------------------------------------------------------------- calculator

_NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia", "Noor"]
_ITEMS = ["apples", "books", "coins", "marbles", "stamps", "pencils", "cards", "shells", "stickers", "cookies"]


class CalculatorTask(Task):
    """Arithmetic word problems solved with the calculator tool.

    Reference answer: ``<|python_start|>EXPR<|python_end|><|output_start|>VALUE<|output_end|>``
    then the text ``The answer is VALUE.``; the score reads the last number of the text after
    the tool output."""

    name = "calculator"

    def _problem(self, rng: random.Random):
        who, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = rng.randrange(6)
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if kind == 0:
            q, expr = f"{who} has {a} {item} and gets {b} more. How many {item} does {who} have now?", f"{a}+{b}"
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            q, expr = f"{who} had {a} {item} and gave away {b}. How many {item} are left?", f"{a}-{b}"
        elif kind == 2:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            q, expr = f"There are {a} boxes with {b} {item} in each. How many {item} are there in total?", f"{a}*{b}"
        elif kind == 3:
            b = rng.randint(2, 40)
            a = b * rng.randint(2, 60)
            q, expr = f"{who} shares {a} {item} equally among {b} friends. How many does each friend get?", f"{a}/{b}"
        elif kind == 4:
            c = rng.randint(2, 30)
            q = f"{who} buys {c} packs of {item} with {a % 50 + 2} in each pack, then finds {b} more. How many {item} in all?"
            expr = f"{c}*{a % 50 + 2}+{b}"
        else:
            c = rng.randint(2, 9)
            q = f"What is ({a} - {b}) * {c}?"
            expr = f"({a}-{b})*{c}"
        value = calculator(expr)
        content = [{"type": "python", "text": expr}, {"type": "python_output", "text": value},
                   {"type": "text", "text": f"The answer is {value}."}]
        return q, q, content, float(value)

    def score(self, conversation, reply: str) -> float:
        got = _last_number(final_text(reply))
        truth = self.truth(conversation)
        return float(got is not None and abs(got - truth) <= 1e-6 * max(1.0, abs(truth)))


# --------------------------------------------------------------------------- tictactoe

LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


def winner(board: str) -> str | None:
    for a, b, c in LINES:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return board[a]
    return None


def to_move(board: str) -> str:
    return "X" if board.count("X") == board.count("O") else "O"


@functools.lru_cache(maxsize=None)
def minimax(board: str) -> int:
    """Game value for the side to move: +1 win, 0 draw, -1 loss (perfect play)."""
    if winner(board):
        return -1  # the previous mover won
    moves = [i for i, c in enumerate(board) if c == "."]
    if not moves:
        return 0
    me = to_move(board)
    return max(-minimax(board[:i] + me + board[i + 1:]) for i in moves)


def optimal_moves(board: str) -> list[int]:
    me = to_move(board)
    moves = [i for i, c in enumerate(board) if c == "."]
    values = {i: -minimax(board[:i] + me + board[i + 1:]) for i in moves}
    best = max(values.values())
    return [i for i in moves if values[i] == best]


def render_board(board: str) -> str:
    cells = [c if c != "." else str(i + 1) for i, c in enumerate(board)]
    return "\n".join("|".join(cells[r * 3:r * 3 + 3]) for r in range(3))


class TicTacToeTask(Task):
    """Pick an optimal move (by full minimax) in a reachable, unfinished position.

    Reference answer: ``Play N.``; the score takes the first digit 1-9 of the final text."""

    name = "tictactoe"

    def _problem(self, rng: random.Random):
        while True:
            board = "........."
            for _ in range(rng.randint(0, 6)):
                moves = [i for i, c in enumerate(board) if c == "."]
                i = rng.choice(moves)
                board = board[:i] + to_move(board) + board[i + 1:]
                if winner(board):
                    break
            if not winner(board) and "." in board:
                break
        me = to_move(board)
        move = optimal_moves(board)[0] + 1
        q = (f"Tic-tac-toe, you play {me}. Empty cells are numbered:\n{render_board(board)}\n"
             f"Which cell do you play?")
        return board, q, f"Play {move}.", board

    def score(self, conversation, reply: str) -> float:
        board = self.truth(conversation)
        m = re.search(r"[1-9]", final_text(reply))
        if not m:
            return 0.0
        cell = int(m.group()) - 1
        return float(board[cell] == "." and cell in optimal_moves(board))


# --------------------------------------------------------------------------- brackets

PAIRS = {"(": ")", "[": "]", "{": "}"}
_ATOMS = ["x", "1", "a", "f", "'k'", "2.5", "n", "data", "0", "y"]


class BracketsTask(Task):
    """Close every open bracket of a prefix, innermost first. Reference answer: the closers only."""

    name = "brackets"

    def _problem(self, rng: random.Random):
        depth = rng.randint(1, 8)
        code_like = rng.random() < 0.6
        parts, stack = [], []
        for _ in range(depth):
            opener = rng.choice(list(PAIRS))
            if code_like:
                head = {"(": rng.choice(["f", "g", "len", "print", ""]), "[": rng.choice(["a", "xs", ""]),
                        "{": ""}[opener]
                filler = ", ".join(rng.choice(_ATOMS) for _ in range(rng.randint(0, 2)))
                parts.append(f"{filler}{', ' if filler else ''}{head}{opener}")
            else:
                parts.append(opener)
            stack.append(opener)
            if rng.random() < 0.3:  # a closed group inside: brackets that should not count
                o = rng.choice(list(PAIRS))
                parts.append(f"{o}{rng.choice(_ATOMS) if code_like else ''}{PAIRS[o]}")
        if code_like:
            parts.append(rng.choice(_ATOMS))
        prefix = "".join(parts)
        closing = "".join(PAIRS[o] for o in reversed(stack))
        q = f"Close all open brackets of this text, innermost first. Reply with the closing brackets only.\n{prefix}"
        return prefix, q, closing, closing

    def score(self, conversation, reply: str) -> float:
        got = re.sub(r"\s+", "", final_text(reply))
        return float(got == self.truth(conversation))


# --------------------------------------------------------------------------- spelling

WORDS = """
apple banana cherry orange grape lemon melon peach pear plum strawberry raspberry blueberry mango papaya
table chair window door garden kitchen bottle pencil paper letter number bridge river mountain forest island
ocean desert valley planet rocket engine wheel bicycle train airport station market village city country
doctor teacher farmer pilot artist writer singer dancer baker butcher sailor soldier student scientist
happy quiet brave clever gentle simple bright heavy little yellow purple silver golden wooden careful
balloon button candle cookie dragon feather guitar hammer jacket kettle ladder magnet needle pillow puzzle
rabbit saddle tunnel turtle violin wallet whistle zipper coffee butter cheese bread pepper carrot potato
tomato onion garlic spinach lettuce cabbage pumpkin squirrel elephant giraffe kangaroo penguin dolphin
octopus panther leopard buffalo camel donkey monkey parrot sparrow falcon beetle spider mosquito butterfly
language keyboard computer program function variable library compiler network message question answer
morning evening weekend holiday birthday calendar umbrella sunshine thunder rainbow blizzard volcano
committee mississippi necessary occasion accommodate embarrass millennium recommend tomorrow parallel
""".split()


class SpellingTask(Task):
    """Count a letter in a word, or spell a word with dashes. Scored exactly."""

    name = "spelling"

    def _problem(self, rng: random.Random):
        word = rng.choice(WORDS)
        if rng.random() < 0.5:
            letter = rng.choice(sorted(set(word)) + ["z", "q"]) if rng.random() < 0.9 else rng.choice(word)
            count = word.count(letter)
            q = f"How many times does the letter '{letter}' appear in '{word}'?"
            return f"count:{word}:{letter}", q, f"{count}", str(count)
        q = f"Spell '{word}' letter by letter, separated by dashes."
        spelled = "-".join(word)
        return f"spell:{word}", q, spelled, spelled

    def score(self, conversation, reply: str) -> float:
        got = final_text(reply).strip().rstrip(".").strip().lower()
        return float(got == self.truth(conversation))
