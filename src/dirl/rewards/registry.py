"""Reward registry, fault-isolated batch scoring and a per-call time limit.

A reward function has the TRL-style signature ``fn(completions, **columns) -> list[float | None]``:
every column is a list aligned with ``completions`` (e.g. ``answer=[...]``), unknown columns are
accepted and ignored, and ``None`` means "not applicable to this row".

``compute_rewards`` never lets a reward function's failure escape: a batch call that raises,
returns something malformed or runs past its time limit is retried completion by completion, and
a completion whose own call still fails or times out scores 0.0 and is counted in
``rewards/<name>/errors``.

Time limits (``call_with_time_limit``) work from any thread:

* main thread: a nesting-aware ``SIGALRM`` interval timer interrupts the running Python code
  (sympy included). An enclosing timer (ours, or e.g. pytest-timeout's) is paused and re-armed
  with its remaining time afterwards, so limits nest instead of clobbering each other.
* other threads (signals cannot be used there): the call runs in a daemon worker thread; the caller
  stops waiting at the deadline and an asynchronous ``RewardTimeout`` is injected into the worker
  so pure-Python work stops at its next bytecode (C code that never returns to the interpreter
  cannot be interrupted, but it no longer blocks the caller).
"""

from __future__ import annotations

import importlib

import ctypes
import logging
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dirl.errors import UserError

__all__ = [
    "DEFAULT_TIME_LIMIT_S",
    "MAX_BATCH_TIME_LIMIT_S",
    "RewardFn",
    "RewardResult",
    "RewardTimeout",
    "available_rewards",
    "call_with_time_limit",
    "compute_rewards",
    "get_reward",
    "register",
]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list]
_T = TypeVar("_T")

# Per-completion budget of one reward evaluation. Rule-based rewards take milliseconds; the limit
# only matters for pathological inputs (e.g. sympy simplifying a huge expression).
DEFAULT_TIME_LIMIT_S = 10.0
# The batch call gets time_limit_s * batch size, capped here so that one hung row cannot hold a
# large batch for hours before the row-by-row retry isolates it.
MAX_BATCH_TIME_LIMIT_S = 120.0

_REGISTRY: dict[str, RewardFn] = {}


class RewardTimeout(BaseException):
    """Raised when a reward call exceeds its time limit.

    A ``BaseException`` (like math-verify's own ``TimeoutException``) so that the broad
    ``except Exception`` blocks inside math-verify and sympy cannot swallow it and carry on past
    the deadline.
    """


# ----------------------------------------------------------------------------- registry


def register(name: str, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under ``name``.

    Registering a second function under a taken name raises ``ValueError`` unless ``replace``.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn and not replace:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


class RewardError(UserError):
    """An unknown reward name, or a ``module:function`` that does not import."""


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name`` (:class:`RewardError` listing names if unknown).

    ``"package.module:function"`` imports a user's own reward function (same
    signature), so custom rewards need no change to dirl.
    """
    if ":" in name and name not in _REGISTRY:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise RewardError(f"cannot import reward {name!r}: {err}") from err
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RewardError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards()) or '(none)'}"
        ) from None


def available_rewards() -> list[str]:
    """Sorted names of all registered reward functions."""
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------- time limits


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"math"`` / ``"math,format"`` / ``"math:1,format:0.1"`` -> ordered {name: weight}.

    The first name is the *primary* reward that decides correctness. Unknown names raise
    ``ValueError`` listing the registered ones.
    """
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        try:
            weights[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward {item!r}: weight {weight!r} is not a number") from None
        get_reward(name.strip())
    if not weights:
        raise ValueError(f"reward spec {spec!r} names no reward")
    return weights


def format_reward_spec(weights: Mapping[str, float]) -> str:
    """The inverse of :func:`parse_reward_spec`: ``{"math": 1, "format": 0.1}`` -> ``"math:1,format:0.1"``."""
    return ",".join(f"{name}:{weight:g}" for name, weight in weights.items())


def call_with_time_limit(
    fn: Callable[..., _T], seconds: float | None, *args: Any, **kwargs: Any
) -> _T:
    """Call ``fn(*args, **kwargs)``; raise ``RewardTimeout`` if it runs longer than ``seconds``.

    ``seconds`` of None or <= 0 means no limit. See the module docstring for the mechanism.
    """
    if seconds is None or seconds <= 0:
        return fn(*args, **kwargs)
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _call_with_alarm(fn, seconds, args, kwargs)
    return _call_in_watched_thread(fn, seconds, args, kwargs)


def _call_with_alarm(fn: Callable[..., _T], seconds: float, args: tuple, kwargs: dict) -> _T:
    """Main-thread limit: an ITIMER_REAL alarm that raises ``RewardTimeout`` inside ``fn``."""
    armed = True

    def on_alarm(signum: int, frame: Any) -> None:
        if armed:
            raise RewardTimeout(f"reward call exceeded {seconds:.3g} s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)  # pause enclosing timer
    started = time.monotonic()
    # If the enclosing timer is due first, our alarm fires at its deadline and raises in its
    # stead; the enclosing timer is re-armed (almost) immediately on exit, so it still fires.
    delay = seconds if outer_delay <= 0 else min(seconds, outer_delay)
    signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        return fn(*args, **kwargs)
    finally:
        armed = False  # an alarm racing with the exit must not raise inside this cleanup
        signal.setitimer(signal.ITIMER_REAL, 0)
        # A handler installed from C reads back as None and cannot be passed to signal.signal.
        signal.signal(signal.SIGALRM, previous_handler if previous_handler is not None
                      else signal.SIG_DFL)
        if outer_delay > 0:
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-4), outer_interval)


def _call_in_watched_thread(
    fn: Callable[..., _T], seconds: float, args: tuple, kwargs: dict
) -> _T:
    """Off-main-thread limit: run ``fn`` in a daemon thread and abandon it at the deadline."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed back to the caller verbatim
            outcome["error"] = error

    worker = threading.Thread(target=run, name="dirl-reward-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        _raise_in_thread(worker, RewardTimeout)
        raise RewardTimeout(f"reward call exceeded {seconds:.3g} s (worker thread abandoned)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _raise_in_thread(thread: threading.Thread, exception: type[BaseException]) -> None:
    """Ask the interpreter to raise ``exception`` in ``thread`` at its next bytecode."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(exception)
        )


# ----------------------------------------------------------------------------- batch scoring


@dataclass
class RewardResult:
    """Outcome of ``compute_rewards``.

    ``total[i]`` is ``sum(weight * score)`` over the rewards whose score for completion ``i`` is
    not None; a None (not applicable) contributes 0 to the sum. ``per_reward`` keeps the raw
    scores (None where not applicable, 0.0 where the evaluation failed).

    ``metrics`` holds, for every reward name: ``rewards/<name>/mean`` (mean over the non-None
    scores, NaN if there are none) and ``rewards/<name>/errors`` (completions whose evaluation
    raised or timed out), plus ``rewards/total/mean``.
    """

    total: list[float]
    metrics: dict[str, float]
    per_reward: dict[str, list[float | None]] = field(default_factory=dict)


def compute_rewards(
    specs: Mapping[str, float] | Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
) -> RewardResult:
    """Score ``completions`` with the weighted rewards in ``specs``.

    ``specs`` maps reward names to weights, or lists names (weight 1.0 each). ``columns`` are the
    dataset columns, each a list aligned with ``completions``. ``time_limit_s`` is the limit per
    completion (the batch call gets ``time_limit_s * len(completions)``, capped at
    ``MAX_BATCH_TIME_LIMIT_S``). Unknown reward names and misaligned columns are caller bugs and
    raise ``ValueError``; failures inside reward functions never propagate.
    """
    weights = dict(specs) if isinstance(specs, Mapping) else {name: 1.0 for name in specs}
    functions = {name: get_reward(name) for name in weights}
    completions = list(completions)
    columns = {key: list(values) for key, values in (columns or {}).items()}
    for key, values in columns.items():
        if len(values) != len(completions):
            raise ValueError(
                f"column {key!r} has {len(values)} rows for {len(completions)} completions"
            )

    total = [0.0] * len(completions)
    metrics: dict[str, float] = {}
    per_reward: dict[str, list[float | None]] = {}
    for name, weight in weights.items():
        scores, errors = _score_isolated(name, functions[name], completions, columns, time_limit_s)
        per_reward[name] = scores
        for index, score in enumerate(scores):
            if score is not None:
                total[index] += float(weight) * score
        metrics[f"rewards/{name}/mean"] = _mean([s for s in scores if s is not None])
        metrics[f"rewards/{name}/errors"] = float(errors)
    metrics["rewards/total/mean"] = _mean(total)
    return RewardResult(total=total, metrics=metrics, per_reward=per_reward)


def _score_isolated(
    name: str,
    fn: RewardFn,
    completions: list[str],
    columns: dict[str, list],
    time_limit_s: float | None,
) -> tuple[list[float | None], int]:
    """Scores from one reward function and the number of completions whose evaluation failed.

    One batch call first (fast path); if it fails in any way, every completion is re-scored on
    its own so that a single bad row costs only that row.
    """
    count = len(completions)
    if count == 0:
        return [], 0
    batch_limit = None if time_limit_s is None else min(time_limit_s * count,
                                                        MAX_BATCH_TIME_LIMIT_S)
    try:
        return _checked_scores(call_with_time_limit(fn, batch_limit, completions, **columns),
                               count), 0
    except (Exception, RewardTimeout) as error:
        logger.warning("reward %r failed on a batch of %d (%s: %s); retrying row by row",
                       name, count, type(error).__name__, error)

    scores: list[float | None] = []
    errors = 0
    for index, completion in enumerate(completions):
        row_columns = {key: [values[index]] for key, values in columns.items()}
        try:
            raw = call_with_time_limit(fn, time_limit_s, [completion], **row_columns)
            scores.append(_checked_scores(raw, 1)[0])
        except (Exception, RewardTimeout) as error:
            logger.debug("reward %r failed on row %d: %s: %s",
                         name, index, type(error).__name__, error)
            scores.append(0.0)
            errors += 1
    return scores, errors


def _checked_scores(raw: Any, expected_length: int) -> list[float | None]:
    """Validate a reward function's return value: a list of finite reals or None, right length."""
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise TypeError(f"reward returned {type(raw).__name__}, expected a list")
    if len(raw) != expected_length:
        raise ValueError(f"reward returned {len(raw)} scores for {expected_length} completions")
    scores: list[float | None] = []
    for value in raw:
        if value is None:
            scores.append(None)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            scores.append(float(value))
        else:
            # NaN/inf or non-numbers would silently poison the advantage computation downstream.
            raise ValueError(f"reward returned an invalid score {value!r}")
    return scores


def _mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN for an empty sequence (a metric with no data, not a zero reward)."""
    return sum(values) / len(values) if values else float("nan")
