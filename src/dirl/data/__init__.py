"""dirl.data: load and validate rows, render prompts, and generate built-in synthetic tasks.

A leaf package: it imports nothing from the rest of ``dirl``. Tasks name their reward function
by string (``Task.reward``), resolved by the caller in ``dirl.rewards``.
"""

from dirl.data.datasets import (
    load_prompt_rows,
    load_rows,
    load_sft_rows,
    parse_task_source,
    reward_prompt,
    sft_response,
    task_of,
    to_prompt_messages,
    to_sft_messages,
    validate_sft_row,
)
from dirl.data.prompts import PromptIds, build_prompt_ids
from dirl.data.tasks import TASKS, Task, get_task, split_of
from dirl.data.templates import PROMPT_TEMPLATES, DataError, render_prompt

__all__ = [
    "DataError",
    "PROMPT_TEMPLATES",
    "PromptIds",
    "TASKS",
    "Task",
    "build_prompt_ids",
    "get_task",
    "load_prompt_rows",
    "load_rows",
    "load_sft_rows",
    "parse_task_source",
    "render_prompt",
    "reward_prompt",
    "sft_response",
    "split_of",
    "task_of",
    "to_prompt_messages",
    "to_sft_messages",
    "validate_sft_row",
]
