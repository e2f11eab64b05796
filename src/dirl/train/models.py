"""Where a trainer's starting model comes from: a checkpoint directory or ``init:<preset>``,
with LoRA adapters injected when ``lora.r > 0``."""

from __future__ import annotations

from pathlib import Path

import torch

from dirl.config import ConfigError
from dirl.model.checkpoint import load_pretrained
from dirl.model.factory import InitConfig, build_tokenizer, init_model
from dirl.model.lora import LoraConfig, apply_lora

INIT_PREFIX = "init:"


def load_model_spec(spec: str, device: str | torch.device = "cpu", dtype: str = "float32", seed: int = 0,
                    lora: LoraConfig | None = None):
    """``(model, tokenizer)`` from a checkpoint dir, or a fresh random model for ``init:<preset>``
    (char tokenizer) -- handy for tests and the demo. ``lora`` (enabled): adapters on a frozen base."""
    if spec.startswith(INIT_PREFIX):
        if lora is not None and lora.enabled:
            raise ConfigError(f"lora.r={lora.r} needs a checkpoint directory as model, not {spec!r} "
                              "(adapters on a random model that no file holds could not be merged)")
        tokenizer = build_tokenizer("char")
        model = init_model(InitConfig(preset=spec[len(INIT_PREFIX):], seed=seed, param_dtype=dtype), tokenizer)
        return model.to(device), tokenizer
    model, tokenizer = load_pretrained(spec, dtype=dtype, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{spec}: the checkpoint has no tokenizer files")
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, base=str(Path(spec).resolve()))
    return model, tokenizer


def check_lora_strategy(lora: LoraConfig, strategy: str, world_size: int) -> None:
    """LoRA runs single-process or under DDP; FSDP2 sharding of peft's layers is not supported."""
    if lora.enabled and world_size > 1 and strategy == "fsdp":
        raise ConfigError("lora with dist.strategy=fsdp is not supported (FSDP2 over peft's LoRA layers is "
                          "untested here); use dist.strategy=ddp -- the frozen base needs no sharded optimizer")
