"""The one user-error type of dirl.

A :class:`UserError` is bad input -- a config key, a data line, a checkpoint file, a resume
directory -- and its message names the key, ``file:line`` or file. The CLI turns every one into
``dirl <command>: <message>`` and exit status 2; anything else is a bug and keeps its traceback.
Each layer subclasses it (``ConfigError``, ``DataError``, ``CheckpointError``), so this module is
a leaf that every package, the leaves ``data`` and ``rewards`` included, may import.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the file, line or field."""


__all__ = ["UserError"]
