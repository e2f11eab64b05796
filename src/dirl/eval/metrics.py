"""Evaluation metrics: correctness rule, the unbiased pass@k estimator and the run summary.

Pure functions over plain numbers and sample dicts (no torch), so the trainers, the demo and
``dirl eval`` report exactly the same numbers.

Correctness rule: a sample is *correct* iff its primary reward (the first one named in the
reward spec) is ``>= 1.0 - 1e-9``. Binary rewards (math, gsm8k, countdown) are 0/1, so this is
"the answer matched"; partial-credit rewards (sudoku cell accuracy) count only when perfect. The
mean reward (weighted total over every named reward) is reported separately as ``mean_reward``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CORRECT_THRESHOLD", "SUMMARY_KEYS", "is_correct", "mean_pass_at_k", "pass_at_k", "summarize",
]

CORRECT_THRESHOLD = 1.0 - 1e-9

# Keys every summary has (the tests and the docs rely on them).
SUMMARY_KEYS = (
    "accuracy", "pass@k", "k", "mean_reward", "mean_length", "tokens_per_forward", "tokens_per_s",
    "num_samples", "num_questions", "reward_errors",
)


def is_correct(score: float | None) -> bool:
    """The correctness rule above; a not-applicable (None) score is not correct."""
    return score is not None and score >= CORRECT_THRESHOLD


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question from ``n`` samples of which ``c`` are correct.

    Chen et al. 2021 (Codex), eq. 1: ``1 - C(n-c, k) / C(n, k)``, the probability that a random
    size-``k`` subset of the ``n`` samples holds at least one correct one. With ``n == k`` it is
    1.0 if any sample is correct, else 0.0; with ``k == 1`` it is ``c / n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every size-k subset contains a correct sample
        return 1.0
    # Product form of C(n-c, k) / C(n, k): numerically stable, no huge binomials.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct_by_question: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over questions, each given as its list of per-sample correct flags."""
    if not correct_by_question:
        return float("nan")
    return sum(pass_at_k(len(flags), sum(map(bool, flags)), k)
               for flags in correct_by_question) / len(correct_by_question)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _json_number(value: float) -> float | None:
    """NaN/inf become None so the summary stays strict JSON (``json.dumps`` writes bare NaN)."""
    return value if isinstance(value, (int, bool)) or math.isfinite(value) else None


def summarize(samples: Sequence[Mapping[str, Any]], k: int, *, generate_seconds: float,
              reward_errors: Mapping[str, int], wall_seconds: float | None = None) -> dict[str, Any]:
    """Aggregate per-sample records (as written to ``samples.jsonl``) into the run summary.

    ``accuracy`` is the mean correctness over all samples (= unbiased pass@1); ``pass@k`` groups
    samples by ``question_index``. Lengths count completion tokens (up to and including the stop
    token), so ``tokens_per_forward`` = completion tokens / denoising forwards is the useful
    parallelism (positions decoded after the stop token do not count), and ``tokens_per_s`` =
    completion tokens / seconds spent in generation (reward scoring excluded).
    """
    by_question: dict[int, list[bool]] = {}
    for sample in samples:
        by_question.setdefault(sample["question_index"], []).append(bool(sample["correct"]))
    tokens = sum(s["num_tokens"] for s in samples)
    forwards = sum(s["num_forwards"] for s in samples)
    summary: dict[str, Any] = {
        "accuracy": _mean([float(s["correct"]) for s in samples]),
        "pass@k": mean_pass_at_k(list(by_question.values()), k) if samples else float("nan"),
        "k": k,
        "mean_reward": _mean([s["reward"] for s in samples]),
        "mean_length": _mean([s["num_tokens"] for s in samples]),
        "tokens_per_forward": tokens / forwards if forwards else float("nan"),
        "tokens_per_s": tokens / generate_seconds if generate_seconds > 0 else float("nan"),
        "num_samples": len(samples),
        "num_questions": len(by_question),
        "reward_errors": int(sum(reward_errors.values())),
        "reward_errors_by_name": {name: int(n) for name, n in reward_errors.items()},
        "truncated": _mean([float(s["finish_reason"] == "length") for s in samples]),
        "generate_s": generate_seconds,
    }
    if wall_seconds is not None:
        summary["wall_s"] = wall_seconds
    return {key: _json_number(v) if isinstance(v, float) else v for key, v in summary.items()}
