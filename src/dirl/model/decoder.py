"""The forward body shared by the bidirectional families (LLaDA, Dream): embed, layers, norm, head.

Each family supplies its own modules (native names) and a layer ``(x, cos, sin, mask, impl) -> x``;
this runs them with the SEAM forward contract: ``meta`` None means one bidirectional sequence per
row (no mask at all); otherwise the mask comes from :func:`dirl.model.attention.build_mask`
(a state = one noisy copy: bidirectional inside, padding keys invisible, copies apart).
There is no exact KV cache for full attention. ``cache`` is None, or the full-attention decoder's
opt-in *approximate* cache (Fast-dLLM's prefix / dual cache,
:class:`dirl.engine.full_attention_cache.WindowCache`): ``cache[i].update(k, v)`` stores layer i's
fresh K/V and returns every slot's; ``cache.mask`` (None while it records a full forward) is the
key-padding mask of the slots.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dirl.model.attention import build_mask, pad_to_bucket
from dirl.model.blocks import rope_cos_sin
from dirl.model.forward import ForwardOutput, Readout


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


def _unpacked_forward(model, parts, input_ids, position_ids, spans, impl) -> torch.Tensor:
    """The layers over each state as its own row (no (sum L)^2 mask): hidden (B*T, d), zeros off states."""
    embed, layers, norm, _, head_dim, theta = parts
    index, valid = spans
    gather = index.clamp_min(0)
    ids, pos = input_ids.reshape(-1)[gather], position_ids.reshape(-1)[gather]  # (S, Lmax)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    hidden = _layers(model, layers, embed(ids), pos, head_dim, theta, mask, "sdpa")
    out = hidden.new_zeros(input_ids.numel(), hidden.shape[-1])
    out[index[valid]] = norm(hidden)[valid]
    return out


def _layers(model, layers, hidden, position_ids, head_dim, theta, mask, impl, cache=None) -> torch.Tensor:
    cos, sin = rope_cos_sin(position_ids, head_dim, theta, hidden.dtype)  # (B, 1, T, D)
    recompute = model.activation_checkpointing and torch.is_grad_enabled() and cache is None
    for i, layer in enumerate(layers):
        if recompute:
            hidden = checkpoint(layer, hidden, cos, sin, mask, impl, use_reentrant=False)
        else:
            hidden = layer(hidden, cos, sin, mask, impl, None if cache is None else cache[i])
    return hidden


def bidirectional_forward(model, parts, input_ids: torch.Tensor, position_ids: torch.Tensor, meta,
                          cache=None, readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
    """parts: (embed, layers, final_norm, head, head_dim, rope_theta). input_ids, position_ids: (B, T).

    Rows packing several states run each state as its own row under SDPA (the same numbers as the
    segment mask -- states never see each other -- at sum L^2 attention cost instead of (sum L)^2)."""
    embed, layers, norm, head, head_dim, theta = parts
    impl = attn_impl or model.attn_impl
    num_tokens = input_ids.shape[1]
    spans = segments(meta) if meta is not None and cache is None and impl == "sdpa" else None
    if spans is not None:
        hidden = _unpacked_forward(model, parts, input_ids, position_ids, spans, impl)
        return _readout(hidden, head, readout, input_ids.shape)
    if cache is not None and cache.mask is not None:
        mask, impl = cache.mask, "sdpa"
    elif meta is None:
        mask, impl = None, "sdpa"
    else:
        if impl == "flex":  # a few padded lengths: a few compiled shapes
            input_ids, position_ids, meta = pad_to_bucket(input_ids, position_ids, meta)
        mask = build_mask(meta, meta, impl)
    hidden = _layers(model, layers, embed(input_ids), position_ids, head_dim, theta, mask, impl, cache)
    hidden = norm(hidden[:, :num_tokens])
    return _readout(hidden.reshape(-1, hidden.shape[-1]), head, readout, (input_ids.shape[0], num_tokens))


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
