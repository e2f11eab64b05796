"""What a trainer starts from: a checkpoint directory or ``init:<preset>`` (LoRA adapters injected
when ``lora.r > 0``), or objects in memory.

``RunInputs`` carries what a Python caller hands a trainer besides its config (a model object
and its tokenizer, rows in memory, reward callables, callbacks); the CLI passes none of them,
so both go through the same trainer code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from dirl.config import ConfigError
from dirl.model.checkpoint import cast_copy
from dirl.model.loading import load_model_spec
from dirl.model.lora import BaseModelView, LoraConfig
from dirl.train import dist as dist_lib
from dirl.train.callbacks import CallbackList


@dataclass
class RunInputs:
    """In-memory inputs of a run; each None falls back to the config's path / names."""

    model: torch.nn.Module | None = None  # a dirl model (``load_model``); None: cfg.model
    tokenizer: Any = None                 # its tokenizer, required with ``model``
    train_rows: list[dict] | None = None  # None: the config's data source
    reward_funcs: dict | None = None      # RL: {name or callable: weight}; None: cfg.rewards
    callbacks: CallbackList = field(default_factory=CallbackList)


def resolve_model(spec: str, inputs: RunInputs, device: torch.device, dtype: str, seed: int,
                  lora: LoraConfig | None = None):
    """``(model, tokenizer)``: the caller's objects (moved to ``device``) or ``load_model_spec``."""
    if inputs.model is None:
        return load_model_spec(spec, device, dtype, seed, lora=lora)
    if inputs.tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=... (load_model returns both)")
    if lora is not None and lora.enabled:
        raise ConfigError("lora with a model object is not supported: give the model as a checkpoint path "
                          "(the adapters record their base directory)")
    return inputs.model.to(device), inputs.tokenizer


def set_block_size(model: torch.nn.Module, block_size: int | None, lora: LoraConfig | None = None,
                   key: str = "block_size") -> None:
    """Decode, mask, score and save with ``block_size`` from now on (None: keep the checkpoint's).

    TraceRL (Wang et al. 2025) adapts a block-B model to larger blocks by RL, growing B step by
    step. ``model.config.block_size`` is the one place the engine, the attention masks
    (:class:`~dirl.model.masks.TokenMeta`), the trace packing and ``config.json`` read it from,
    so setting it after the load changes them all together: no weight depends on B. ``key``
    names the setting in errors."""
    cfg = dist_lib.unwrap(model).config
    arch = cfg.arch
    if block_size is None or block_size == arch.block_size:
        return
    if arch.attention == "bidirectional":  # its block_size is a constant of the family, read by nothing
        raise ConfigError(f"{key}={block_size}: a full-attention model has no block size to change "
                          "(decoding blocks are rollout.sampling.block_length / sampling.block_length)")
    if block_size > arch.max_position_embeddings:
        raise ConfigError(f"{key}={block_size} is more than the model's context, max_position_embeddings="
                          f"{arch.max_position_embeddings}")
    if lora is not None and lora.enabled:
        raise ConfigError(f"{key}={block_size} with lora.r={lora.r} is not supported: the adapters' base "
                          f"checkpoint keeps block_size {arch.block_size}; train the full model instead")
    cfg.block_size = block_size


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
                    mp_policy=None, dtype: torch.dtype | None = None):
    """DiPO's frozen reference, the starting policy: for LoRA the base with the adapters off
    (no second copy of the weights), else a frozen copy of the model in ``dtype`` (the compute
    dtype: under bf16-mixed a bf16 copy, 2 B / param, never a copy of the fp32 masters -- the
    reference only runs forwards, under the same autocast as the policy's; FSDP2 shards it
    with the policy's ``mp_policy``, :mod:`dirl.train.precision`)."""
    if lora.enabled:
        return BaseModelView(model)
    if dtype is not None and all(p.dtype != dtype for p in model.parameters()):
        frozen = cast_copy(model, dtype)  # shares no tensor with the policy
    else:
        frozen = copy.deepcopy(model).eval()
    return dist_lib.wrap(frozen.requires_grad_(False), strategy, device, trainable=False, mp_policy=mp_policy)
