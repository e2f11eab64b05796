"""The optimizer, its learning-rate schedule and the one guarded optimizer step, shared by SFT and RL.

Nothing here knows about a loss. ``clip_and_step`` is the single place where an
optimizer step happens, so the NaN/inf guard (skip the step, keep the weights,
DESIGN §10 robustness) applies to every trainer alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dirl.errors import (FINITE_NON_NEGATIVE, FINITE_POSITIVE, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, FieldError,
                         check_fields, one_of)


# AdamW steps are ~lr * sign(g): above 1 no run learns anything (2**64 trained to garbage, exit 0).
LEARNING_RATE = (lambda v: 0 < v <= 1, "a finite number in (0, 1]")

@dataclass
class OptimConfig:
    """AdamW + learning-rate schedule + clipping + accumulation."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        check_fields(self, {"lr": LEARNING_RATE, "weight_decay": FINITE_NON_NEGATIVE, "eps": FINITE_POSITIVE,
                            "warmup_steps": NON_NEGATIVE, "schedule": one_of("cosine", "constant"),
                            "min_lr_ratio": UNIT_INTERVAL, "grad_clip": FINITE_NON_NEGATIVE,
                            "grad_accum": POSITIVE})
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", f"must be two values in [0, 1), got {self.betas!r}")


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm gains and biases (all 1-D tensors) are not decayed -- standard practice."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup, then
    cosine down to ``min_lr_ratio`` over the remaining steps, or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                  cfg: OptimConfig) -> tuple[float, bool]:
    """Clip gradients, then step -- unless the gradient norm is NaN/inf.

    Returns ``(grad_norm, skipped)``. A non-finite norm zeroes the gradients and
    leaves weights, optimizer moments and the schedule untouched (skipped=True):
    one bad batch must not poison a long run.
    """
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm, True
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, False
