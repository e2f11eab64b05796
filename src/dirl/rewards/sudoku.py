"""Sudoku reward: cell accuracy of the predicted grid on the puzzle's empty cells.

Columns: ``puzzle`` (row-major string, ``0`` or ``.`` = empty) and ``solution`` (row-major
digits). Any square size n*n with n <= 9 works (n = sqrt(len)); validity checks need n to be a
perfect square too (boxes of sqrt(n) x sqrt(n)), e.g. 4x4 grids with 2x2 boxes.

Grid extraction (``extract_sudoku_grid``), chosen to survive reasoning text around the grid:

1. region: the content of the last ``<answer>...</answer>``, else of the last ``\\boxed{}``, else
   the whole completion;
2. "row 1"/"column 2" labels are blanked (their digits are not cells);
3. the region is split at letters into segments (a grid is written with digits, spaces and
   punctuation, not words); the LAST segment with at least n*n digits gives the grid as its LAST
   n*n digits. This skips stray digits after the grid ("...1324. All 4 rows check out" keeps
   the grid, where "last 16 digits of the text" would swallow the 4);
4. failing that, the last n*n digits of the whole region; fewer digits means no grid (0.0).

Reward = (correct empty cells - changed clue cells, floored at 0) / empty cells. It is 1.0
exactly when the predicted grid equals the solution: changing a given clue costs a cell. A
puzzle with no empty cell scores 1.0 iff the grid equals the solution. A row with no puzzle or
solution scores None.
"""

from __future__ import annotations

import math
import re
from typing import Any

from dirl.rewards.math import extract_last_boxed
from dirl.rewards.registry import register
from dirl.rewards.scoring import completion_text

__all__ = ["extract_sudoku_grid", "sudoku_cell_accuracy", "sudoku_is_valid", "sudoku_reward"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ROW_COLUMN_LABEL = re.compile(r"(?i)\b(?:row|col(?:umn)?|r|c)\s*#?\s*\d")
_LETTERS = re.compile(r"[A-Za-z]+")
_EMPTY_CELL_MARKS = "0."


def sudoku_is_valid(grid: str) -> bool:
    """Whether ``grid`` is a complete valid sudoku: every row, column and box holds 1..n once."""
    size = math.isqrt(len(grid))
    box = math.isqrt(size)
    if size == 0 or size * size != len(grid) or box * box != size or size > 9:
        return False
    expected = {str(d) for d in range(1, size + 1)}
    rows = [grid[r * size:(r + 1) * size] for r in range(size)]
    columns = ["".join(row[c] for row in rows) for c in range(size)]
    boxes = [
        "".join(rows[r][c] for r in range(br, br + box) for c in range(bc, bc + box))
        for br in range(0, size, box)
        for bc in range(0, size, box)
    ]
    return all(set(unit) == expected and len(unit) == size for unit in rows + columns + boxes)


def extract_sudoku_grid(completion: str, cells: int = 16) -> str | None:
    """The predicted grid as a string of ``cells`` digits, or None (see module docstring)."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        region = tags[-1]
    else:
        boxed = extract_last_boxed(completion)
        region = boxed if boxed is not None else completion
    region = _ROW_COLUMN_LABEL.sub(" ", region)
    for segment in reversed(_LETTERS.split(region)):
        digits = re.sub(r"\D", "", segment)
        if len(digits) >= cells:
            return digits[-cells:]
    digits = re.sub(r"\D", "", region)
    return digits[-cells:] if len(digits) >= cells else None


def sudoku_cell_accuracy(predicted: str, puzzle: str, solution: str) -> float:
    """(correct empty cells - changed clues, floored at 0) / empty cells; see module docstring."""
    if len(predicted) != len(solution) or len(puzzle) != len(solution):
        return 0.0
    empty = [i for i, mark in enumerate(puzzle) if mark in _EMPTY_CELL_MARKS]
    if not empty:
        return 1.0 if predicted == solution else 0.0
    empty_set = set(empty)
    correct = sum(predicted[i] == solution[i] for i in empty)
    # Compare clues with the solution (not the puzzle) so 1.0 means exactly "grid == solution".
    changed_clues = sum(
        predicted[i] != solution[i] for i in range(len(solution)) if i not in empty_set
    )
    return max(0, correct - changed_clues) / len(empty)


def _score_sudoku_completion(completion: str, puzzle: Any, solution: Any) -> float | None:
    """Cell accuracy of one completion; None when the row is not a sudoku row."""
    if puzzle is None or solution is None:
        return None
    puzzle, solution = str(puzzle).strip(), str(solution).strip()
    predicted = extract_sudoku_grid(completion, cells=len(solution))
    if predicted is None:
        return 0.0
    return sudoku_cell_accuracy(predicted, puzzle, solution)


@register("sudoku")
def sudoku_reward(
    completions: list[str], puzzle: list[Any], solution: list[Any], **_columns: Any
) -> list[float | None]:
    """Fraction of the puzzle's empty cells the completion's grid fills correctly."""
    return [
        _score_sudoku_completion(completion_text(completion), row_puzzle, row_solution)
        for completion, row_puzzle, row_solution in zip(completions, puzzle, solution, strict=True)
    ]
