"""Math answer rewards: ``math`` (math-verify equivalence) and ``gsm8k`` (numeric match).

``math``: the LAST brace-matched ``\\boxed{...}`` / ``\\fbox{...}`` of the completion is compared
with the reference answer (column ``answer``) by math-verify, so ``\\frac12``, ``1/2``, ``0.5``
and ``\\dfrac{1}{2}`` all match ``\\frac{1}{2}``. Both sides first get the light, symmetric
normalisation of ``normalize_math_answer`` (see there). 1.0 if equivalent, else 0.0 (also for a
missing box, or a check that runs past ``PER_ANSWER_TIME_LIMIT_S``: math-verify likewise treats
an undecided comparison as a mismatch). A row whose ``answer`` is None scores None.

Timeouts: math-verify's own ``parsing_timeout`` / ``timeout_seconds`` use ``signal.alarm``, which
(1) only takes whole seconds, (2) raises ValueError outside the main thread and (3) cancels any
enclosing ``ITIMER_REAL`` timer on exit (``alarm(0)``), which would silently disarm the
registry's per-call limit and pytest-timeout. So we switch them off (``None``) and wrap each
parse+verify in ``call_with_time_limit``, which nests correctly and also works off the main thread.

``gsm8k``: the boxed answer if present, else the number after the last ``####``; compared exactly
as a rational number with the reference (thousands commas removed, ``18.0`` == ``18``).
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from functools import lru_cache
from typing import Any

from math_verify import parse, verify

from dirl.rewards.registry import RewardTimeout, call_with_time_limit, register
from dirl.rewards.scoring import completion_text

__all__ = [
    "PER_ANSWER_TIME_LIMIT_S",
    "extract_last_boxed",
    "gsm8k_reward",
    "math_answers_match",
    "math_reward",
    "normalize_math_answer",
    "parse_math_answer",
    "parse_number",
]

logger = logging.getLogger(__name__)

# Budget for parsing + verifying one completion (math-verify's own default is 5 s).
PER_ANSWER_TIME_LIMIT_S = 5.0


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; ours replaces it, so the warning misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_DropDisabledTimeoutWarning())


# ----------------------------------------------------------------------------- extraction

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` whose braces close, else None.

    Braces are matched by depth, so ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``; escaped
    ``\\{``/``\\}`` (set braces) do not count. An unclosed box (a truncated generation) is skipped
    in favour of the previous complete one.
    """
    for start in reversed([m.end() for m in _BOXED_START.finditer(text)]):
        content = _brace_group(text, start)
        if content is not None:
            return content.strip()
    return None


def _brace_group(text: str, start: int) -> str | None:
    """Text from ``start`` up to the brace closing the ``{`` just before it, or None if unclosed."""
    depth = 1
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # skip the escaped character: \{ \} \\ are not grouping braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
        index += 1
    return None


# ----------------------------------------------------------------------------- normalisation

_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)(?:\{,\}|,\s*\\!|\\,|\\ )\s*(?=\d{3}(?!\d))")
# LaTeX spacing commands; applied after the thousands separators so "1\\,000" stays one number.
_LATEX_SPACING = re.compile(r"(?<!\\)\\[ ,;:!]|~|\\q?quad\b")  # not the 2nd half of "\\\\"
_TRAILING_PUNCTUATION = re.compile(r"(?<![.\\])[.,;]\s*$")
_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TRAILING_TEXT_UNIT = re.compile(
    r"(?P<value>.*\d.*?)\s*\\(?:text|mbox|mathrm|textrm|textup)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
    r"(?:\s*\^\s*\{?\d\}?)?"
)
_SIMPLE_VARIABLE = r"[A-Za-z](?:_\{[^{}=]*\}|_[A-Za-z0-9])?"
_ASSIGNMENT_PREFIX = re.compile(rf"\s*{_SIMPLE_VARIABLE}\s*=(?P<rest>[^=]+)")
_MEMBERSHIP_PREFIX = re.compile(rf"\s*{_SIMPLE_VARIABLE}\s*(?:\\in\b|∈)(?P<rest>.+)")
# A variable glued to a half-open interval, e.g. OlympiadBench's gold "t(0,4]" (lost "\in").
_GLUED_HALF_OPEN_INTERVAL = re.compile(r"\s*[A-Za-z]\s*(?P<rest>\([^()\[\]]*\]|\[[^()\[\]]*\))")


def normalize_math_answer(answer: str) -> str:
    """Light normalisation applied to BOTH the prediction and the reference before math-verify.

    math-verify already handles fractions, ``\\left``/``\\right``, ``\\text`` wrappers, common
    units and ``x=`` assignments; these steps cover the forms it misses or could misread:

    * dollar signs (math delimiters and currency) are dropped;
    * sentence punctuation at the end (``30.``, ``\\text{(E)},``) is dropped; LaTeX spacing
      commands (``\\ ``, ``\\;``, ``~``, ``\\quad``...) become plain spaces;
    * degree marks (``^\\circ``, ``^{\\circ}``, ``°``) are dropped (no degree-radian conversion);
    * LaTeX thousands separators (``1{,}000``, ``1,\\!000``, ``1\\,000``) and plain thousands
      commas in a lone number (``1,000``) are removed; a comma list like ``1,2`` is untouched;
    * a trailing ``\\text{units}`` after a value is dropped (``5\\text{ cm}^2`` -> ``5``);
    * a single-variable prefix is dropped: ``x=3`` -> ``3``, ``m_{\\max}=n-1`` -> ``n-1`` (only
      when there is exactly one ``=``, so ``x=1,y=2`` and ``x+y=3`` stay), ``x\\in[2,5)`` ->
      ``[2,5)``, and a letter glued to a half-open interval, ``t(0,4]`` -> ``(0,4]`` (function
      notation like ``f(x)`` has matching brackets and is left alone).
    """
    text = answer.replace("\\$", "").replace("$", "").strip()
    text = _DEGREES.sub("", text)
    text = _THOUSANDS_SEPARATOR.sub("", text)
    text = _LATEX_SPACING.sub(" ", text)
    text = _TRAILING_PUNCTUATION.sub("", text).strip()
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    unit_match = _TRAILING_TEXT_UNIT.fullmatch(text)
    if unit_match:
        text = unit_match.group("value").strip()
    for prefix in (_ASSIGNMENT_PREFIX, _MEMBERSHIP_PREFIX, _GLUED_HALF_OPEN_INTERVAL):
        prefix_match = prefix.fullmatch(text)
        if prefix_match and prefix_match.group("rest").strip():
            text = prefix_match.group("rest").strip()
            break
    return text


# ----------------------------------------------------------------------------- verification


@lru_cache(maxsize=8192)
def parse_math_answer(answer: str) -> tuple:
    """math-verify parse of a (normalised) answer, cached: a group of completions shares one gold.

    Returns a tuple of sympy objects and/or the fallback string (math-verify appends the raw
    match when parsing fails, so unparseable answers still compare by string). No time limit
    here: callers wrap this in ``call_with_time_limit``.
    """
    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=None))


def math_answers_match(prediction: str, reference: str) -> bool:
    """Whether a boxed prediction is equivalent to the reference answer (no time limit)."""
    gold = parse_math_answer(normalize_math_answer(reference))
    predicted = parse_math_answer(normalize_math_answer(prediction))
    if not gold or not predicted:
        return False
    return bool(verify(list(gold), list(predicted), timeout_seconds=None))


def _score_math_completion(completion: str, reference: Any) -> float | None:
    """1.0/0.0 for one completion; None when the row has no reference answer."""
    if reference is None:
        return None
    prediction = extract_last_boxed(completion)
    if prediction is None:
        return 0.0
    try:
        matched = call_with_time_limit(
            math_answers_match, PER_ANSWER_TIME_LIMIT_S, prediction, str(reference)
        )
    except RewardTimeout:
        logger.warning("math-verify timed out comparing %.80r with %.80r", prediction, reference)
        return 0.0
    return 1.0 if matched else 0.0


@register("math")
def math_reward(completions: list[str], answer: list[Any], **_columns: Any) -> list[float | None]:
    """1.0 if the last boxed answer is math-equivalent to ``answer``, else 0.0 (None: no answer)."""
    return [_score_math_completion(completion_text(c), ref)
            for c, ref in zip(completions, answer, strict=True)]


# ----------------------------------------------------------------------------- gsm8k

_FINAL_MARKER = "####"
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def parse_number(text: str) -> Fraction | None:
    """The number an answer states, as an exact Fraction, or None if there is none.

    Currency/percent signs, ``\\text``-style words and thousands commas are ignored; ``a/b`` and
    ``\\frac{a}{b}`` are fractions; for ``... = 18`` the value after the last ``=`` is taken.
    Otherwise the first number in the text counts (``18 dollars`` -> 18).
    """
    cleaned = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    cleaned = re.sub(r"\{,\}|,\\!|\\!|,", "", cleaned)
    cleaned = _LATEX_FRACTION.sub(r"\1/\2", cleaned).replace("−", "-")
    if "=" in cleaned:
        cleaned = cleaned.rsplit("=", 1)[1]
    match = _NUMBER.search(cleaned.replace(" ", ""))
    if match is None:
        return None
    try:
        return Fraction(match.group())
    except (ValueError, ZeroDivisionError):
        return None


def _gsm8k_prediction(completion: str) -> str | None:
    """The boxed answer if any, else the rest of the line after the last ``####``, else None."""
    boxed = extract_last_boxed(completion)
    if boxed is not None:
        return boxed
    if _FINAL_MARKER in completion:
        tail = completion.rsplit(_FINAL_MARKER, 1)[1].strip()
        return tail.splitlines()[0] if tail else None
    return None


def _score_gsm8k_completion(completion: str, reference: Any) -> float | None:
    """1.0 if the stated number equals the reference exactly, else 0.0 (None: no reference)."""
    if reference is None:
        return None
    expected = parse_number(str(reference))
    if expected is None:
        raise ValueError(f"gsm8k reference {reference!r} is not a number")
    prediction = _gsm8k_prediction(completion)
    if prediction is None:
        return 0.0
    return 1.0 if parse_number(prediction) == expected else 0.0


@register("gsm8k")
def gsm8k_reward(completions: list[str], answer: list[Any], **_columns: Any) -> list[float | None]:
    """1.0 if the boxed / ``####`` number equals ``answer`` numerically, else 0.0."""
    return [_score_gsm8k_completion(completion_text(c), ref)
            for c, ref in zip(completions, answer, strict=True)]
