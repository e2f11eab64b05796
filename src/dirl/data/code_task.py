"""The built-in ``code`` task: write a one-line Python function from two input/output examples.

A row's ``question`` is a function stub whose docstring shows two examples, e.g.::

    def f(x):
        "f(3)=7 f(12)=16"

and its ``response`` (the SFT target) is the body ``    return x+4``. The rule is one of
``x+a``, ``x-a``, ``x*a`` (``ops``) with ``a`` in ``1..max_const`` and the examples' inputs in
``0..max_input``. The hidden ``test`` (HumanEval's shape, scored by the ``code`` reward in the
sandbox) checks ``f`` on the two shown inputs and ``hidden_cases`` more drawn with the row, some
outside the shown range, so a body that hard-codes the examples fails. Draws where another rule
of the family also fits both examples are rejected, so the examples determine the answer.

Train and held-out rows are disjoint by construction, as for every task: the split is a hash of
the question text (:func:`dirl.data.tasks.split_of`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

__all__ = ["CODE_DEFAULTS", "apply_rule", "sample_code_function"]

CODE_DEFAULTS = {"ops": "+-*", "max_const": 9, "max_input": 19, "hidden_cases": 4}


def apply_rule(op: str, const: int, x: int) -> int:
    """``x op const`` for op in + - *."""
    return x + const if op == "+" else x - const if op == "-" else x * const


def sample_code_function(rng: random.Random, p: Mapping[str, Any]) -> dict[str, Any] | None:
    """Draw one code row (without ``id``), or None when the examples are ambiguous."""
    op, const = rng.choice(p["ops"]), rng.randint(1, p["max_const"])
    shown = rng.sample(range(p["max_input"] + 1), 2)
    outputs = [apply_rule(op, const, x) for x in shown]
    rivals = [(o, c) for o in p["ops"] for c in range(1, p["max_const"] + 1) if (o, c) != (op, const)
              and [apply_rule(o, c, x) for x in shown] == outputs]
    if rivals:
        return None
    hidden = [rng.randint(-p["max_input"], 3 * p["max_input"]) for _ in range(p["hidden_cases"])]
    cases = [(x, apply_rule(op, const, x)) for x in [*shown, *hidden]]
    examples = " ".join(f"f({x})={y}" for x, y in zip(shown, outputs))
    question = f'def f(x):\n    "{examples}"\n'
    body = f"    return x{op}{const}"
    test = "def check(candidate):\n" + "".join(
        f"    assert candidate({x}) == {y}\n" for x, y in cases)
    return {"question": question, "answer": body, "response": body, "test": test,
            "entry_point": "f"}
