"""Weighted, fault-isolated scoring of completions with TRL-compatible reward functions.

Call forms (picked by inspecting the callable's signature, once per call of ``compute_rewards``):

* **TRL** (``GRPOTrainer``'s): every argument by keyword -- ``prompts``, ``completions``,
  ``completion_ids`` (also under TRL's newer name ``completions_ids``) and every dataset column
  by its name (``prompt`` excepted: it is ``prompts``). A function with ``**kwargs`` gets all of
  them; one without gets the ones it names. A named argument that is neither is a caller bug
  (``RewardError`` naming it and the columns there are).
* **dirl** (legacy): a first parameter with another name takes the completions positionally,
  ``fn(texts, **columns)``.

As in TRL, completions are strings for a standard dataset and ``[{"role": "assistant",
"content": text}]`` when the prompts are conversational (lists of messages); a score of
``None`` means "not applicable" and is left out of the weighted sum (and out of the reward's
mean / std).

``compute_rewards`` never lets a reward function's failure escape: a batch call that raises,
returns something malformed or runs past its time limit is retried completion by completion, and
a completion whose own call still fails or times out scores 0.0 and is counted in
``rewards/<name>/errors``. A reward that failed on *every* completion is listed in
``RewardResult.failures``; ``RewardResult.raise_if_all_failed`` turns that into a ``RewardError``
(the trainers call it on their first step, so a broken reward stops the run instead of training
on zeros).

Two optional attributes of a reward function: ``self_limited = True`` (it bounds its own time,
as the sandboxed code rewards do per program, so no alarm interrupts its worker pool) and
``pop_metrics()`` (extra counts, logged as ``rewards/<name>/<key>``).
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dirl.errors import echo
from dirl.rewards.registry import (
    DEFAULT_TIME_LIMIT_S,
    MAX_BATCH_TIME_LIMIT_S,
    RewardError,
    RewardFn,
    RewardTimeout,
    call_with_time_limit,
    resolve_reward,
)

__all__ = ["RewardResult", "RewardSpecs", "compute_rewards", "completion_text"]

logger = logging.getLogger(__name__)

RewardSpecs = Mapping[Any, float] | Sequence[Any]  # {name or callable: weight} or [name or callable]
TRAINER_ARGUMENTS = ("prompts", "completions", "completion_ids", "completions_ids")


def completion_text(completion: Any) -> str:
    """The text of a completion in either TRL format (a string or ``[{"content": ...}]``)."""
    if isinstance(completion, str):
        return completion
    return "".join(turn["content"] for turn in completion)


@dataclass
class RewardResult:
    """Outcome of ``compute_rewards``.

    ``total[i]`` is ``sum(weight * score)`` over the rewards whose score for completion ``i`` is
    not None. ``per_reward`` keeps the raw scores (None where not applicable, 0.0 where the
    evaluation failed). ``metrics`` holds, for every reward name, TRL's ``rewards/<name>/mean``
    and ``rewards/<name>/std`` (sample std, as TRL's ``nanstd``; over the non-None scores, NaN
    when there are none) and ``rewards/<name>/errors``, plus ``rewards/total/mean``.
    ``failures`` maps a reward that failed on every completion to its first error.
    """

    total: list[float]
    metrics: dict[str, float]
    per_reward: dict[str, list[float | None]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def raise_if_all_failed(self) -> None:
        """``RewardError`` naming the first reward that failed on every completion, if any."""
        for name, error in self.failures.items():
            count = len(self.total)
            raise RewardError(f"reward {name!r} failed on all {count} completions (first error: "
                              f"{error}); fix the reward function or its columns")


@dataclass(frozen=True)
class _CallForm:
    """How to call one reward function (see the module docstring)."""

    positional: bool            # dirl form: completions go in as the first positional argument
    takes_all: bool             # has **kwargs
    named: tuple[str, ...]      # keyword parameters it names
    required: tuple[str, ...]   # named parameters without a default

    @classmethod
    def of(cls, fn: RewardFn) -> "_CallForm":
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature: the dirl form
            return cls(True, True, (), ())
        kind = inspect.Parameter
        takes_all = any(p.kind is kind.VAR_KEYWORD for p in params)
        plain = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD,
                                                 kind.KEYWORD_ONLY)]
        positional = bool(plain) and plain[0].kind is not kind.KEYWORD_ONLY and (
            plain[0].name not in TRAINER_ARGUMENTS or plain[0].kind is kind.POSITIONAL_ONLY)
        if positional:
            plain = plain[1:]
        named = tuple(p.name for p in plain)
        required = tuple(p.name for p in plain if p.default is kind.empty)
        return cls(positional, takes_all, named, required)

    def arguments(self, name: str, available: dict[str, list]) -> tuple[tuple, dict[str, list]]:
        """``(args, kwargs)`` for one call, from every available (aligned) list."""
        missing = [key for key in self.required if key not in available]
        if missing:
            columns = [key for key in available if key not in TRAINER_ARGUMENTS]
            raise RewardError(f"reward {name!r} needs argument {missing[0]!r}, which is neither a "
                             f"trainer argument {TRAINER_ARGUMENTS} nor a dataset column "
                             f"(columns: {', '.join(columns) or 'none'})")
        args = (available["completions"],) if self.positional else ()
        skip = {"completions"} if self.positional else set()
        keys = available if self.takes_all else self.named
        return args, {key: available[key] for key in keys if key in available and key not in skip}


def compute_rewards(
    specs: RewardSpecs,
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    prompts: Sequence[Any] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
) -> RewardResult:
    """Score ``completions`` (strings) with the weighted rewards in ``specs``.

    ``specs`` maps reward names or callables to weights, or lists them (weight 1.0 each).
    ``columns`` are the dataset columns, each a list aligned with ``completions``; ``prompts``
    (strings, or message lists for a conversational dataset) and ``completion_ids`` are passed to
    the rewards that take them. ``time_limit_s`` is the limit per completion; one reward's whole
    evaluation of the batch is bounded by ``2 * time_limit_s * len(completions)``, capped at
    ``MAX_BATCH_TIME_LIMIT_S`` (see ``_score_isolated``). Unknown names
    and missing arguments are a ``RewardError``, misaligned columns a ``ValueError``; failures
    inside reward functions never propagate.

    >>> def reward_len(completions, **kwargs):  # TRL's quick-start reward
    ...     return [-abs(20 - len(completion)) for completion in completions]
    >>> compute_rewards([reward_len], ["a" * 18, "b" * 25]).total
    [-2.0, -5.0]
    """
    weighted = specs.items() if isinstance(specs, Mapping) else ((spec, 1.0) for spec in specs)
    functions: dict[str, tuple[RewardFn, float]] = {}
    for spec, weight in weighted:
        name, fn = resolve_reward(spec)
        if name in functions:
            raise RewardError(f"two rewards are named {name!r}; give one a different __name__")
        functions[name] = (fn, float(weight))
    available = _available(completions, columns, prompts, completion_ids)

    count = len(completions)
    total = [0.0] * count
    result = RewardResult(total=total, metrics={})
    for name, (fn, weight) in functions.items():
        # A reward that bounds its own time (the sandboxed code rewards) runs without the alarm.
        limit = None if getattr(fn, "self_limited", False) else time_limit_s
        scores, errors, first_error = _score_isolated(name, fn, available, count, limit)
        result.per_reward[name] = scores
        for index, score in enumerate(scores):
            if score is not None:
                total[index] += weight * score
        present = [s for s in scores if s is not None]
        result.metrics[f"rewards/{name}/mean"] = _mean(present)
        result.metrics[f"rewards/{name}/std"] = _std(present)
        result.metrics[f"rewards/{name}/errors"] = float(errors)
        if callable(getattr(fn, "pop_metrics", None)):  # e.g. the code rewards' timeouts
            result.metrics.update({f"rewards/{name}/{key}": float(value)
                                   for key, value in fn.pop_metrics().items()})
        if count and errors == count:
            result.failures[name] = first_error
    result.metrics["rewards/total/mean"] = _mean(total)
    if count and all(score is None for scores in result.per_reward.values() for score in scores):
        names = ", ".join(repr(name) for name in result.per_reward)
        raise RewardError(f"reward {names} returned None (not applicable) for all {count} completions: "
                          "nothing scores them")
    return result


def _available(completions, columns, prompts, completion_ids) -> dict[str, list]:
    """Every argument a reward may take, each a list aligned with ``completions``."""
    completions = list(completions)
    available: dict[str, list] = {key: list(values) for key, values in (columns or {}).items()
                                  if key != "prompt"}
    if prompts is not None:
        available["prompts"] = list(prompts)
        if any(not isinstance(p, str) for p in available["prompts"]):  # conversational (TRL)
            completions = [[{"role": "assistant", "content": text}] for text in completions]
    if completion_ids is not None:
        available["completion_ids"] = available["completions_ids"] = [list(i) for i in completion_ids]
    available["completions"] = completions
    for key, values in available.items():
        if len(values) != len(completions):
            raise ValueError(f"column {key!r} has {len(values)} rows for {len(completions)} completions")
    return available


def _score_isolated(name: str, fn: RewardFn, available: dict[str, list], count: int,
                    time_limit_s: float | None) -> tuple[list[float | None], int, str]:
    """Scores from one reward function, the number of completions whose evaluation failed and
    the first error.

    One batch call first (fast path); if it raises (``SystemExit`` included) or times out, every
    completion is re-scored on its own so that a single bad row costs only that row. The whole
    costs at most the per-batch limit (``2 * time_limit_s * count``, capped at
    ``MAX_BATCH_TIME_LIMIT_S``): the batch call gets half of it, the row calls share the other
    half (a row past that deadline fails as timed out). A result that breaks the contract -- the wrong
    length, a non-finite or non-numeric score -- is a :class:`RewardError` naming the reward, not
    a row failure: retrying row by row would hide it (one score for four completions would score
    every row).
    """
    if count == 0:
        return [], 0, ""
    form = _CallForm.of(fn)
    args, kwargs = form.arguments(name, available)
    half = (None if time_limit_s is None or time_limit_s <= 0
            else min(time_limit_s * count, MAX_BATCH_TIME_LIMIT_S / 2))
    try:
        raw = call_with_time_limit(fn, half, *args, **kwargs)
    except (Exception, RewardTimeout, SystemExit) as error:
        logger.warning("reward %r failed on a batch of %d (%s: %s); retrying row by row",
                       name, count, type(error).__name__, error)
    else:
        return _checked_scores(name, raw, count), 0, ""

    deadline = None if half is None else time.monotonic() + half  # the retries share the other half
    scores: list[float | None] = []
    errors, first_error = 0, ""
    for index in range(count):
        row_args = tuple(values[index:index + 1] for values in args)
        row_kwargs = {key: values[index:index + 1] for key, values in kwargs.items()}
        limit = time_limit_s if deadline is None else min(time_limit_s, deadline - time.monotonic())
        try:
            if limit is not None and limit <= 0:
                raise RewardTimeout(f"the batch's time limit of {2 * half:.3g} s is spent")
            raw = call_with_time_limit(fn, limit, *row_args, **row_kwargs)
        except (Exception, RewardTimeout, SystemExit) as error:
            logger.debug("reward %r failed on row %d: %s: %s", name, index, type(error).__name__, error)
            scores.append(0.0)
            errors += 1
            first_error = first_error or f"{type(error).__name__}: {error}"
            continue
        scores.append(_checked_scores(name, raw, 1)[0])
    return scores, errors, first_error


def _checked_scores(name: str, raw: Any, expected_length: int) -> list[float | None]:
    """Validate a reward function's return value: a list (or a 1-D numpy array / tensor, as TRL
    accepts) of finite reals or None, one per completion; else a RewardError naming the reward."""
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):  # numpy array, torch tensor
        raw = raw.tolist()
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise RewardError(f"reward {name!r} returned {type(raw).__name__}, expected a list of scores")
    if len(raw) != expected_length:
        raise RewardError(f"reward {name!r} returned {len(raw)} scores for {expected_length} completions")
    scores: list[float | None] = []
    for index, value in enumerate(raw):
        if hasattr(value, "item") and not isinstance(value, numbers.Real):  # a 0-d array or tensor
            value = value.item()
        if value is None:
            scores.append(None)
        elif isinstance(value, numbers.Real) and _finite(value):
            scores.append(float(value))
        else:
            # NaN/inf or non-numbers would silently poison the advantage computation downstream.
            raise RewardError(f"reward {name!r} returned an invalid score {echo(value)} for completion "
                              f"{index}; scores must be finite numbers or None")
    return scores


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN for an empty sequence (a metric with no data, not a zero reward)."""
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (TRL's ``nanstd``); 0 for one value, NaN for none."""
    if len(values) < 2:
        return 0.0 if values else float("nan")
    return statistics.stdev(values)
