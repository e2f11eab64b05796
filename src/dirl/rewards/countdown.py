"""Countdown reward: reach ``target`` using every number in ``numbers`` exactly once.

Columns: ``numbers`` (list of ints per row) and ``target`` (int per row); a row where either is
None scores None. The candidate expression is the content of the last ``<answer>...</answer>``,
else of the last ``\\boxed{...}``, else the last non-empty line; a trailing ``= target`` is
dropped. It is valid (1.0, else 0.0) iff

* it only contains integer literals, ``+ - * /``, parentheses and whitespace (``×``, ``÷``,
  ``\\times``, ``\\div``, ``\\cdot`` and the unicode minus are accepted as spellings),
* its literals are exactly the given numbers as a multiset, and
* it evaluates EXACTLY (``fractions.Fraction``, so ``7/2*2`` is 7) to the target; division by
  zero makes it invalid.

The expression is parsed with ``ast`` and evaluated by walking a whitelist of node types
(BinOp with + - * /, unary minus, int constants). It is never passed to ``eval``.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from dirl.rewards.math import extract_last_boxed
from dirl.rewards.registry import register
from dirl.rewards.scoring import completion_text

__all__ = [
    "countdown_reward",
    "evaluate_expression",
    "extract_countdown_expression",
    "is_valid_countdown_solution",
    "solve_countdown",
]

# Longer "expressions" are certainly not a few-number countdown answer; the cap also keeps
# ast.parse away from pathological nesting depth.
_MAX_EXPRESSION_CHARS = 300
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ALLOWED_CHARS = re.compile(r"[\d\s+\-*/()]+")
_SPELLINGS = {
    "×": "*", "÷": "/", "−": "-", "–": "-", "·": "*",
    "\\times": "*", "\\div": "/", "\\cdot": "*", "\\left": "", "\\right": "",
    "\\(": "", "\\)": "", "\\[": "", "\\]": "", "$": "",
}
_BINARY_OPERATIONS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,  # Fraction / Fraction: exact; raises ZeroDivisionError on 0
}


def extract_countdown_expression(completion: str, target: Any = None) -> str | None:
    """The candidate expression of a completion (see module docstring), normalised, or None."""
    tags = _ANSWER_TAG.findall(completion)
    region = tags[-1] if tags else completion
    boxed = extract_last_boxed(region)
    if boxed is not None:
        region = boxed
    lines = [line.strip() for line in region.splitlines() if line.strip()]
    if not lines:
        return None
    expression = lines[-1]
    for spelling, replacement in _SPELLINGS.items():
        expression = expression.replace(spelling, replacement)
    parts = [part.strip() for part in expression.split("=")]
    if len(parts) > 1 and target is not None:
        # "expr = target" (or "target = expr"): drop the sides that merely state the target.
        stated = str(target).strip()
        parts = [part for part in parts if part != stated] or [stated]
    if len(parts) != 1:
        return None  # an unrelated equation or a chain of steps is not one expression
    return parts[0].strip().rstrip(".").strip() or None


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and integer literals of an arithmetic expression, or None if not allowed.

    Only digits, whitespace, ``+ - * /`` and parentheses may appear; the parse tree may only hold
    BinOp (+ - * /), unary minus and int constants. Division by zero gives None.
    """
    if len(expression) > _MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS.fullmatch(expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals: list[int] = []
    try:
        value = _evaluate_node(tree.body, literals)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return value, literals


def _evaluate_node(node: ast.AST, literals: list[int]) -> Fraction:
    """Evaluate one whitelisted AST node exactly, recording int literals; ValueError otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) is int:  # bool is an int subclass
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate_node(node.operand, literals)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATIONS:
        left = _evaluate_node(node.left, literals)
        right = _evaluate_node(node.right, literals)
        return _BINARY_OPERATIONS[type(node.op)](left, right)
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def is_valid_countdown_solution(expression: str | None, numbers: list[int], target: Any) -> bool:
    """Whether ``expression`` uses each of ``numbers`` exactly once and equals ``target``."""
    if expression is None:
        return False
    evaluated = evaluate_expression(expression)
    if evaluated is None:
        return False
    value, literals = evaluated
    if Counter(literals) != Counter(int(n) for n in numbers):
        return False
    return value == Fraction(str(target).strip())


def _score_countdown_completion(completion: str, numbers: Any, target: Any) -> float | None:
    """1.0 for a valid solution, 0.0 otherwise; None when the row is not a countdown row."""
    if numbers is None or target is None:
        return None
    expression = extract_countdown_expression(completion, target)
    return 1.0 if is_valid_countdown_solution(expression, list(numbers), target) else 0.0


@register("countdown")
def countdown_reward(
    completions: list[str], numbers: list[Any], target: list[Any], **_columns: Any
) -> list[float | None]:
    """1.0 if the completion's expression reaches ``target`` with each of ``numbers`` once."""
    return [
        _score_countdown_completion(completion_text(completion), row_numbers, row_target)
        for completion, row_numbers, row_target in zip(completions, numbers, target, strict=True)
    ]


# ----------------------------------------------------------------------------- solver


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An expression using every number once with + - * / that equals ``target``, or None.

    Brute force: repeatedly combine any ordered pair of the remaining (value, expression) items
    with any operation. That enumerates every ordering and every parenthesisation; states whose
    multiset of values was already explored are skipped. Fine for the usual 3-6 numbers.
    """
    goal = Fraction(target)
    items = [(Fraction(n), str(n)) for n in numbers]
    return _search(items, goal, set()) if items else None


def _search(items: list[tuple[Fraction, str]], goal: Fraction, seen: set) -> str | None:
    """Depth-first search over pairwise combinations; returns the first expression hitting goal."""
    if len(items) == 1:
        return items[0][1] if items[0][0] == goal else None
    state = tuple(sorted(value for value, _ in items))
    if state in seen:
        return None
    seen.add(state)
    for i, (a, expr_a) in enumerate(items):
        for j, (b, expr_b) in enumerate(items):
            if i == j:
                continue
            rest = [item for k, item in enumerate(items) if k not in (i, j)]
            for value, expression in _combinations(a, expr_a, b, expr_b, commutative_once=i < j):
                found = _search(rest + [(value, expression)], goal, seen)
                if found is not None:
                    return found
    return None


def _combinations(a: Fraction, expr_a: str, b: Fraction, expr_b: str, commutative_once: bool):
    """Yield (value, expression) for a?b; + and * only once per unordered pair."""
    left, right = _parenthesise(expr_a), _parenthesise(expr_b)
    if commutative_once:
        yield a + b, f"{left} + {right}"
        yield a * b, f"{left} * {right}"
    yield a - b, f"{left} - {right}"
    if b != 0:
        yield a / b, f"{left} / {right}"


def _parenthesise(expression: str) -> str:
    """Wrap compound sub-expressions so the rendered string keeps the search's grouping."""
    return expression if expression.lstrip("-").isdigit() else f"({expression})"
