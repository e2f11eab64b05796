"""The forward contract every family's model follows.

``model(input_ids, position_ids, meta, cache=None, readout=Readout(), attn_impl=None)
-> ForwardOutput``: ``meta`` is the tokens' :class:`~dirl.model.masks.TokenMeta` (unused
with a cache), ``cache`` the engine's in-place :class:`~dirl.engine.kv_cache.CacheStep`
(``cache[i].update(k, v)`` stores layer i's K/V and returns the slots to attend over,
``cache.mask`` is the SDPA mask over them) or None. The KV cache is an argument, never
model state, and a forward returns no K/V.

Besides the forward, a family's model has ``config`` and ``arch`` (its
:class:`~dirl.model.arch.Arch`), ``lm_head`` (an ``nn.Linear``), ``decoder_layers()`` (the
FSDP wrap and activation-checkpointing units), ``init_weights(seed)``, ``tie_weights()``
(re-point a tied head after a meta-device load), and the attributes the trainers set:
``attn_impl``, ``activation_checkpointing``, ``head_chunk_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Readout(NamedTuple):
    """Which rows a forward returns, and as what. A NamedTuple, so ``torch.compile`` (the
    engine's compiled step) sees its tensor as a plain input. The rows of a scored token
    come from :func:`dirl.model.layout.readout_rows` (the family's logit shift)."""

    index: torch.Tensor | None = None  # (N,) flat indices into B*T; None = every row, (B, T, ...)
    hidden: bool = False               # True: final-norm hidden states instead of logits (no LM head)


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None          # (B, T, V), or (N, V) when readout.index is given; None with readout.hidden
    hidden: torch.Tensor | None = None   # final-norm hidden states, same rows as logits, with readout.hidden
