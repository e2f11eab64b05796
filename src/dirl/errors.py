"""The one user-error type of dirl, and the field checks config dataclasses run at load.

A :class:`UserError` is bad input -- a config key, a data line, a checkpoint file, a resume
directory -- and its message names the key, ``file:line`` or file. The CLI turns every one into
``dirl <command>: <message>`` and exit status 2; anything else is a bug and keeps its traceback.
Each layer subclasses it (``ConfigError``, ``DataError``, ``CheckpointError``), so this module is
a leaf that every package, the leaves ``data`` and ``rewards`` included, may import.

:func:`check_fields` is what a config dataclass's ``__post_init__`` calls to range-check its
values; the :class:`FieldError` it raises becomes a ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import math
import reprlib

# The longest value an error message echoes: a 200 MB value must not become a 200 MB message.
MAX_ECHO_CHARS = 120
_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = _ECHO.maxlong = MAX_ECHO_CHARS
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxdict, _ECHO.maxset = 3, 6, 6, 6, 6


def echo(value) -> str:
    """``repr(value)`` bounded in work and length (depth, items and characters), for messages.

    An alias-expanded YAML list or a 5000-digit int (whose ``repr`` Python itself refuses past
    4300 digits) is shown shortened, never expanded in full."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    try:
        text = _ECHO.repr(value)
    except Exception:  # noqa: BLE001 -- a hostile __repr__ or an int past the digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


class UserError(ValueError):
    """Bad input from the user; the message names the file, line or field."""


class FieldError(ValueError):
    """Raised by a config dataclass's ``__post_init__``: field ``key`` holds a bad value.
    :func:`from_dict` turns it into a :class:`ConfigError` naming the full dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


# Value rules for :func:`check_fields`: (predicate, what the value must be). NaN fails them all.
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FINITE_POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
FINITE_NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
UNIT_INTERVAL = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT_INTERVAL = (lambda v: 0 < v <= 1, "in (0, 1]")
# A run's seed: the derived seeds (run_seed * 1_000_003 + ...) must stay within torch's 64 bits.
SEED = (lambda v: 0 <= v < 2**32, "a seed in [0, 2**32 - 1]")


_BOOL = "true or false"


def _holds(ok, value) -> bool:
    try:
        return bool(ok(value))
    except (TypeError, ValueError, OverflowError):  # e.g. a string where a number belongs
        return False


def one_of(*choices) -> tuple:
    return (lambda v: v in choices, f"one of {list(choices)}")


def check_fields(obj, rules: dict[str, tuple]) -> None:
    """Check ``obj``'s fields against ``{name: rule}`` (None values are skipped: "unset").

    Meant for ``__post_init__``: raises :class:`FieldError` naming the field."""
    for name, (ok, what) in rules.items():
        value = getattr(obj, name)
        if value is not None and (isinstance(value, bool) and what != _BOOL or not _holds(ok, value)):
            raise FieldError(name, f"must be {what}, got {echo(value)}")


__all__ = ["FINITE_NON_NEGATIVE", "FINITE_POSITIVE", "FieldError", "NON_NEGATIVE", "OPEN_UNIT_INTERVAL", "POSITIVE",
           "SEED",
           "UNIT_INTERVAL", "UserError", "check_fields", "echo", "one_of"]
