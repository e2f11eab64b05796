"""Reward registry and a per-call time limit.

A reward is any callable returning one score per completion (``list[float | None]``; None = not
applicable to this row). ``get_reward`` resolves a registered name or ``package.module:function``;
``resolve_reward`` also accepts the callable itself. How a reward is *called* (TRL's keyword
signature or dirl's ``fn(completions, **columns)``) is decided in ``dirl.rewards.scoring``.

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

import ctypes
import math
import importlib
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from dirl.errors import UserError

__all__ = [
    "DEFAULT_TIME_LIMIT_S",
    "MAX_BATCH_TIME_LIMIT_S",
    "RewardError",
    "RewardFn",
    "RewardTimeout",
    "available_rewards",
    "call_with_time_limit",
    "format_reward_spec",
    "get_reward",
    "parse_reward_spec",
    "register",
    "resolve_reward",
]

RewardFn = Callable[..., list]
_T = TypeVar("_T")

# Per-completion budget of one reward evaluation. Rule-based rewards take milliseconds; the limit
# only matters for pathological inputs (e.g. sympy simplifying a huge expression).
DEFAULT_TIME_LIMIT_S = 10.0
# What one reward may cost per batch, the batch call and the row-by-row retries together
# (2 x time_limit_s x batch size, capped here): a reward that hangs on every row costs this, not
# the batch limit plus a time limit per row.
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
    """A reward that cannot be used: an unknown name, a ``module:function`` that does not import,
    a function needing an argument no one gives, or one that failed on every completion."""


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name`` (:class:`RewardError` listing names if unknown).

    ``"package.module:function"`` imports a user's own reward function (same
    signature), so custom rewards need no change to dirl.
    """
    if ":" in name and name not in _REGISTRY:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (Exception, SystemExit) as err:  # noqa: BLE001 -- any failure of the user's module
            raise RewardError(f"cannot import reward {name!r}: {type(err).__name__}: {err}") from None
        if not callable(fn):
            raise RewardError(f"reward {name!r} is a {type(fn).__name__}, not a function")
        return fn
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RewardError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards()) or '(none)'}"
        ) from None


def resolve_reward(spec: str | RewardFn) -> tuple[str, RewardFn]:
    """``(name, function)`` of a reward given by name or as a callable.

    A callable is named like TRL names it in its metrics: ``fn.__name__`` (a
    ``functools.partial`` takes its function's name).
    """
    if isinstance(spec, str):
        return spec, get_reward(spec)
    if not callable(spec):
        raise RewardError(f"a reward must be a name or a callable, got {type(spec).__name__}")
    target = getattr(spec, "func", spec)  # functools.partial
    return getattr(target, "__name__", type(spec).__name__), spec


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
        name, weight = _split_weight(item)
        weights[name] = weight
        get_reward(name)
    if not weights:
        raise ValueError(f"reward spec {spec!r} names no reward")
    return weights


def _split_weight(item: str) -> tuple[str, float]:
    """``"math"`` / ``"math:0.5"`` / ``"pkg.mod:fn"`` / ``"pkg.mod:fn:0.5"`` -> ``(name, weight)``: the
    part after the last colon is a weight when it reads as a number, else part of the name."""
    head, sep, tail = item.rpartition(":")
    if not sep:
        return item.strip(), 1.0
    try:
        weight = float(tail)
    except ValueError:
        if head.strip() and ":" not in head and tail.strip().isidentifier():
            return item.strip(), 1.0  # package.module:function
        raise ValueError(f"reward {item!r}: weight {tail!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"reward {item!r}: weight {tail!r} is not a finite number")
    return head.strip(), weight


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
