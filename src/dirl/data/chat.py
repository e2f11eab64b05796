"""Conversation formats: OpenAI ``messages``, ShareGPT ``conversations`` and TRL's
``prompt`` / ``completion`` columns, all brought to one form -- a list of ``{role, content}`` turns.

* OpenAI / TRL conversational: ``{"messages": [{"role": "user", "content": "..."}, ...]}``;
* ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}`` --
  turned into ``messages`` when a row is loaded (``normalize_row``), so everything downstream
  sees one format;
* TRL prompt-completion: ``{"prompt": ..., "completion": ...}``, each a string (one user / one
  assistant turn) or a list of messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dirl.data.templates import DataError

__all__ = ["ROLES", "SHAREGPT_ROLES", "as_messages", "normalize_row", "validate_messages"]

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (the common variants) -> OpenAI roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bard": "assistant"}


def validate_messages(messages: Any, where: str, field: str = "messages", need_assistant: bool = True) -> None:
    """Check a list of {role, content} turns (with a non-empty assistant turn if ``need_assistant``)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of {{role, content}}")
    for k, turn in enumerate(messages):
        if not isinstance(turn, Mapping) or turn.get("role") not in ROLES:
            raise DataError(f"{where}: field '{field}[{k}]' needs a role in {ROLES}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: field '{field}[{k}].content' must be a string")
    if need_assistant and not any(t["role"] == "assistant" and t["content"].strip() for t in messages):
        raise DataError(f"{where}: field '{field}' has no non-empty assistant turn")


def _sharegpt_messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}}")
    messages = []
    for k, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"{where}: field 'conversations[{k}].from' must be one of "
                            f"{sorted(SHAREGPT_ROLES)}, got {speaker!r}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: field 'conversations[{k}].value' must be a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def normalize_row(row: Any, where: str) -> Any:
    """A row with ShareGPT ``conversations`` (and no ``messages``) gets them as ``messages``;
    anything else is returned as is (validation happens later, per use)."""
    if isinstance(row, Mapping) and "conversations" in row and "messages" not in row:
        rest = {key: value for key, value in row.items() if key != "conversations"}
        return {**rest, "messages": _sharegpt_messages(row["conversations"], where)}
    return row


def as_messages(value: Any, role: str, where: str, field: str) -> list[dict[str, str]]:
    """A TRL ``prompt`` / ``completion`` value as turns: a string is one ``role`` turn, a list is
    taken as messages (checked, copied)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return [{"role": role, "content": value}]
    validate_messages(value, where, field, need_assistant=False)
    return [{"role": t["role"], "content": t["content"]} for t in value]
