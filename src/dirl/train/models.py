"""Where a trainer's starting model comes from: a checkpoint directory or ``init:<preset>``."""

from __future__ import annotations

import torch

from dirl.model.checkpoint import load_pretrained
from dirl.model.factory import InitConfig, build_tokenizer, init_model

INIT_PREFIX = "init:"


def load_model_spec(spec: str, device: str | torch.device = "cpu", dtype: str = "float32", seed: int = 0):
    """``(model, tokenizer)`` from a checkpoint dir, or a fresh random model for ``init:<preset>``
    (char tokenizer) -- handy for tests and the demo."""
    if spec.startswith(INIT_PREFIX):
        tokenizer = build_tokenizer("char")
        model = init_model(InitConfig(preset=spec[len(INIT_PREFIX):], seed=seed, param_dtype=dtype), tokenizer)
        return model.to(device), tokenizer
    model, tokenizer = load_pretrained(spec, dtype=dtype, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{spec}: the checkpoint has no tokenizer files")
    return model, tokenizer
