"""The rollout-backend interface and its registry."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Protocol

from dirl.backends.options import OPTIONS
from dirl.rollout import Rollout, SamplingParams

# name -> "module:Class"; each class takes (model, tokenizer, **its options' fields, **runtime).
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


def make_backend(name: str, model, tokenizer, options=None, **runtime) -> RolloutBackend:
    """Backend ``name`` built from its own options (:mod:`dirl.backends.options`; None: the
    defaults) and what the trainer computes at run time (``decode_dtype`` for ``native``).
    Options of another backend are a TypeError, never dropped."""
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; choose from {sorted(BACKENDS)}")
    options = OPTIONS[name]() if options is None else options
    if type(options) is not OPTIONS[name]:
        raise TypeError(f"rollout backend {name!r} takes {OPTIONS[name].__name__}, got {type(options).__name__}")
    module, cls = BACKENDS[name].split(":")
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return getattr(importlib.import_module(module), cls)(model, tokenizer, **fields, **runtime)
