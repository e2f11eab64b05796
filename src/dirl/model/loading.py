"""A model spec -> ``(model, tokenizer)``: a checkpoint directory (any family, picked from its
``config.json``) or ``init:<preset>`` (a fresh random model), with LoRA adapters when asked."""

from __future__ import annotations

from pathlib import Path

import torch

from dirl.config import ConfigError
from dirl.model.checkpoint import CheckpointError, load_pretrained
from dirl.model.factory import InitConfig, build_tokenizer, init_model
from dirl.model.lora import LoraConfig, apply_lora

INIT_PREFIX = "init:"


def load_model_spec(spec: str, device: str | torch.device = "cpu", dtype: str = "float32", seed: int = 0,
                    lora: LoraConfig | None = None):
    """``(model, tokenizer)`` from a checkpoint dir, or a fresh random model for ``init:<preset>``
    (char tokenizer, the default family) -- handy for tests and the demo. ``lora`` (enabled):
    adapters on a frozen base."""
    if spec.startswith(INIT_PREFIX):
        if lora is not None and lora.enabled:
            raise ConfigError(f"lora.r={lora.r} needs a checkpoint directory as model, not {spec!r} "
                              "(adapters on a random model that no file holds could not be merged)")
        tokenizer = build_tokenizer("char")
        model = init_model(InitConfig(preset=spec[len(INIT_PREFIX):], seed=seed, param_dtype=dtype), tokenizer)
        return model.to(device), tokenizer
    model, tokenizer = load_pretrained(spec, dtype=dtype, device=device)
    if tokenizer is None:
        raise CheckpointError(f"{spec}: the checkpoint has no tokenizer files")
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, base=str(Path(spec).resolve()))
    return model, tokenizer
