"""A model spec -> ``(model, tokenizer)``: a checkpoint directory (any family, picked from its
``config.json``) or ``init:[<family>/]<preset>`` (a fresh random model), with LoRA adapters when asked."""

from __future__ import annotations

from pathlib import Path

import torch

from dirl.config import ConfigError
from dirl.model.checkpoint import CheckpointError, load_pretrained
from dirl.model.factory import InitConfig, build_tokenizer, init_model
from dirl.model.families import DEFAULT_FAMILY
from dirl.model.lora import LoraConfig, apply_lora

INIT_PREFIX = "init:"


def init_spec(spec: str) -> tuple[str, str]:
    """``init:<preset>`` (the default family) or ``init:<family>/<preset>`` -> (family, preset)."""
    family, _, preset = spec[len(INIT_PREFIX):].rpartition("/")
    return family or DEFAULT_FAMILY, preset


def load_model_spec(spec: str, device: str | torch.device = "cpu", dtype: str = "float32", seed: int = 0,
                    lora: LoraConfig | None = None):
    """``(model, tokenizer)`` from a checkpoint dir, or a fresh random model for ``init:<preset>``
    (char tokenizer, the default family; ``init:llada/demo`` names another) -- handy for tests and the demo. ``lora`` (enabled):
    adapters on a frozen base."""
    if spec.startswith(INIT_PREFIX):
        if lora is not None and lora.enabled:
            raise ConfigError(f"lora.r={lora.r} needs a checkpoint directory as model, not {spec!r} "
                              "(adapters on a random model that no file holds could not be merged)")
        tokenizer = build_tokenizer("char")
        family, preset = init_spec(spec)
        model = init_model(InitConfig(family=family, preset=preset, seed=seed, param_dtype=dtype), tokenizer)
        return model.to(device), tokenizer
    model, tokenizer = load_pretrained(spec, dtype=dtype, device=device)
    if tokenizer is None:
        raise CheckpointError(f"{spec}: the checkpoint has no tokenizer files")
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, base=str(Path(spec).resolve()))
    return model, tokenizer
