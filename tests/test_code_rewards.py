"""The code rewards: program extraction, ``code`` on HumanEval rows, ``code_io`` on stdin/stdout
cases, the outcome metrics, and (integration) HumanEval's 164 canonical solutions."""

from __future__ import annotations

import json

import pytest

from dirl.rewards import compute_rewards
from dirl.rewards.code import extract_program, parse_io_tests
from dirl.rewards.code_harness import normalise_output
from tests.conftest import SHARED

HUMANEVAL = SHARED / "data" / "humaneval.jsonl"
PROMPT = 'def add(a, b):\n    """Sum."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


def _humaneval(limit=None):
    if not HUMANEVAL.exists():
        pytest.skip("shared/data/humaneval.jsonl is absent")
    rows = [json.loads(line) for line in HUMANEVAL.read_text().splitlines()]
    return rows[:limit] if limit else rows


def test_extract_program_body_block_and_full_def():
    assert extract_program("    return a + b\n", PROMPT, "add") == PROMPT + "    return a + b\n"
    # a body is cut where the reference evaluators stop
    assert extract_program("    return a + b\nprint(add(1, 2))\n", PROMPT, "add") == PROMPT + "    return a + b"
    block = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_program(block, PROMPT, "add") == PROMPT + "\ndef add(a, b):\n    return a + b\n"
    two = "```python\nx = 1\n```\n```python\ndef add(a, b):\n    return b + a\n```\n```\nprint(1)\n```"
    assert extract_program(two, PROMPT, "add").endswith("def add(a, b):\n    return b + a\n")
    assert extract_program("def add(a, b):\n    return 0\n", "not code (", "add") == "def add(a, b):\n    return 0\n"


def test_parse_io_tests_formats_and_normalisation():
    cases = [{"input": "1 2\n", "output": "3\n"}]
    assert parse_io_tests(cases) == parse_io_tests(json.dumps(cases)) == [("1 2\n", "3\n")]
    assert parse_io_tests({"inputs": ["a"], "outputs": ["b"]}) == [("a", "b")]
    with pytest.raises(ValueError):
        parse_io_tests([])
    assert normalise_output("\n 1   2 \n3\t\n\n") == normalise_output("1 2\n3") == ["1 2", "3"]


def test_code_reward_on_humaneval_rows_and_metrics():
    rows = _humaneval(3)
    texts = [rows[0]["answer"],                                                    # a body
             "```python\n" + rows[1]["question"] + rows[1]["answer"] + "```",      # a full block
             "import os\nos._exit(0)\n",                                          # exits early
             "    return 1\n"]                                                    # a row without tests
    columns = {key: [r[key] for r in rows] + [None] for key in ("question", "test", "entry_point")}
    result = compute_rewards(["code"], texts, columns)
    assert result.per_reward["code"] == [1.0, 1.0, 0.0, None]
    assert result.metrics["rewards/code/program_errors"] == 1.0
    assert result.metrics["rewards/code/timeouts"] == 0.0 and result.metrics["rewards/code/errors"] == 0.0


def test_code_reward_trl_signature_with_prompts_only():
    from dirl.rewards.code import code_reward

    scores = code_reward(prompts=[PROMPT, PROMPT], completions=["    return a + b\n", "    return a * b\n"],
                         completion_ids=[[1], [2]], test=[TEST, TEST], entry_point=["add", "add"])
    assert scores == [1.0, 0.0]
    assert code_reward.pop_metrics() == {"timeouts": 0.0, "program_errors": 0.0, "no_verdict": 0.0}


def test_code_io_all_pass_fraction_and_timeouts():
    tests = [{"input": "3 4\n", "output": "7\n"}, {"input": "1 1", "output": "2"}]
    texts = ["a, b = map(int, input().split())\nprint(a + b)",
             "Sure:\n```python\nprint(7)\n```", "while True:\n    pass",
             "import sys\nsys.stdout.buffer.write(b'\\xff')"]
    from dirl.rewards.code import CODE_LIMITS

    old, CODE_LIMITS.case_s = CODE_LIMITS.case_s, 1.0
    try:
        result = compute_rewards(["code_io", "code_io_fraction"], texts, {"tests": [tests] * 4})
    finally:
        CODE_LIMITS.case_s = old
    assert result.per_reward["code_io"] == [1.0, 0.0, 0.0, 0.0]
    assert result.per_reward["code_io_fraction"] == [1.0, 0.5, 0.0, 0.0]
    assert result.metrics["rewards/code_io/timeouts"] == 1.0


@pytest.mark.integration
def test_humaneval_canonical_all_pass_and_empty_body_none():
    rows = _humaneval()
    columns = {key: [r[key] for r in rows] for key in ("question", "test", "entry_point")}
    canonical = compute_rewards(["code"], [r["answer"] for r in rows], columns)
    assert sum(canonical.per_reward["code"]) == 164 == len(rows)
    empty = compute_rewards(["code"], ["    pass\n"] * len(rows), columns)
    assert sum(empty.per_reward["code"]) == 0


def test_eval_on_humaneval_rows_reports_pass_at_k(tokenizer):
    """``dirl eval --data humaneval.jsonl --reward code k=2``'s path: sample 0 is the canonical
    body, sample 1 an empty one -> accuracy 0.5, pass@2 1.0 (the unbiased estimator)."""
    from dirl.eval.config import EvalConfig, load_eval_rows, resolve_defaults
    from dirl.eval.heldout import evaluate_rows
    from tests.test_eval import OracleBackend

    _humaneval(1)
    from dirl.rollout import SamplingSpec

    cfg = resolve_defaults(EvalConfig(data=str(HUMANEVAL), reward="code", k=2, limit=3, batch_size=3,
                                      sampling=SamplingSpec(temperature=1.0, max_new_tokens=512)))
    assert cfg.prompt_template == "plain"            # the code reward's default: the prompt is code
    rows = load_eval_rows(cfg)
    oracle = OracleBackend(tokenizer, [[row["answer"], "    pass\n"] for row in rows])
    summary, samples = evaluate_rows(None, tokenizer, rows, cfg, backend=oracle)
    assert [s["correct"] for s in samples] == [True, False] * 3
    assert summary["accuracy"] == 0.5 and summary["pass@k"] == 1.0
    assert summary["reward_outcomes"] == {"code/timeouts": 0, "code/program_errors": 0, "code/no_verdict": 0}
