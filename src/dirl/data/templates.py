"""Prompt templates: turn a data row into the user prompt text.

Templates are ``str.format`` strings over row columns (almost always just ``{question}``).
Literal braces must be doubled (``{{}}``) so that e.g. DiRL's ``\\boxed{}`` survives formatting.

``DataError`` lives here, the lowest module of the package, so that both the loaders and the
templates raise the same exception type without an import cycle.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from dirl.errors import UserError

__all__ = ["DataError", "PROMPT_TEMPLATES", "render_prompt", "template_fields"]


class DataError(UserError):
    """Malformed data or an unusable prompt template; the message says where and which field."""


PROMPT_TEMPLATES: dict[str, str] = {
    # The question as is: what the compact synthetic tasks use (a char-level model reads it).
    "plain": "{question}",
    # DiRL's math prompt; the doubled braces render as a literal "\boxed{}".
    "dirl_math": (
        "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    ),
    # The question is "Numbers: [..]\nTarget: T" (shared countdown rows and the countdown task).
    "countdown": (
        "{question}\nUsing each number exactly once with + - * / and parentheses, write an "
        "equation that equals the target. Put the final equation inside <answer> </answer>."
    ),
    # A stdin -> stdout programming problem (rows in the ``code_io`` reward's format, ``tests``).
    "code_io": (
        "{question}\nWrite a Python 3 program that reads the input from standard input and "
        "prints the answer to standard output. Put the whole program in one ```python code block."
    ),
    # The question is the 16-character puzzle string (shared sudoku rows and the sudoku task).
    "sudoku": (
        "Solve this 4x4 Sudoku. The grid is given row by row as 16 digits, 0 marks an empty "
        "cell:\n{question}\nEvery row, column and 2x2 box must contain 1, 2, 3 and 4 exactly "
        "once. Put the 16-digit solution inside <answer> </answer>."
    ),
}


def template_fields(template: str) -> list[str]:
    """Return the column names a format template refers to, in order of first use."""
    fields: list[str] = []
    for _literal, field, _spec, _conv in string.Formatter().parse(template):
        if field is None:
            continue
        # "{row[x]}" or "{a.b}" still needs column "row" / "a".
        name = field.split(".", 1)[0].split("[", 1)[0]
        if name not in fields:
            fields.append(name)
    return fields


# The widest field a template may pad to (``{question:>9999}``): a width of 2e9 renders 2 GB.
MAX_FORMAT_WIDTH = 10_000


def _check_specs(label: str, fmt: str) -> None:
    """Refuse fields that reach past a column (``{question.__class__}``) and format specs that make
    rendering unbounded: a width/precision above ``MAX_FORMAT_WIDTH``, or one taken from the row
    (``{question:{w}}``)."""
    for _literal, field, spec, _conv in string.Formatter().parse(fmt):
        if field and ("." in field or "[" in field):  # {question.__class__...} reaches Python internals
            raise DataError(f"{label}: field '{field[:40]}' uses attribute or index access; name a column only")
        if field is None or not spec:
            continue
        if "{" in spec:
            raise DataError(f"{label}: field '{field}' takes its format spec from the row; not allowed")
        digits = [int(d) for d in re.findall(r"\d{1,12}", spec)]
        if any(d > MAX_FORMAT_WIDTH for d in digits) or re.search(r"\d{13}", spec):
            raise DataError(f"{label}: field '{field}' pads to more than {MAX_FORMAT_WIDTH:,} characters "
                            f"(spec {spec[:40]!r})")


def _resolve_template(template: str) -> tuple[str, str]:
    """Map a registry name or a literal template to ``(label, format string)``."""
    if template in PROMPT_TEMPLATES:
        return f"template '{template}'", PROMPT_TEMPLATES[template]
    if "{" in template:
        return "literal template", template
    names = ", ".join(sorted(PROMPT_TEMPLATES))
    raise DataError(
        f"unknown prompt template '{template}': use one of [{names}] "
        "or a literal format string containing '{question}'"
    )


def render_prompt(template: str, row: Mapping[str, Any]) -> str:
    """Render the user prompt for ``row`` with a registry template name or a literal template.

    Raises ``DataError`` for an unknown name, a column the template needs but the row lacks, or a
    literal template that is not a valid format string (e.g. single braces that should be doubled).
    """
    label, fmt = _resolve_template(template)
    try:
        fields = template_fields(fmt)
    except ValueError as exc:
        raise DataError(
            f"{label} is not a valid format string ({exc}); write literal braces as {{{{ }}}}"
        ) from exc
    if any(not name or name.isdigit() for name in fields):
        # "{}" / "{0}" would be positional: almost surely a literal brace that was not doubled.
        raise DataError(f"{label} has a positional '{{}}' field; write literal braces as {{{{}}}}")
    _check_specs(label, fmt)
    missing = [name for name in fields if name not in row]
    if missing:
        have = ", ".join(row) or "nothing"
        raise DataError(f"{label} needs field '{missing[0]}' (row has: {have})")
    try:
        return fmt.format_map(row)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        raise DataError(f"{label} could not be rendered: {exc!r}") from exc
