"""Prompt token ids of question rows: template -> messages -> chat template (or plain text) -> ids.

The one place a row becomes a prompt, for RL rollouts and every held-out eval. ``tokenizer`` is
any object with ``encode`` / ``apply_chat_template`` (and ``hf.chat_template``): a leaf module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dirl.data.datasets import to_prompt_messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(getattr(tokenizer, "hf", None), "chat_template", None))


def _use_chat(tokenizer, chat: bool | None) -> bool:
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat and not has_chat_template(tokenizer):
        raise ValueError("chat=true but the tokenizer has no chat template; set chat=false")
    return use_chat


def _prompt_ids(tokenizer, row: Mapping[str, Any], template: str, use_chat: bool) -> list[int]:
    messages = to_prompt_messages(row, template)
    if use_chat:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer.encode(text)


def build_prompt_ids(tokenizer, rows: Sequence[Mapping[str, Any]], template: str,
                     chat: bool | None = None) -> list[list[int]]:
    """Prompt token ids per row. ``chat``: wrap in the chat template (None: when the tokenizer
    has one; True without one is a ``ValueError``)."""
    use_chat = _use_chat(tokenizer, chat)
    return [_prompt_ids(tokenizer, row, template, use_chat) for row in rows]


class PromptIds(Sequence):
    """:func:`build_prompt_ids` on demand: row ``i`` is templated and tokenized the first time it
    is asked for, then kept. An RL run draws a few prompts per step from a training set that may
    hold millions of rows; tokenizing them all up front (~0.15 ms a row) would delay the first step."""

    def __init__(self, tokenizer, rows: Sequence[Mapping[str, Any]], template: str, chat: bool | None = None):
        self._tokenizer, self._rows, self._template = tokenizer, rows, template
        self._use_chat = _use_chat(tokenizer, chat)  # a bad ``chat`` fails now, not at the first step
        self._cache: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index not in self._cache:
            self._cache[index] = _prompt_ids(self._tokenizer, self._rows[index], self._template, self._use_chat)
        return self._cache[index]
