"""How the trainers compute: precision, activation checkpointing, the head's chunk size (DESIGN §12).

One ``compute:`` section, shared by SFT and RL (:class:`ComputeConfig`):

* ``precision``
    - ``fp32``: fp32 weights, fp32 compute.
    - ``bf16-mixed``: fp32 master weights and AdamW moments, bf16 compute. On one
      process (or DDP) the forward runs under ``torch.autocast(bf16)`` (CPU too);
      under torchrun FSDP2 it is ``MixedPrecisionPolicy(param_dtype=bf16,
      reduce_dtype=fp32)`` (all-gathers in bf16, gradients reduced in fp32).
      With LoRA only the adapters are masters (fp32): the frozen base never steps,
      so it is held in bf16 (:func:`load_dtype`), half the bytes and no bf16 decode
      copy of it -- the usual practice (QLoRA and peft keep the base in 16 bits).
    - ``bf16``: the weights themselves are bf16 and AdamW steps them in bf16. At
      lr 1e-6 most updates round away (the ulp of a 0.02 weight is ~1.2e-4 in
      bf16); kept for memory-bound experiments and for comparison.
    - ``auto`` (default): bf16-mixed on CUDA, fp32 on CPU.
  Log-softmax, RMSNorm and the losses run in fp32 in every mode.
* ``activation_checkpointing``: recompute each decoder layer in backward.
* ``head_chunk_size``: rows per chunk of the chunked LM head (0 = unchunked, the
  reference path that holds the (N, V) logits).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dirl.model.checkpoint import DTYPES
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.lora import LoraConfig, has_adapters

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")


@dataclass
class ComputeConfig:
    precision: str = "auto"               # auto (bf16-mixed on CUDA, fp32 on CPU) | fp32 | bf16-mixed | bf16
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    head_chunk_size: int = DEFAULT_CHUNK_SIZE  # rows of the LM head per chunk (0 = unchunked (N, V) logits)
    # CPU: give freed tensors back to the OS (glibc's mmap threshold fixed at 1 MiB): a lower peak
    # RSS at real shapes, but a syscall and fresh pages per tensor >= 1 MiB, which slowed the tiny
    # demo's RL by 60 %. auto = on for models of >= RELEASE_MEMORY_PARAMS parameters.
    release_memory: str = "auto"          # auto | on | off

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.release_memory not in ("auto", "on", "off"):
            raise ValueError(f"release_memory must be auto, on or off, got {self.release_memory!r}")
        if self.head_chunk_size < 0:
            raise ValueError(f"head_chunk_size must be >= 0, got {self.head_chunk_size}")


RELEASE_MEMORY_PARAMS = 50_000_000  # real shapes: each step's compute dwarfs the allocator's syscalls


def releases_memory(cfg: ComputeConfig, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether a CPU run fixes glibc's mmap threshold (:func:`dirl.runtime.return_freed_memory`)."""
    if torch.device(device).type != "cpu" or cfg.release_memory == "off":
        return False
    return cfg.release_memory == "on" or sum(p.numel() for p in model.parameters()) >= RELEASE_MEMORY_PARAMS


def resolve(cfg: ComputeConfig, device: torch.device) -> str:
    """The concrete precision (``auto`` -> bf16-mixed on CUDA, fp32 elsewhere)."""
    if cfg.precision == "auto":
        return "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"
    return cfg.precision


def param_dtype(cfg: ComputeConfig, device: torch.device) -> str:
    """dtype name of the trained weights (and so of the optimizer state)."""
    return "bfloat16" if resolve(cfg, device) == "bf16" else "float32"


def load_dtype(cfg: ComputeConfig, device: torch.device, lora: LoraConfig) -> str:
    """dtype name the model is loaded in: :func:`param_dtype`, except that a LoRA run's frozen
    base is bf16 under bf16-mixed too (:func:`configure` casts its adapters back to fp32)."""
    if lora.enabled and resolve(cfg, device) == "bf16-mixed":
        return "bfloat16"
    return param_dtype(cfg, device)


def compute_dtype(cfg: ComputeConfig, device: torch.device) -> torch.dtype:
    return torch.float32 if resolve(cfg, device) == "fp32" else torch.bfloat16


def autocast(cfg: ComputeConfig, device: torch.device, sharded: bool = False):
    """The forward's context: bf16 autocast for bf16-mixed on unsharded weights (FSDP2's
    policy does the cast when ``sharded``); a no-op otherwise."""
    device = torch.device(device)
    if resolve(cfg, device) != "bf16-mixed" or sharded:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def fsdp_policy(cfg: ComputeConfig, device: torch.device):
    """FSDP2's MixedPrecisionPolicy for bf16-mixed, else None."""
    if resolve(cfg, device) != "bf16-mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def configure(model: torch.nn.Module, cfg: ComputeConfig) -> torch.nn.Module:
    """Set the model's activation checkpointing and head chunk size from ``cfg``; a LoRA model's
    adapters (the trained weights) in :func:`param_dtype`, whatever its base is held in."""
    model.activation_checkpointing = cfg.activation_checkpointing
    model.head_chunk_size = cfg.head_chunk_size
    if has_adapters(model):
        dtype = DTYPES[param_dtype(cfg, next(model.parameters()).device)]
        for param in model.parameters():
            if param.requires_grad and param.dtype != dtype:
                param.data = param.data.to(dtype)  # in place: the optimizer is built after this
    return model
