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


def build_prompt_ids(tokenizer, rows: Sequence[Mapping[str, Any]], template: str,
                     chat: bool | None = None) -> list[list[int]]:
    """Prompt token ids per row. ``chat``: wrap in the chat template (None: when the tokenizer
    has one; True without one is a ``ValueError``)."""
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat and not has_chat_template(tokenizer):
        raise ValueError("chat=true but the tokenizer has no chat template; set chat=false")
    prompts = []
    for row in rows:
        messages = to_prompt_messages(row, template)
        if use_chat:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages)
        prompts.append(tokenizer.encode(text))
    return prompts
