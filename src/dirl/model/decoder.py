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
from dirl.model.transformer import ForwardOutput, Readout, rope_cos_sin


def bidirectional_forward(model, parts, input_ids: torch.Tensor, position_ids: torch.Tensor, meta,
                          cache=None, readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
    """parts: (embed, layers, final_norm, head, head_dim, rope_theta). input_ids, position_ids: (B, T)."""
    embed, layers, norm, head, head_dim, theta = parts
    impl = attn_impl or model.attn_impl
    num_tokens = input_ids.shape[1]
    if cache is not None and cache.mask is not None:
        mask, impl = cache.mask, "sdpa"
    elif meta is None:
        mask, impl = None, "sdpa"
    else:
        if impl == "flex":  # a few padded lengths: a few compiled shapes
            input_ids, position_ids, meta = pad_to_bucket(input_ids, position_ids, meta)
        mask = build_mask(meta, meta, impl)
    hidden = embed(input_ids)  # (B, T, d)
    cos, sin = rope_cos_sin(position_ids, head_dim, theta, hidden.dtype)  # (B, 1, T, D)
    recompute = model.activation_checkpointing and torch.is_grad_enabled() and cache is None
    for i, layer in enumerate(layers):
        if recompute:
            hidden = checkpoint(layer, hidden, cos, sin, mask, impl, use_reentrant=False)
        else:
            hidden = layer(hidden, cos, sin, mask, impl, None if cache is None else cache[i])
    hidden = norm(hidden[:, :num_tokens])
    if readout.index is not None:
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, readout.index)  # (N, d)
    if readout.hidden:
        return ForwardOutput(None, [], hidden)
    return ForwardOutput(head(hidden), [])


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
