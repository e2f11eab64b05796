"""The forward bodies shared by the families: embed, layers, norm, head, over each family's own modules.

Each family supplies its modules with native names (:meth:`DiffusionLM.parts`) and a layer
``(x, cos, sin, mask, impl, cache_layer) -> x``, and gets the SEAM forward contract from
:func:`block_causal_forward` (SDAR, LLaDA2) or :func:`bidirectional_forward` (LLaDA, Dream).

Block-causal: the mask comes from the caller's TokenMeta, or from the engine's exact in-place cache
step (``cache[i].update(k, v)``, ``cache.mask``). Bidirectional: ``meta`` None means one bidirectional sequence per
row (no mask at all); otherwise the mask comes from :func:`dirl.model.attention.build_mask`
(a state = one noisy copy: bidirectional inside, padding keys invisible, copies apart).
There is no exact KV cache for full attention. ``cache`` is None, or the full-attention decoder's
opt-in *approximate* cache (Fast-dLLM's prefix / dual cache,
:class:`dirl.engine.full_attention_cache.WindowCache`): ``cache[i].update(k, v)`` stores layer i's
fresh K/V and returns every slot's; ``cache.mask`` (None while it records a full forward) is the
key-padding mask of the slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dirl.model.attention import build_mask, pad_to_bucket
from dirl.model.blocks import rope_cos_sin
from dirl.model.forward import ForwardOutput, Readout
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.masks import TokenMeta


class Parts(NamedTuple):
    """A family's modules the shared forward runs, and its RoPE shape."""
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear
    rotary_dim: int      # dims of each head RoPE rotates (head_dim, or fewer for partial RoPE)
    rope_theta: float


class DiffusionLM(nn.Module):
    """What every family's model shares: the trainer-set attributes, ``arch``, ``init_weights``,
    ``decoder_layers``, ``tie_weights`` -- all read through :meth:`parts`, the family's own modules."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.attn_impl = "sdpa"
        # Recompute each decoder layer in backward (torch.utils.checkpoint): only the layer
        # inputs are kept, so activation memory is ~ num_layers x T x d instead of every
        # intermediate. Set by the trainers from ``compute.activation_checkpointing``.
        self.activation_checkpointing = False
        self.head_chunk_size = DEFAULT_CHUNK_SIZE  # rows per chunk of the chunked head (lm_head.py)

    def parts(self) -> Parts:
        raise NotImplementedError

    @property
    def arch(self):
        return self.config.arch

    def decoder_layers(self) -> nn.ModuleList:
        """The repeated layers: FSDP's wrap units and the activation-checkpointing units."""
        return self.parts().layers

    def tie_weights(self) -> None:
        """Re-point a tied ``lm_head`` at the embedding (at construction and after a meta-device load)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.parts().embed.weight

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        init_normal(self, seed, std)


def segments(meta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The states of packed rows as a batch: -> (index (S, Lmax) into B*T, -1 = none; valid (S, Lmax)),
    or None when every row holds at most one state. A state is a run of equal (doc, copy) with doc >= 0."""
    batch, width = meta.doc.shape
    doc, copy = meta.doc.reshape(-1), meta.copy.reshape(-1)
    start = torch.ones_like(doc, dtype=torch.bool)
    start[1:] = (doc[1:] != doc[:-1]) | (copy[1:] != copy[:-1])
    start[::width] = True  # every row starts a run
    real = doc >= 0
    seg = torch.cumsum(start & real, 0) - 1  # (B*T,) run id of real tokens
    if not real.any() or int(seg[real].max()) + 1 <= batch:
        return None
    flat = torch.arange(doc.numel(), device=doc.device)[real]
    seg = seg[real]
    lengths = torch.bincount(seg)
    first = torch.cumsum(lengths, 0) - lengths  # (S,) position of each run's first token among real ones
    offset = torch.arange(len(seg), device=doc.device) - first[seg]
    index = torch.full((len(lengths), int(lengths.max())), -1, dtype=torch.long, device=doc.device)
    index[seg, offset] = flat
    return index, index >= 0


def _unpacked_forward(model, input_ids, position_ids, spans) -> torch.Tensor:
    """The layers over each state as its own row (no (sum L)^2 mask): hidden (B*T, d), zeros off states."""
    parts = model.parts()
    index, valid = spans
    gather = index.clamp_min(0)
    ids, pos = input_ids.reshape(-1)[gather], position_ids.reshape(-1)[gather]  # (S, Lmax)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    hidden = _layers(model, parts, parts.embed(ids), pos, mask, "sdpa")
    out = hidden.new_zeros(input_ids.numel(), hidden.shape[-1])
    out[index[valid]] = parts.norm(hidden)[valid]
    return out


def _layers(model, parts: Parts, hidden, position_ids, mask, impl, cache=None) -> torch.Tensor:
    """hidden (B, T, d) through every layer (checkpointed ones keep only their input)."""
    cos, sin = rope_cos_sin(position_ids, parts.rotary_dim, parts.rope_theta, hidden.dtype)  # (B, 1, T, D)
    recompute = model.activation_checkpointing and torch.is_grad_enabled() and cache is None
    for i, layer in enumerate(parts.layers):
        if recompute:
            hidden = checkpoint(layer, hidden, cos, sin, mask, impl, None, use_reentrant=False)
        else:
            hidden = layer(hidden, cos, sin, mask, impl, None if cache is None else cache[i])
    return hidden


def _full_forward(model, input_ids, position_ids, attention, cache, readout: Readout) -> ForwardOutput:
    """The layers, the final norm and the readout over every token of (B, T) ``input_ids``.

    ``attention``: ``(mask, impl)`` -- a ready mask (the cache's, or None: no masking) for SDPA,
    or ``(TokenMeta, impl)``, whose mask is built here (flex first pads to a few bucketed lengths,
    so it compiles a few shapes)."""
    parts = model.parts()
    mask, impl = attention
    num_tokens = input_ids.shape[1]
    if isinstance(mask, TokenMeta):
        if impl == "flex":
            input_ids, position_ids, mask = pad_to_bucket(input_ids, position_ids, mask)
        mask = build_mask(mask, mask, impl)
    hidden = _layers(model, parts, parts.embed(input_ids), position_ids, mask, impl, cache)
    hidden = parts.norm(hidden[:, :num_tokens])
    return _readout(hidden.reshape(-1, hidden.shape[-1]), parts.head, readout, (input_ids.shape[0], num_tokens))


def block_causal_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, meta, cache=None,
                         readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
    """input_ids, position_ids: (B, T); meta: these tokens' mask metadata (unused with a cache).

    cache: the engine's in-place :class:`~dirl.engine.kv_cache.CacheStep` or None
    (:mod:`dirl.model.forward`). readout.index: flat indices into B*T -- only those rows
    of the LM head are computed (the vocabulary projection dominates at 150k).
    readout.hidden: skip the LM head and return the final-norm hidden states of those
    rows, for the chunked head (:mod:`dirl.model.lm_head`) that never holds their (N, V) logits."""
    impl = attn_impl or model.attn_impl
    if cache is not None:  # the cache knows which of its slots each query sees
        return _full_forward(model, input_ids, position_ids, (cache.mask, "sdpa"), cache, readout)
    return _full_forward(model, input_ids, position_ids, (meta, impl), None, readout)


def bidirectional_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, meta,
                          cache=None, readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
    """input_ids, position_ids: (B, T); the modules are ``model.parts()``.

    Rows packing several states run each state as its own row under SDPA (the same numbers as the
    segment mask -- states never see each other -- at sum L^2 attention cost instead of (sum L)^2)."""
    parts = model.parts()
    impl = attn_impl or model.attn_impl
    spans = segments(meta) if meta is not None and cache is None and impl == "sdpa" else None
    if spans is not None:
        hidden = _unpacked_forward(model, input_ids, position_ids, spans)
        return _readout(hidden, parts.head, readout, input_ids.shape)
    if cache is not None and cache.mask is not None:
        return _full_forward(model, input_ids, position_ids, (cache.mask, "sdpa"), cache, readout)
    if meta is None:  # one state per row, nothing masked: every query sees every key
        return _full_forward(model, input_ids, position_ids, (None, "sdpa"), cache, readout)
    return _full_forward(model, input_ids, position_ids, (meta, impl), cache, readout)


def _readout(hidden: torch.Tensor, head, readout: Readout, shape) -> ForwardOutput:
    """hidden (B*T, d) -> the rows ``readout`` asks for, as logits or hidden states."""
    if readout.index is not None:
        hidden = hidden.index_select(0, readout.index)  # (N, d)
    else:
        hidden = hidden.view(*shape, -1)
    if readout.hidden:
        return ForwardOutput(None, hidden)
    return ForwardOutput(head(hidden))


def init_normal(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random init: normal(0, std) matrices, unit norms, zero biases -- reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and not name.endswith(".bias"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
