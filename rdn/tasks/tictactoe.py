"""Tic-tac-toe: pick an optimal move in a reachable, unfinished position.

A board is a 9-character string, cells 0-8 row by row, each ``X``, ``O`` or ``.``; X moves
first, so the side to move follows from the counts. The oracle is plain minimax over the
whole game tree (about 5,500 reachable positions, memoised): the value of a position is
+1 / 0 / -1 for the side to move under perfect play.

The user sees the board with empty cells numbered 1-9 (``X|O|3\\n4|X|6\\n7|8|O``) and is
told which side to play. Reference answer: ``"Play N."``, the optimal move that wins
fastest (or, when lost, loses slowest), lowest cell on ties. The score accepts any legal
move that keeps the position's value: the first digit 1-9 of the final text.

Split key: the board's canonical form under the 8 symmetries of the square, so no test
position is a rotation or reflection of a training one.
"""

from __future__ import annotations

import functools
import random
import re

from rdn.tasks.base import Problem, Task, final_text, last_user_text

EMPTY = "........."
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
# The 8 symmetries of the square as cell permutations: new[i] = old[perm[i]].
_ROTATE = (6, 3, 0, 7, 4, 1, 8, 5, 2)
_MIRROR = (2, 1, 0, 5, 4, 3, 8, 7, 6)
ANSWER_PHRASE = "Play {}."


# --------------------------------------------------------------------------- the game

def winner(board: str) -> str | None:
    """``X`` or ``O`` if that side has three in a line, else None."""
    for a, b, c in LINES:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return board[a]
    return None


def to_move(board: str) -> str:
    return "X" if board.count("X") == board.count("O") else "O"


def is_over(board: str) -> bool:
    return winner(board) is not None or "." not in board


def legal_moves(board: str) -> list[int]:
    """Empty cells (0-8) of an unfinished game; none once someone has won or the board is full."""
    return [] if is_over(board) else [i for i, c in enumerate(board) if c == "."]


def play(board: str, cell: int) -> str:
    assert board[cell] == ".", f"cell {cell} of {board} is taken"
    return board[:cell] + to_move(board) + board[cell + 1:]


@functools.lru_cache(maxsize=None)
def _solve(board: str) -> tuple[int, int, int | None]:
    """(value for the side to move, plies to the end under the preferred line, preferred move)."""
    if winner(board):
        return -1, 0, None  # the side that just moved has won
    moves = legal_moves(board)
    if not moves:
        return 0, 0, None
    best = None
    for cell in moves:
        value, plies, _ = _solve(play(board, cell))
        value, plies = -value, plies + 1
        rank = (value, -plies if value > 0 else plies)  # win soon, lose late; first cell wins ties
        if best is None or rank > best[0]:
            best = (rank, value, plies, cell)
    return best[1], best[2], best[3]


def game_value(board: str) -> int:
    """+1 if the side to move wins with perfect play, 0 for a draw, -1 if it loses."""
    return _solve(board)[0]


def optimal_moves(board: str) -> list[int]:
    """Every legal move (0-8) that keeps the position's game value."""
    value = game_value(board)
    return [cell for cell in legal_moves(board) if -game_value(play(board, cell)) == value]


def best_move(board: str) -> int:
    """The reference move (0-8): optimal, fastest win / slowest loss, lowest cell on ties."""
    move = _solve(board)[2]
    if move is None:
        raise ValueError(f"no move in a finished game: {board}")
    return move


@functools.lru_cache(maxsize=1)
def reachable_positions() -> tuple[str, ...]:
    """Every position reachable by alternating play from the empty board with the game not over."""
    seen, frontier = {EMPTY}, [EMPTY]
    while frontier:
        nxt = []
        for board in frontier:
            for cell in legal_moves(board):
                child = play(board, cell)
                if child not in seen:
                    seen.add(child)
                    nxt.append(child)
        frontier = nxt
    return tuple(sorted(b for b in seen if not is_over(b)))


def canonical_board(board: str) -> str:
    """The smallest of the board's 8 rotations and reflections."""
    forms, current = [], board
    for _ in range(4):
        current = "".join(current[i] for i in _ROTATE)
        forms += [current, "".join(current[i] for i in _MIRROR)]
    return min(forms)


# --------------------------------------------------------------------------- text

def render_board(board: str) -> str:
    cells = [c if c != "." else str(i + 1) for i, c in enumerate(board)]
    return "\n".join("|".join(cells[r * 3:r * 3 + 3]) for r in range(3))


_ROW = re.compile(r"^([XO1-9])\|([XO1-9])\|([XO1-9])$", re.MULTILINE)


def parse_board(text: str) -> str:
    """The board in a question (the last three ``a|b|c`` rows); ValueError if there is none."""
    rows = _ROW.findall(text)
    if len(rows) < 3:
        raise ValueError("no tic-tac-toe board (three rows like 'X|O|3') in the question")
    cells = [c for row in rows[-3:] for c in row]
    for i, c in enumerate(cells):
        if c not in "XO" and c != str(i + 1):
            raise ValueError(f"cell {i + 1} of the board is numbered {c}")
    board = "".join(c if c in "XO" else "." for c in cells)
    if board.count("X") - board.count("O") not in (0, 1):
        raise ValueError(f"not a position of alternating play with X first: {board}")
    return board


_QUESTIONS = (
    "We are playing tic-tac-toe and you are {me}. Empty cells are numbered:\n{board}\nWhich cell do you play?",
    "Tic-tac-toe, {me} to move. The empty cells show their numbers:\n{board}\nWhat is the best move for {me}?",
    "Here is a tic-tac-toe position (empty cells numbered 1-9):\n{board}\n"
    "It is {me}'s turn. Which cell should {me} take?",
)


# --------------------------------------------------------------------------- the task

class TicTacToeTask(Task):
    """Choose a minimax-optimal move; any move that keeps the game value scores 1."""

    name = "tictactoe"

    def sample(self, rng: random.Random) -> Problem:
        by_ply = _positions_by_ply()
        board = rng.choice(by_ply[rng.randrange(len(by_ply))])  # plies uniform: early and late games alike
        question = rng.choice(_QUESTIONS).format(me=to_move(board), board=render_board(board))
        return Problem(canonical_board(board), board, question, ANSWER_PHRASE.format(best_move(board) + 1))

    def key(self, conversation: list[dict]) -> str:
        return canonical_board(parse_board(last_user_text(conversation)))

    def score(self, conversation: list[dict], reply: str) -> float:
        board = parse_board(last_user_text(conversation))
        digit = re.search(r"[1-9]", final_text(reply))
        if digit is None:
            return 0.0
        cell = int(digit.group()) - 1
        return float(board[cell] == "." and cell in optimal_moves(board))


@functools.lru_cache(maxsize=1)
def _positions_by_ply() -> tuple[tuple[str, ...], ...]:
    plies: dict[int, list[str]] = {}
    for board in reachable_positions():
        plies.setdefault(9 - board.count("."), []).append(board)
    return tuple(tuple(plies[p]) for p in sorted(plies))
