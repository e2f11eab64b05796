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


def one_of(*choices) -> tuple:
    return (lambda v: v in choices, f"one of {list(choices)}")


def check_fields(obj, rules: dict[str, tuple]) -> None:
    """Check ``obj``'s fields against ``{name: rule}`` (None values are skipped: "unset").

    Meant for ``__post_init__``: raises :class:`FieldError` naming the field."""
    for name, (ok, what) in rules.items():
        value = getattr(obj, name)
        if value is not None and not ok(value):
            raise FieldError(name, f"must be {what}, got {value!r}")


__all__ = ["FINITE_NON_NEGATIVE", "FINITE_POSITIVE", "FieldError", "NON_NEGATIVE", "OPEN_UNIT_INTERVAL", "POSITIVE",
           "UNIT_INTERVAL", "UserError", "check_fields", "one_of"]
