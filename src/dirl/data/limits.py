"""Bounds on the work one data row may cause, checked before it is parsed, rendered or tokenized.

A data line is capped in size (``DIRL_MAX_LINE_BYTES``, default 1 MiB): a 16 MB line was
tokenized into gigabytes, and the tokenizer aborted the process. A row is also capped in depth,
and its text must be valid Unicode (a lone surrogate parsed from ``"\\ud800"`` breaks the
tokenizer later, far from the line that held it). Every failure is a ``DataError`` naming where.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from dirl.data.templates import DataError

__all__ = ["DEFAULT_MAX_LINE_BYTES", "MAX_ROW_DEPTH", "check_row_bounds", "max_line_bytes", "parse_json",
           "too_long"]

DEFAULT_MAX_LINE_BYTES = 1 << 20


def max_line_bytes() -> int:
    """The cap on one data line / row (bytes of JSON, characters of text): ``DIRL_MAX_LINE_BYTES``,
    default 1 MiB. It is checked before the line is parsed or tokenized: a 16 MB line would be
    tokenized into gigabytes."""
    raw = os.environ.get("DIRL_MAX_LINE_BYTES", "")
    try:
        value = int(raw) if raw else DEFAULT_MAX_LINE_BYTES
    except ValueError:
        raise DataError(f"DIRL_MAX_LINE_BYTES={raw[:40]!r} is not an integer") from None
    if value <= 0:
        raise DataError(f"DIRL_MAX_LINE_BYTES must be > 0, got {value}")
    return value


def too_long(where: str, cap: int) -> DataError:
    return DataError(f"{where}: the row is over the size cap of {cap:,} bytes (raise it with DIRL_MAX_LINE_BYTES)")


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure (bad JSON, a 5000-digit int, nesting past the recursion
    limit) is a DataError naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: invalid JSON ({' '.join(str(exc).split())[:160]})") from None


MAX_ROW_DEPTH = 32


def check_row_bounds(row: Any, where: str, cap: int) -> None:
    """A row's size, depth and text, checked before anything renders or tokenizes it: at most
    ``cap`` characters of text in all, nested at most ``MAX_ROW_DEPTH`` deep, every string
    encodable as UTF-8 (a lone surrogate like ``"\\ud800"`` would break the tokenizer)."""
    total, stack = 0, [(row, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_ROW_DEPTH:
            raise DataError(f"{where}: the row is nested deeper than {MAX_ROW_DEPTH} levels")
        if isinstance(value, str):
            total += len(value)
            if total > cap:
                raise too_long(where, cap)
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{where}: text holds a lone surrogate ({value[exc.start]!r} at character "
                                f"{exc.start}); not valid Unicode") from None
        elif isinstance(value, Mapping):
            stack.extend((v, depth + 1) for pair in value.items() for v in pair)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
        else:
            total += 8
            if total > cap:
                raise too_long(where, cap)
