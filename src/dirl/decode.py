"""``dirl.generate``: text prompts in, completions out, on the KV-cached engine (token ids in
and out: :class:`dirl.engine.engine.Engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["generate"]


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[str], sampling: Any = None,
             chat: bool = False, seed: int = 0) -> str | list[str]:
    """Decode text prompts with the KV-cached engine; one completion per prompt.

    ``sampling``: a ``dirl.SamplingSpec`` (default: its defaults, temperature 1); ``chat`` wraps
    each prompt in the tokenizer's chat template. Token ids in and out: ``dirl.Engine``.

    >>> import dirl
    >>> model, tokenizer = dirl.load_model("init:tiny")
    >>> text = dirl.generate(model, tokenizer, "12+34=", dirl.SamplingSpec(max_new_tokens=8, temperature=0))
    >>> isinstance(text, str)
    True
    """
    from dirl.data import build_prompt_ids
    from dirl.engine.engine import Engine
    from dirl.rollout import SamplingSpec

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompt_ids = build_prompt_ids(tokenizer, [{"prompt": p} for p in prompts], "plain", chat)
    params = (sampling or SamplingSpec()).params(tokenizer.stop_ids(), seed=seed)
    rollouts = Engine(model.eval()).generate(prompt_ids, params)
    texts = [tokenizer.decode(r.completion_ids) for r in rollouts]
    return texts[0] if isinstance(prompt, str) else texts
