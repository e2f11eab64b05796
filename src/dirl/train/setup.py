"""The one set-up both trainers run (:func:`run_scope`, then :func:`setup`), so a setting
they share (device, attention, precision, LoRA, distribution, seeding) means the same in both.

``setup`` in order: seed every RNG; pick the device and join the process group (torchrun);
let the trainer check its config and load its data (``prepare``: a bad row or reward name fails
before the model loads); load or initialise the model (LoRA adapters when ``lora.r > 0``), resolve
``attn_impl`` and set it on the model, apply the compute settings. Wrapping for DDP / FSDP2 and
the optimizer stay with each trainer (RL copies its frozen reference first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dirl import config as config_lib
from dirl.runtime import resolve_device, return_freed_memory
from dirl.train import dist as dist_lib
from dirl.train import precision
from dirl.train.config import TrainerConfig
from dirl.train.models import RunInputs, check_lora, resolve_model
from dirl.train.moe import apply_moe_settings
from dirl.train.state import prepare_run_dir, resolve_resume, set_seed


@dataclass
class Setup:
    """What :func:`setup` made: the model is loaded and configured, not yet wrapped."""

    device: torch.device
    attn_impl: str                    # resolved: "sdpa" | "flex"
    model: torch.nn.Module
    tokenizer: Any
    prepared: Any = None              # what the trainer's ``prepare`` returned


def resolve_attn_impl(name: str, device: torch.device) -> str:
    """``auto``: flex attention on CUDA, SDPA elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return name


@contextmanager
def run_scope(cfg: TrainerConfig, resume: str | Path | None) -> Iterator[Path]:
    """The run directory (checked before anything is loaded: dirl never overwrites what it did
    not write, nor a run's inputs) and, under torchrun, the process group for the run's lifetime.

    First of all the config is validated again (a Python caller may have changed a field after
    construction: ``cfg.rewards = {"math": nan}``) and the device must exist here."""
    revalidate(cfg)
    device = resolve_device(cfg.device)
    run_dir = resolve_resume(resume).parent.parent if resume else Path(cfg.out)
    prepare_run_dir(run_dir, resumed=bool(resume), overwrite=cfg.overwrite, inputs=run_inputs(cfg))
    with dist_lib.process_group(cfg.dist, device):
        yield run_dir


def revalidate(cfg: TrainerConfig) -> None:
    """Every field checked again, as at load (a :class:`~dirl.config.ConfigError` naming the key)."""
    config_lib.from_dict(type(cfg), config_lib.to_dict(cfg))


def run_inputs(cfg: TrainerConfig) -> list[str]:
    """The paths a run reads (model, data, held-out data): its ``out`` must not overlap them."""
    data = getattr(cfg, "data", None)
    sources = [cfg.model, getattr(data, "source", data), cfg.eval.data]
    return [str(s) for s in sources if isinstance(s, (str, Path)) and str(s) and Path(str(s)).exists()]


def setup(cfg: TrainerConfig, inputs: RunInputs, prepare: Callable[[torch.device], Any] | None = None,
          backend: str = "native") -> Setup:
    """Seed, device, process group, the trainer's ``prepare(device)``, then the model (see the
    module docstring). ``backend``: where rollouts decode (LoRA needs the in-process engine)."""
    set_seed(cfg.seed)
    device = dist_lib.local_device(resolve_device(cfg.device))
    dist_lib.init_from_env(cfg.dist, device)
    prepared = prepare(device) if prepare is not None else None
    check_lora(cfg.lora, cfg.dist.strategy, backend)
    model, tokenizer = resolve_model(cfg.model, inputs, device, precision.load_dtype(cfg.compute, device, cfg.lora),
                                     cfg.seed, lora=cfg.lora)
    inputs.model, inputs.tokenizer = model, tokenizer  # the caller's handle on what is trained
    if precision.releases_memory(cfg.compute, model, device):
        return_freed_memory()  # freed tensors leave the process (peak RSS of a step)
    attn_impl = resolve_attn_impl(cfg.attn_impl, device)
    model.attn_impl = attn_impl
    precision.configure(model, cfg.compute)
    apply_moe_settings(model, cfg.moe)  # before the optimizer: a frozen router has no moments
    return Setup(device, attn_impl, model, tokenizer, prepared)
