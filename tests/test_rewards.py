"""Tests for dirl.rewards: real benchmark answers, hand-written equivalences, countdown, sudoku
and the fault isolation / time limits of compute_rewards."""

from __future__ import annotations

import ast
import inspect
import json
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sympy import Basic, MatrixBase

import dirl.rewards
import dirl.rewards.math as math_rewards
from dirl.rewards.registry import RewardError
from dirl.rewards import (
    RewardResult,
    available_rewards,
    compute_rewards,
    get_reward,
    register,
)
from dirl.rewards import countdown as countdown_module
from dirl.rewards import registry as registry_module
from dirl.rewards import sudoku as sudoku_module
from dirl.rewards.countdown import (
    countdown_reward,
    extract_countdown_expression,
    is_valid_countdown_solution,
    solve_countdown,
)
from dirl.rewards.math import (
    extract_last_boxed,
    gsm8k_reward,
    math_reward,
    normalize_math_answer,
    parse_math_answer,
)
from dirl.rewards.sudoku import extract_sudoku_grid, sudoku_is_valid, sudoku_reward

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MATH_BENCHMARKS = ["math500", "aime24", "aime25", "gsm8k_test", "olympiadbench"]


def load_rows(name: str) -> list[dict]:
    """Rows of shared/data/<name>.jsonl, or skip the test when the data is not checked out."""
    path = DATA_DIR / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path} (shared/data is not checked out)")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# The default run checks every FULL_DATA_STRIDE-th row of the large benchmarks (a fixed, spread
# sample: math-verify costs ~4 ms a row); ``-m slow`` checks every row.
FULL_DATA_STRIDE = 10
SAMPLED_OR_FULL = [pytest.param(FULL_DATA_STRIDE, id="sampled"), pytest.param(1, id="all", marks=pytest.mark.slow)]


def every(rows: list[dict], stride: int) -> list[dict]:
    return rows[::stride] if len(rows) > 100 else rows


def boxed(answer: str) -> str:
    return "... so the answer is \\boxed{" + answer + "}"


# ----------------------------------------------------------------------------- registry basics


def test_builtin_rewards_are_registered_and_unknown_names_list_them():
    assert {"math", "gsm8k", "countdown", "sudoku"} <= set(available_rewards())
    assert get_reward("math") is math_reward
    with pytest.raises(ValueError, match="available: .*countdown.*gsm8k.*math.*sudoku"):
        get_reward("no-such-reward")


def test_register_refuses_to_silently_replace_a_reward():
    @register("_test_unique", replace=True)
    def first(completions, **_):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match="already registered"):
        register("_test_unique")(lambda completions, **_: [0.0] * len(completions))
    assert get_reward("_test_unique") is first


# ----------------------------------------------------------------------------- math: real data


@pytest.mark.parametrize("stride", SAMPLED_OR_FULL)
@pytest.mark.parametrize("benchmark", MATH_BENCHMARKS)
def test_every_gold_answer_verifies_against_itself(benchmark, stride):
    rows = every(load_rows(benchmark), stride)
    answers = [row["answer"] for row in rows]
    extra = [0] * len(rows)  # unknown columns must be accepted and ignored
    scores = math_reward([boxed(a) for a in answers], answer=answers, unknown_column=extra)
    failures = [(row["id"], row["answer"]) for row, s in zip(rows, scores) if s != 1.0]
    assert not failures, f"{len(failures)} gold answers do not verify: {failures[:10]}"
    # Self-equality would also hold for the raw-string fallback, so check that every gold answer
    # is really understood by math-verify (parsed into a sympy object).
    unparsed = [
        (row["id"], row["answer"]) for row in rows
        if not isinstance(parse_math_answer(normalize_math_answer(row["answer"]))[0],
                          (Basic, MatrixBase))
    ]
    assert not unparsed, f"gold answers math-verify cannot parse: {unparsed[:10]}"


def test_gsm8k_gold_answers_verify_with_the_gsm8k_reward():
    rows = load_rows("gsm8k_test")
    answers = [row["answer"] for row in rows]
    assert gsm8k_reward([boxed(a) for a in answers], answer=answers) == [1.0] * len(rows)
    # The original solutions end with "#### N" (with thousands commas): the fallback extraction.
    assert gsm8k_reward([row["solution"] for row in rows], answer=answers) == [1.0] * len(rows)


@pytest.mark.parametrize("stride", SAMPLED_OR_FULL)
def test_math500_reference_solutions_score_full_marks(stride):
    """Real solution texts: many boxes with nested braces, the last one is the answer."""
    rows = every(load_rows("math500"), stride)
    scores = math_reward([row["solution"] for row in rows], answer=[r["answer"] for r in rows])
    assert [row["id"] for row, s in zip(rows, scores) if s != 1.0] == []


@pytest.mark.parametrize("stride", SAMPLED_OR_FULL)
@pytest.mark.parametrize("benchmark", ["math500", "aime24", "aime25"])
def test_other_rows_answers_are_rejected_unless_equivalent(benchmark, stride):
    rows = every(load_rows(benchmark), stride)
    answers = [row["answer"] for row in rows]
    shifted = answers[1:] + answers[:1]
    scores = math_reward([boxed(a) for a in shifted], answer=answers)
    for gold, predicted, score in zip(answers, shifted, scores):
        same = normalize_math_answer(gold) == normalize_math_answer(predicted)
        assert score == (1.0 if same else 0.0), (gold, predicted)


# ----------------------------------------------------------------------------- math: hand cases

EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac12"), ("\\frac{1}{2}", "1/2"), ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("1/2", "\\tfrac12"), ("0.5", "\\frac{1}{2}"),
    ("3", "x=3"), ("x=3", "3"), ("k=3", "3"), ("5", "5\\text{ cm}"), ("5", "5 \\text{cm}^2"),
    ("12", "12\\text{ inches}"), ("1000", "1,000"), ("1000", "1{,}000"), ("10000", "10,\\!000"),
    ("1000000", "1\\,000\\,000"), ("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"), ("30^\\circ", "30"),
    ("30", "30^{\\circ}"), ("\\$5", "5"), ("5", "\\$5.00"), ("5", "5."), ("3", "3.0"),
    ("\\text{(C)}", "C"), ("\\text{(C)}", "(C)"), ("1,2,3", "3,2,1"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("x^2+2x+1", "(x+1)^2"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"), ("-\\frac{3}{2}", "-1.5"), ("73", "073"),
    ("2", "\\mathbf{2}"), ("[2,5)", "x\\in[2,5)"), ("x \\in (-\\infty, 3]", "(-\\infty,3]"),
    ("n^{2}-n-1", "m_{\\max}=n^2-n-1"), ("y=2x+3", "y = 2x + 3"), ("a+b", "b+a"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]
NOT_EQUIVALENT = [
    ("4", "3"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("1/2", "0.51"), ("(1,2)", "(2,1)"),
    ("1000", "100"), ("\\sqrt{2}", "\\sqrt{3}"), ("x+1", "x-1"), ("2", "-2"), ("5", "55"),
    ("\\pi", "3.14"), ("\\text{(C)}", "(D)"), ("[2,5)", "[2,5]"), ("1,2,3", "1,2"),
]


@pytest.mark.parametrize(("gold", "predicted"), EQUIVALENT)
def test_equivalent_forms_are_accepted(gold, predicted):
    assert math_reward([f"Thus the answer is $\\boxed{{{predicted}}}$."], answer=[gold]) == [1.0]


@pytest.mark.parametrize(("gold", "predicted"), NOT_EQUIVALENT)
def test_wrong_answers_are_rejected(gold, predicted):
    assert math_reward([boxed(predicted)], answer=[gold]) == [0.0]


def test_math_uses_the_last_complete_box_and_needs_one():
    completions = [
        "The answer is 1/2 but I did not box it.",
        "\\boxed{1/3} no wait \\boxed{\\frac{1}{2}}",
        "\\boxed{\\frac{1}{2}} no wait \\boxed{1/3}",
        "\\fbox{\\frac{1}{2}}",
        "\\boxed{\\frac{1}{2}} and then truncated \\boxed{\\frac{1}{",
    ]
    assert math_reward(completions, answer=["1/2"] * 5) == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert math_reward(["\\boxed{1}"], answer=[None]) == [None]


def test_extract_last_boxed_matches_nested_and_escaped_braces():
    assert extract_last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    text = "a \\boxed{1} b \\boxed {\\{1, \\sqrt{2}\\}} c"
    assert extract_last_boxed(text) == "\\{1, \\sqrt{2}\\}"
    assert extract_last_boxed("\\boxed{x^{2^{3}}} trailing }") == "x^{2^{3}}"
    assert extract_last_boxed("no box here") is None


GSM8K_CASES = [
    ("#### 18", "18", 1.0), ("\\boxed{18.0}", "18", 1.0), ("#### 1,000", "1000", 1.0),
    ("\\boxed{\\$18}", "18", 1.0), ("#### 18 dollars\nextra text", "18", 1.0),
    ("####18.00", "18", 1.0), ("\\boxed{x = 18}", "18", 1.0), ("\\boxed{\\frac{36}{2}}", "18", 1.0),
    ("I think it is 18", "18", 0.0), ("\\boxed{17}", "18", 0.0), ("#### 18.5", "18", 0.0),
    ("\\boxed{18} #### 17", "17", 0.0), ("#### 180", "18", 0.0),
]


@pytest.mark.parametrize(("completion", "reference", "expected"), GSM8K_CASES)
def test_gsm8k_numeric_match(completion, reference, expected):
    assert gsm8k_reward([completion], answer=[reference]) == [expected]


def test_math_reward_time_limit_scores_zero(monkeypatch):
    def hanging_match(prediction, reference):
        time.sleep(2.0)
        return True

    monkeypatch.setattr(math_rewards, "math_answers_match", hanging_match)
    monkeypatch.setattr(math_rewards, "PER_ANSWER_TIME_LIMIT_S", 0.05)
    started = time.monotonic()
    assert math_reward(["\\boxed{1}"], answer=["1"]) == [0.0]
    with ThreadPoolExecutor(1) as pool:  # the signal-free path
        assert pool.submit(math_reward, ["\\boxed{1}"], answer=["1"]).result() == [0.0]
    # Without the limit the two calls take >= 4 s (2 s each); the bound leaves room for a loaded CPU.
    assert time.monotonic() - started < 4.0


def test_math_reward_works_outside_the_main_thread():
    """math-verify's own signal timeouts raise off the main thread; ours must not."""
    with ThreadPoolExecutor(2) as pool:
        future = pool.submit(math_reward, ["\\boxed{0.5}", "\\boxed{\\sqrt{12}}", "\\boxed{3}"],
                             answer=["\\frac{1}{2}", "2\\sqrt{3}", "4"])
        assert future.result(timeout=60) == [1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- countdown


def test_every_countdown_puzzle_is_solved_and_the_solution_accepted():
    rows = load_rows("countdown_test")
    solutions = [solve_countdown(row["numbers"], row["target"]) for row in rows]
    assert [row["id"] for row, s in zip(rows, solutions) if s is None] == []
    completions = [f"Let me think.\n<answer>{s}</answer>" for s in solutions]
    scores = countdown_reward(completions, numbers=[r["numbers"] for r in rows],
                              target=[r["target"] for r in rows],
                              question=[r["question"] for r in rows])
    assert scores == [1.0] * len(rows)


def test_solve_countdown_reports_unsolvable_and_finds_fractional_paths():
    assert solve_countdown([1, 1], 5) is None
    expression = solve_countdown([3, 3, 8, 8], 24)  # needs 8 / (3 - 8/3)
    assert expression is not None and is_valid_countdown_solution(expression, [3, 3, 8, 8], 24)


COUNTDOWN_CASES = [
    ("<answer>30 - (100 - 93)</answer>", 1.0),
    ("<answer>30 - (100 - 93) = 23</answer>", 1.0),
    ("steps...\n30-(100-93)=23", 1.0),
    ("23 = 30 - (100 - 93)", 1.0),
    ("\\boxed{30 - \\left(100 - 93\\right)}", 1.0),
    ("blah\n30 − (100 − 93)\n", 1.0),
    ("<answer>(100 × 30 ÷ 30 - 93) + 16</answer>", 0.0),  # extra numbers
    ("<answer>30 + 100 - 93</answer>", 0.0),  # wrong value
    ("<answer>30 - (100 - 93) + 30 - 30</answer>", 0.0),  # reused number
    ("<answer>30 - 100</answer>", 0.0),  # missing number
    ("<answer>30**1 - (100 - 93)</answer>", 0.0),  # power operator
    ("<answer>abs(30) - (100 - 93)</answer>", 0.0),  # function call
    ("<answer>x - (100 - 93)</answer>", 0.0),  # name
    ("<answer>30.0 - (100 - 93)</answer>", 0.0),  # float literal
    ("<answer>30 // 1 - (100 - 93)</answer>", 0.0),  # floor division
    ("<answer>30 - (100 - 93) = 24</answer>", 0.0),  # an equation with another value
    ("<answer></answer>", 0.0),
    ("no answer at all", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), COUNTDOWN_CASES)
def test_countdown_validity(completion, expected):
    assert countdown_reward([completion], numbers=[[30, 100, 93]], target=[23]) == [expected]


def test_countdown_arithmetic_is_exact_and_division_by_zero_is_invalid():
    assert is_valid_countdown_solution("7 / 2 * 2", [7, 2, 2], 7)  # Fraction, not float
    assert not is_valid_countdown_solution("5 / (3 - 3)", [5, 3, 3], 0)
    assert is_valid_countdown_solution("-5 + 8", [5, 8], 3)  # unary minus is allowed
    assert extract_countdown_expression("no tag\n\n 1 + 2 \n\n") == "1 + 2"
    assert countdown_reward(["<answer>1+2</answer>"], numbers=[None], target=[3]) == [None]


def test_no_reward_module_calls_eval_or_exec():
    for module in (countdown_module, math_rewards, sudoku_module, registry_module, dirl.rewards):
        tree = ast.parse(inspect.getsource(module))
        called = {node.func.id for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert not called & {"eval", "exec", "compile"}, module.__name__


# ----------------------------------------------------------------------------- sudoku


def test_every_sudoku_solution_scores_full_and_is_valid():
    rows = load_rows("sudoku4x4_test")
    solutions = [row["solution"] for row in rows]
    assert all(sudoku_is_valid(s) for s in solutions)
    scores = sudoku_reward([f"<answer>{s}</answer>" for s in solutions],
                           puzzle=[r["puzzle"] for r in rows], solution=solutions)
    assert scores == [1.0] * len(rows)


def test_sudoku_partial_credit_and_formats():
    puzzle, solution = "3102200002100320", "3142243142131324"
    wrong_cell = solution[:1] + "4" + solution[2:]  # cell 1 is empty in the puzzle
    changed_clue = "1" + solution[1:]  # cell 0 is a given clue
    grid_lines = "\n".join(" ".join(solution[r * 4:r * 4 + 4]) for r in range(4))
    labelled = "\n".join(f"Row {r + 1}: {solution[r * 4:r * 4 + 4]}" for r in range(4))
    completions = [
        f"<answer>{wrong_cell}</answer>",
        f"<answer>{changed_clue}</answer>",
        f"Final grid:\n{grid_lines}\nAll 4 rows check out.",
        labelled,
        "\\boxed{" + solution + "}",
        f"<answer>{puzzle}</answer>",
        f"<answer>{solution[:-1]}</answer>",
    ]
    scores = sudoku_reward(completions, puzzle=[puzzle] * 7, solution=[solution] * 7)
    assert scores == [7 / 8, 7 / 8, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert extract_sudoku_grid("nothing here") is None
    assert sudoku_reward(["1234"], puzzle=[None], solution=[None]) == [None]


def test_sudoku_is_valid_checks_rows_columns_and_boxes():
    assert sudoku_is_valid("1234341221434321")
    assert not sudoku_is_valid("1234234134124123")  # latin square, but the 2x2 boxes repeat
    assert not sudoku_is_valid("1234341221434320")
    assert not sudoku_is_valid("123")
    nine = "".join(str((r * 3 + r // 3 + c) % 9 + 1) for r in range(9) for c in range(9))
    assert sudoku_is_valid(nine)


# ----------------------------------------------------------------------------- compute_rewards


@register("_test_raises_on_bad", replace=True)
def _raises_on_bad(completions, **_):
    return [1 / 0 if "bad" in c else 0.5 for c in completions]


@register("_test_slow_on_slow", replace=True)
def _slow_on_slow(completions, **_):
    if any("slow" in c for c in completions):
        if len(completions) == 1:
            time.sleep(1.0)
        else:  # the batch call: loop so that it is interruptible in any thread
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                pass
    return [1.0 for _ in completions]


@register("_test_not_applicable", replace=True)
def _not_applicable(completions, kind, **_):
    return [None if k == "other" else 2.0 for k in kind]


@register("_test_malformed", replace=True)
def _malformed(completions, **_):
    return [math.nan if c == "nan" else 1.0 for c in completions]


def test_a_raising_reward_costs_only_its_row():
    result = compute_rewards(["_test_raises_on_bad"], ["ok", "bad", "ok"], {})
    assert isinstance(result, RewardResult)
    assert result.total == [0.5, 0.0, 0.5]
    assert result.metrics["rewards/_test_raises_on_bad/errors"] == 1.0
    assert result.metrics["rewards/_test_raises_on_bad/mean"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("in_worker_thread", [False, True])
def test_a_slow_reward_times_out_and_scores_zero(in_worker_thread):
    def run():
        return compute_rewards({"_test_slow_on_slow": 1.0}, ["fast", "slow", "fast"], {},
                               time_limit_s=0.05)

    started = time.monotonic()
    if in_worker_thread:
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(run).result()
    else:
        result = run()
    assert time.monotonic() - started < 0.9
    assert result.total == [1.0, 0.0, 1.0]
    assert result.metrics["rewards/_test_slow_on_slow/errors"] == 1.0


def test_weights_combine_and_none_counts_as_zero():
    completions = ["\\boxed{1/2}", "\\boxed{3}", "bad"]
    columns = {"answer": ["0.5", "4", "1"], "kind": ["math", "other", "math"]}
    result = compute_rewards({"math": 2.0, "_test_not_applicable": 0.5, "_test_raises_on_bad": 1.0},
                             completions, columns)
    assert result.total == pytest.approx([2.0 + 1.0 + 0.5, 0.0 + 0.0 + 0.5, 0.0 + 1.0 + 0.0])
    assert result.per_reward["_test_not_applicable"] == [2.0, None, 2.0]
    assert result.metrics["rewards/_test_not_applicable/mean"] == 2.0  # over non-None only
    assert result.metrics["rewards/math/mean"] == pytest.approx(1 / 3)
    assert result.metrics["rewards/math/errors"] == 0.0
    assert result.metrics["rewards/_test_raises_on_bad/errors"] == 1.0


def test_malformed_scores_are_errors_and_caller_bugs_raise():
    with pytest.raises(RewardError, match="reward '_test_malformed' returned an invalid score nan for completion 0"):
        compute_rewards(["_test_malformed"], ["nan", "b"], {})
    with pytest.raises(ValueError, match="column 'answer'"):
        compute_rewards(["math"], ["a", "b"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="unknown reward"):
        compute_rewards(["nope"], ["a"], {})
    empty = compute_rewards(["math"], [], {"answer": []})
    assert empty.total == [] and math.isnan(empty.metrics["rewards/math/mean"])


def test_time_limits_preserve_an_enclosing_alarm():
    """Our main-thread alarms must pause and re-arm an outer ITIMER_REAL (e.g. pytest-timeout)."""
    fired = []
    saved_handler = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    saved_delay, saved_interval = signal.setitimer(signal.ITIMER_REAL, 0.4)
    try:
        assert threading.current_thread() is threading.main_thread()
        compute_rewards(["_test_slow_on_slow", "math"], ["slow \\boxed{1}"], {"answer": ["1"]},
                        time_limit_s=0.05)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining < 0.4
        time.sleep(remaining + 0.1)
        assert len(fired) == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved_handler)
        if saved_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, saved_delay, saved_interval)
