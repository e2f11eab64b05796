"""Built-in synthetic reasoning tasks: the embedded default data for the demo and the tests.

Each task generates rows shaped like the shared benchmark rows (``id``, ``question``, ``answer``,
``response`` = the worked SFT target, plus task columns). Texts are short printable ASCII so that
a small character-level model can read and partly learn them.

Train and test are disjoint by construction: a problem's split is a stable hash of its question
text (``TEST_FRACTION`` of the hash space is test), and generation samples by rejection, so one
problem can never land in both splits, whatever the seeds.

Documented length bounds with the default parameters (checked by the tests):

=============  =================  ====================
task           prompt (chars)     response (chars)
=============  =================  ====================
arithmetic     <= 10              <= 40
countdown      <= 40              <= 64
sudoku         == 16              == 33
code           <= 36              <= 14
=============  =================  ====================

The ``code`` task (:mod:`dirl.data.code_task`) also carries a hidden ``test`` and an
``entry_point`` per row, for the sandboxed ``code`` reward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from dirl.data.code_task import CODE_DEFAULTS, sample_code_function

__all__ = ["Task", "TASKS", "TEST_FRACTION", "get_task", "split_of"]

TEST_FRACTION = 0.10
SPLITS = ("train", "test")


def split_of(question: str) -> str:
    """Return the split ("train"/"test") a problem belongs to, from a stable hash of its text."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


# A sampler draws one candidate problem row (without ``id``) from the task parameters,
# or returns None to reject the draw.
Sampler = Callable[[random.Random, Mapping[str, Any]], "dict[str, Any] | None"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic task: how to generate it, how to prompt it and which reward scores it.

    ``reward`` names a reward function in ``dirl.rewards`` (this package does not import it);
    ``params`` are the difficulty knobs passed to the sampler (override with ``with_params``).
    """

    name: str
    reward: str
    prompt_template: str
    description: str
    sampler: Sampler
    params: Mapping[str, Any]
    default_size: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 5000, "test": 500}
    )

    def with_params(self, **overrides: Any) -> "Task":
        """Return a copy with some difficulty parameters changed (unknown names are an error)."""
        unknown = sorted(set(overrides) - set(self.params))
        if unknown:
            raise ValueError(
                f"task '{self.name}' has no parameter(s) {unknown}; has {sorted(self.params)}"
            )
        return dataclasses.replace(self, params=MappingProxyType({**self.params, **overrides}))

    def generate(self, split: str, num: int, seed: int = 0) -> list[dict[str, Any]]:
        """Generate ``num`` distinct problems of ``split``, deterministically for ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"task '{self.name}': unknown split '{split}', use one of {SPLITS}")
        # Fresh rows (dicts and their lists): callers may edit theirs; the cached ones stay as drawn.
        return [{k: list(v) if isinstance(v, list) else v for k, v in row.items()}
                for row in _generated(self, split, num, seed)]

    def _draw(self, split: str, num: int, seed: int) -> list[dict[str, Any]]:
        # Seed from a string so the stream differs per task and split for the same seed.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        max_draws = 1000 + 200 * num
        for _ in range(max_draws):
            if len(rows) == num:
                return rows
            row = self.sampler(rng, self.params)
            if row is None or row["question"] in seen or split_of(row["question"]) != split:
                continue
            seen.add(row["question"])
            rows.append({"id": f"{self.name}_{split}_s{seed}_{len(rows):05d}", **row})
        if len(rows) == num:
            return rows
        raise ValueError(
            f"task '{self.name}': only {len(rows)} distinct {split} problems found in {max_draws} "
            f"draws (asked for {num}); the problem space is too small for these parameters"
        )


_GENERATED: dict[tuple, tuple[dict[str, Any], ...]] = {}
_GENERATED_MAX = 64  # ~1 MB a 5,000-row entry


def _generated(task: Task, split: str, num: int, seed: int) -> tuple[dict[str, Any], ...]:
    """One generation per (task, parameters, split, size, seed) per process: the draws are
    deterministic, and a run (or a test session) asks for the same 5,000 rows many times."""
    key = (task.name, tuple(sorted(task.params.items())), split, num, seed)
    if key not in _GENERATED:
        if len(_GENERATED) >= _GENERATED_MAX:
            _GENERATED.pop(next(iter(_GENERATED)))  # the oldest
        _GENERATED[key] = tuple(task._draw(split, num, seed))
    return _GENERATED[key]


# ----------------------------------------------------------------------------- arithmetic

_ARITH_DEFAULTS = {
    "min_operands": 2, "max_operands": 3, "max_operand": 99, "max_factor": 9, "ops": "+-*",
}


def _apply(a: int, op: str, b: int) -> int:
    """Integer result of ``a op b`` for + - *."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def _sample_arithmetic(rng: random.Random, p: Mapping[str, Any]) -> dict[str, Any] | None:
    """Draw e.g. "47+85*3=" and its worked steps "85*3=255\\n47+255=302\\n#### 302".

    The operand right of a '*' is a single factor (2..max_factor) to keep products learnable.
    Steps follow precedence: products left to right, then sums left to right. Draws with a
    negative intermediate or result are rejected (simpler targets for a small model).
    """
    n = rng.randint(p["min_operands"], p["max_operands"])
    ops = [rng.choice(p["ops"]) for _ in range(n - 1)]
    nums = [rng.randint(1, p["max_operand"])]
    for op in ops:
        high, low = (p["max_factor"], 2) if op == "*" else (p["max_operand"], 1)
        nums.append(rng.randint(low, high))
    question = "".join(f"{x}{op}" for x, op in zip(nums, ops)) + f"{nums[-1]}="
    steps: list[str] = []
    vals, rest_ops = [nums[0]], []
    for op, x in zip(ops, nums[1:]):  # products first
        if op == "*":
            prod = vals[-1] * x
            steps.append(f"{vals[-1]}*{x}={prod}")
            vals[-1] = prod
        else:
            vals.append(x)
            rest_ops.append(op)
    acc = vals[0]
    for op, x in zip(rest_ops, vals[1:]):  # then sums and differences
        new = _apply(acc, op, x)
        steps.append(f"{acc}{op}{x}={new}")
        acc = new
        if acc < 0:
            return None
    if not steps:
        return None
    response = "\n".join(steps + [f"#### {acc}"])
    return {"question": question, "answer": str(acc), "solution": response, "response": response,
            "operands": nums, "ops": "".join(ops)}


# ----------------------------------------------------------------------------- countdown

_COUNTDOWN_DEFAULTS = {"num_numbers": 3, "max_number": 20, "min_target": 1, "max_target": 100}
# Operator precedence used to decide where the rendered expression needs parentheses.
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _wrap(expr: str, op: str | None, parent: str, right: bool) -> str:
    """Parenthesise a sub-expression of operator ``op`` under ``parent`` when needed."""
    if op is None:
        return expr
    lower = _PREC[op] < _PREC[parent]
    # a-(b+c), a/(b*c): a right operand of - or / with equal precedence needs parentheses too.
    same_right = right and _PREC[op] == _PREC[parent] and parent in "-/"
    return f"({expr})" if lower or same_right else expr


def _solve_all(items: list[tuple[int, object]], found: dict[int, object]) -> None:
    """Exhaustively combine numbers pairwise, recording the first node (DFS order) for every value.

    ``items`` hold (value, node). Intermediates stay non-negative integers (a-b only for a >= b,
    exact division only) so worked steps are easy to follow; every number is used exactly once
    because we combine until one item is left.
    """
    if len(items) == 1:
        value, node = items[0]
        if value not in found:
            found[value] = node
        return
    last = len(items) == 2  # the combined item is a leaf: record it here (no call, no list)
    for i in range(len(items)):
        for j in range(len(items)):
            if i == j:
                continue
            (a, na), (b, nb) = items[i], items[j]
            rest = [it for k, it in enumerate(items) if k != i and k != j]
            for op in "+*-/":
                if op in "+*" and (a < b or (a == b and i > j)):
                    continue  # commutative: each pair once, larger operand first ("6*1", not "1*6")
                if (op == "-" and a < b) or (op == "/" and (b == 0 or a % b)):
                    continue
                value = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
                if last:
                    if value not in found:
                        found[value] = (op, na, nb)
                    continue
                rest.append((value, (op, na, nb)))
                _solve_all(rest, found)
                rest.pop()


def _render(node) -> tuple[int, str, str | None, tuple[str, ...]]:
    """(value, expression, top operator, worked steps: left's, right's, then this one)."""
    if isinstance(node, int):
        return node, str(node), None, ()
    op, left, right = node
    a, ea, oa, sa = _render(left)
    b, eb, ob, sb = _render(right)
    value = a + b if op == "+" else a * b if op == "*" else a - b if op == "-" else a // b
    expr = f"{_wrap(ea, oa, op, False)}{op}{_wrap(eb, ob, op, True)}"
    return value, expr, op, sa + sb + (f"{a}{op}{b}={value}",)


def _reachable(numbers: list[int]) -> dict[int, object]:
    """Map every value reachable using all numbers once each to its first solution node."""
    found: dict[int, object] = {}
    _solve_all([(n, n) for n in numbers], found)
    return found


def _sample_countdown(rng: random.Random, p: Mapping[str, Any]) -> dict[str, Any] | None:
    """Draw numbers, pick a target uniformly among the reachable ones, attach the solution.

    The solution is the solver's first (canonical) one, so the target text is a function of the
    problem, which is easier to learn than a random choice among equivalent equations.
    """
    numbers = [rng.randint(1, p["max_number"]) for _ in range(p["num_numbers"])]
    reachable = _reachable(numbers)
    targets = sorted(v for v in reachable if p["min_target"] <= v <= p["max_target"])
    if not targets:
        return None
    target = rng.choice(targets)
    # Only the chosen target is rendered: rendering all reachable values was half the draw time.
    _, expr, _, steps = _render(reachable[target])
    response = "\n".join(steps + (f"<answer>{expr}</answer>",))
    question = f"Numbers: {numbers}\nTarget: {target}"
    return {"question": question, "answer": str(target), "response": response,
            "numbers": numbers, "target": target}


# ----------------------------------------------------------------------------- sudoku

_SUDOKU_DEFAULTS = {"min_empty": 6, "max_empty": 10}
_BASE_GRID = "1234341221434321"  # a valid 4x4 grid; every other one is a symmetry of it


def _random_grid(rng: random.Random) -> list[list[int]]:
    """A random valid 4x4 grid: relabel digits, shuffle rows/bands/columns/stacks, transpose."""
    relabel = rng.sample(range(1, 5), 4)
    grid = [[relabel[int(_BASE_GRID[4 * r + c]) - 1] for c in range(4)] for r in range(4)]

    def band_order() -> list[int]:
        bands = rng.sample([0, 2], 2)
        return [b + off for b in bands for off in rng.sample([0, 1], 2)]

    rows, cols = band_order(), band_order()
    grid = [[grid[r][c] for c in cols] for r in rows]
    if rng.random() < 0.5:
        grid = [list(col) for col in zip(*grid)]
    return grid


def _sample_sudoku(rng: random.Random, p: Mapping[str, Any]) -> dict[str, Any]:
    """Draw a grid and blank ``min_empty..max_empty`` cells; the response is the full grid."""
    solution = "".join(str(d) for row in _random_grid(rng) for d in row)
    num_empty = rng.randint(p["min_empty"], p["max_empty"])
    blanks = set(rng.sample(range(16), num_empty))
    puzzle = "".join("0" if i in blanks else ch for i, ch in enumerate(solution))
    return {"question": puzzle, "answer": solution, "response": f"<answer>{solution}</answer>",
            "puzzle": puzzle, "solution": solution, "num_empty": num_empty}


# ----------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {
    "arithmetic": Task(
        name="arithmetic", reward="gsm8k", prompt_template="plain",
        description="2-3 operand integer arithmetic with + - * and worked steps ending '#### N'",
        sampler=_sample_arithmetic, params=MappingProxyType(_ARITH_DEFAULTS),
    ),
    "countdown": Task(
        name="countdown", reward="countdown", prompt_template="plain",
        description="reach the target with each number once; steps then <answer>expr</answer>",
        sampler=_sample_countdown, params=MappingProxyType(_COUNTDOWN_DEFAULTS),
    ),
    "sudoku": Task(
        name="sudoku", reward="sudoku", prompt_template="plain",
        description="4x4 sudoku as a 16-digit string (0 = empty); response <answer>grid</answer>",
        sampler=_sample_sudoku, params=MappingProxyType(_SUDOKU_DEFAULTS),
    ),
    "code": Task(
        name="code", reward="code", prompt_template="plain",
        description="a one-line Python function body from two examples; hidden tests run sandboxed",
        sampler=sample_code_function, params=MappingProxyType(CODE_DEFAULTS),
    ),
}


def get_task(name: str, **params: Any) -> Task:
    """Look up a built-in task by name, optionally overriding its difficulty parameters."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}': use one of {sorted(TASKS)}")
    task = TASKS[name]
    return task.with_params(**params) if params else task
