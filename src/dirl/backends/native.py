"""In-process rollouts on the trainer's own weights, and the checkpoint-reload baseline."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from dirl.engine.engine import Engine
from dirl.rollout import Rollout, SamplingParams
from dirl.model.checkpoint import cast_copy, load_pretrained, param_dtype, save_pretrained


class NativeBackend:
    """The engine reads the trainer's parameter tensors directly: syncing is free.

    ``decode_dtype`` (bf16-mixed training): the engine decodes in the compute dtype
    from a copy of the fp32 master weights in that dtype, refreshed by
    :meth:`sync_weights` after every update -- 2 bytes per parameter of memory and one
    cast-copy per update (README "Real scale" measures it). Weights already in that
    dtype (a LoRA run's bf16 base) are shared, not copied: only the adapters are.
    Not under FSDP2, whose mixed-precision policy already gathers the weights in bf16.
    """

    def __init__(self, model, tokenizer=None, decode_dtype: torch.dtype | None = None, **engine_options):
        """``engine_options``: :class:`Engine`'s (``use_cache``, ``max_batch_rows``, ``compile``,
        ``max_batch_tokens``, ``batching``: :class:`~dirl.backends.options.NativeOptions`' fields)."""
        self.model, self.decode_model = model, model
        params = list(model.parameters())
        if decode_dtype is not None and any(p.dtype != decode_dtype for p in params) and not _sharded(model):
            self.decode_model = cast_copy(model, decode_dtype)
        self.engine = Engine(self.decode_model, **engine_options)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Rollout]:
        return self.engine.generate(prompts, params, seeds)

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Nothing to do when the engine and the trainer share the same tensors; else cast-copy."""
        if self.decode_model is not self.model:
            for target, source in zip(self.decode_model.parameters(), self.model.parameters()):
                if target is not source:
                    target.copy_(source)

    def close(self) -> None:
        pass


def _sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


class CheckpointBackend:
    """The peers' reload loop: save the policy to disk, build a fresh engine from it.

    Kept honest for measurement: a real save (safetensors) and a real load into a
    new model, nothing slowed down artificially.
    """

    def __init__(self, model, tokenizer=None, workdir: str | None = None, **engine_options):
        self.model, self.tokenizer = model, tokenizer
        # compile: each reload is a new model object, which may compile again
        self.options = engine_options  # Engine's, as NativeBackend's
        self._tmp = Path(workdir or tempfile.mkdtemp(prefix="dirl-reload-"))
        self.engine: Engine | None = None
        self.sync_weights()

    def sync_weights(self) -> None:
        path = save_pretrained(self.model, self.tokenizer, self._tmp / "policy", dtype=param_dtype(self.model))
        device = next(self.model.parameters()).device
        fresh, _ = load_pretrained(path, dtype=next(self.model.parameters()).dtype, device=device,
                                   with_tokenizer=False)
        fresh.attn_impl = self.model.attn_impl
        self.engine = Engine(fresh.eval(), **self.options)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[Rollout]:
        return self.engine.generate(prompts, params, seeds)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
