"""Where a trainer's starting model comes from: a checkpoint directory or ``init:<preset>``,
with LoRA adapters injected when ``lora.r > 0``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dirl.config import ConfigError
from dirl.model.checkpoint import CheckpointError, load_pretrained
from dirl.model.factory import InitConfig, build_tokenizer, init_model
from dirl.model.lora import BaseModelView, LoraConfig, apply_lora
from dirl.train import dist as dist_lib

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
        raise CheckpointError(f"{spec}: the checkpoint has no tokenizer files")
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, base=str(Path(spec).resolve()))
    return model, tokenizer


def check_lora(lora: LoraConfig, strategy: str, backend: str = "native") -> None:
    """LoRA runs in one process or under DDP, with the in-process rollout engine."""
    if not lora.enabled:
        return
    if dist_lib.world_size() > 1 and strategy == "fsdp":
        raise ConfigError("lora with dist.strategy=fsdp is not supported (FSDP2 over peft's LoRA layers is "
                          "not wired); use dist.strategy=ddp -- the frozen base needs no sharded optimizer")
    if backend != "native":
        raise ConfigError(f"lora with rollout.backend={backend!r} is not supported; use rollout.backend=native "
                          "(the engine decodes with the adapters applied)")


def reference_model(model: torch.nn.Module, lora: LoraConfig, strategy: str, device: torch.device,
                    mp_policy=None):
    """DiPO's frozen reference, the starting policy: for LoRA the base with the adapters off
    (no second copy of the weights), else a frozen copy of the model (FSDP2: with the policy's
    ``mp_policy``, :mod:`dirl.train.precision`)."""
    if lora.enabled:
        return BaseModelView(model)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return dist_lib.wrap(frozen, strategy, device, trainable=False, mp_policy=mp_policy)
