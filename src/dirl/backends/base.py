"""The rollout-backend interface and its registry."""

from __future__ import annotations

import importlib
from typing import Protocol

from dirl.rollout import Rollout, SamplingParams

# name -> "module:Class"; each class takes (model, tokenizer, **options).
BACKENDS = {
    "native": "dirl.backends.native:NativeBackend",
    "checkpoint": "dirl.backends.native:CheckpointBackend",
    "http": "dirl.backends.http:HttpBackend",
}


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Rollout]:
        """Decode ``params.n`` samples per prompt (token ids in, rollouts out)."""

    def sync_weights(self) -> None:
        """Make the trainer's current weights the ones the next rollout uses."""

    def close(self) -> None:
        """Release resources."""


def make_backend(name: str, model, tokenizer, **options) -> RolloutBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; choose from {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, tokenizer, **options)
