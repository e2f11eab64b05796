"""Code rewards: completions run in the sandbox (:mod:`dirl.rewards.sandbox`) against tests.

* ``code`` -- HumanEval style. Columns: ``test`` (defines ``check(candidate)``, or asserts on
  ``entry_point`` directly), ``entry_point``, and the prompt (``question``, else TRL's
  ``prompts``). 1.0 iff the tests pass. The program is :func:`extract_program`'s.
* ``code_io`` / ``code_io_fraction`` -- LiveCodeBench / APPS style. Column ``tests``: a list of
  ``{"input": str, "output": str}`` (or its JSON text, or APPS's ``{"inputs": [...],
  "outputs": [...]}``). Each case runs the program once with ``input`` on stdin; its stdout must
  equal ``output`` after whitespace normalisation. ``code_io`` is 1.0 iff every case passes,
  ``code_io_fraction`` the fraction that pass.

A row without those columns scores None (not applicable). Every program and every case has its
own time limit (``CODE_LIMITS``); a batch runs on the sandbox's bounded pool and never waits on
one program past its limit, so these rewards bound their own time (``self_limited``). Outcomes
other than pass/fail are counted and reported by ``pop_metrics()`` -- ``timeouts``,
``program_errors`` (raised, exited early, bad output), ``no_verdict`` -- which
:func:`dirl.rewards.compute_rewards` logs as ``rewards/<name>/<key>``.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dirl.rewards.code_harness import run_check, run_io_case
from dirl.rewards.registry import register
from dirl.rewards.sandbox import default_sandbox
from dirl.rewards.scoring import completion_text

__all__ = ["CODE_LIMITS", "extract_program", "parse_io_tests"]


@dataclass
class CodeLimits:
    """Time limits of the code rewards (the sandbox's own limits are in ``SandboxConfig``)."""

    check_s: float = 3.0   # one ``code`` program's tests, all calls together
    case_s: float = 3.0    # one ``code_io`` case


CODE_LIMITS = CodeLimits()
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_BODY_STOPS = ("\nif __name__", "\nprint(", "\nassert ", "\n```")
_KIND_METRIC = {"timeout": "timeouts", "error": "program_errors", "no_verdict": "no_verdict",
                "output_limit": "program_errors"}


def _code_blocks(text: str) -> list[str]:
    """Fenced blocks, Python ones first if any are tagged."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    tagged = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return tagged or [body for _, body in blocks]


def _is_python(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def extract_program(completion: str, prompt: str = "", entry_point: str = "") -> str:
    """The program to test, as the reference evaluators build it.

    * A fenced code block: the last one defining ``entry_point`` (else the last one). A block
      with the full ``def`` runs after the prompt (whose imports and helpers it may use); one
      without is a body continuing the prompt.
    * No block, but a top-level ``def entry_point``: the prompt, then the completion.
    * Otherwise the completion is the function body: ``prompt + completion``, cut at the first
      top-level ``if __name__``, ``print(``, ``assert`` or a closing fence.
    """
    defines = re.compile(rf"^def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE) if entry_point else None
    prefix = prompt if prompt and _is_python(prompt) else ""
    blocks = _code_blocks(completion)
    if blocks:
        with_def = [b for b in blocks if defines and defines.search(b)]
        code = (with_def or blocks)[-1]
        if with_def or not entry_point:
            return f"{prefix}\n{code}" if prefix else code
        return prompt + code
    if defines is not None and defines.search(completion):
        return f"{prefix}\n{completion}" if prefix else completion
    cut = min((i for i in (completion.find(s) for s in _BODY_STOPS) if i >= 0), default=len(completion))
    return prompt + completion[:cut]


def parse_io_tests(tests: Any) -> list[tuple[str, str]]:
    """``[(stdin, expected stdout), ...]`` from a ``tests`` cell (see the module docstring)."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, dict) and "inputs" in tests:
        return [(str(i), str(o)) for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, list) or not tests:
        raise ValueError("tests must be a non-empty list of {input, output}")
    return [(str(case["input"]), str(case["output"])) for case in tests]


class _SandboxReward:
    """A TRL-signature reward with counters of what went wrong (``pop_metrics``)."""

    self_limited = True

    def __init__(self, name: str, score: Callable[[list[str], dict[str, list]], list[tuple[float | None, str]]]):
        self.__name__ = name
        self._score = score
        self._counts: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        scored = self._score(texts, {k: list(v) for k, v in columns.items()})
        with self._lock:
            self._counts.update(kind for _, kind in scored)
        return [score for score, _ in scored]

    def pop_metrics(self) -> dict[str, float]:
        """Counts since the last call: timeouts, program_errors, no_verdict."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        metrics = dict.fromkeys(("timeouts", "program_errors", "no_verdict"), 0.0)
        for kind, count in counts.items():
            if kind in _KIND_METRIC:
                metrics[_KIND_METRIC[kind]] += count
        return metrics


def _column(columns: dict[str, list], name: str, count: int) -> list:
    return columns.get(name) or [None] * count


def _score_check(texts: list[str], columns: dict[str, list]) -> list[tuple[float | None, str]]:
    count = len(texts)
    tests, entries = _column(columns, "test", count), _column(columns, "entry_point", count)
    questions, prompts = _column(columns, "question", count), _column(columns, "prompts", count)
    sandbox = default_sandbox()

    def one(i: int) -> tuple[float | None, str]:
        if not tests[i] or not entries[i]:
            return None, "n/a"
        prompt = questions[i] if isinstance(questions[i], str) else prompts[i]
        prompt = prompt if isinstance(prompt, str) else ""
        program = extract_program(texts[i], prompt, entries[i])
        verdict = run_check(sandbox, program, tests[i], entries[i],
                            setup=prompt if _is_python(prompt) else "", timeout_s=CODE_LIMITS.check_s)
        return (1.0 if verdict.passed else 0.0), verdict.kind

    return sandbox.map(one, range(count))


def _score_io(texts: list[str], columns: dict[str, list]) -> list[tuple[float | None, str]]:
    """(fraction passed or None, worst outcome) per completion; all cases on one pool map."""
    count = len(texts)
    cells = _column(columns, "tests", count)
    sandbox = default_sandbox()
    jobs, cases_of = [], []
    for i, cell in enumerate(cells):
        cases = parse_io_tests(cell) if cell else []
        cases_of.append(len(cases))
        program = _code_blocks(texts[i])[-1:] or [texts[i]]
        jobs += [(program[0], case) for case in cases]
    results = iter(sandbox.map(lambda job: run_io_case(sandbox, job[0], *job[1], timeout_s=CODE_LIMITS.case_s), jobs))
    out = []
    for n in cases_of:
        if n == 0:
            out.append((None, "n/a"))
            continue
        mine = [next(results) for _ in range(n)]
        bad = [r.kind for r in mine if r.kind not in ("passed", "failed")]
        out.append((sum(r.passed for r in mine) / n, bad[0] if bad else "ok"))
    return out


def _all_pass(texts, columns):
    return [(None if f is None else float(f == 1.0), kind) for f, kind in _score_io(texts, columns)]


code_reward = register("code")(_SandboxReward("code", _score_check))
code_io_reward = register("code_io")(_SandboxReward("code_io", _all_pass))
code_io_fraction_reward = register("code_io_fraction")(_SandboxReward("code_io_fraction", _score_io))
