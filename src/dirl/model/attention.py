"""The two attention paths: SDPA with a boolean mask, and FlexAttention.

Both take the same :class:`~dirl.model.masks.TokenMeta` for queries and keys and
must give the same numbers (``tests/test_masks.py`` holds them equal).

* ``sdpa`` -- works everywhere and supports backward on CPU; the mask is a
  dense (B, 1, Q, K) bool tensor built by broadcasting the mask rule.
* ``flex`` -- ``torch.nn.attention.flex_attention`` under ``torch.compile``, the
  GPU fast path (block-sparse, never materialises the mask). The ``BlockMask``
  is built from the per-token vectors tile by tile (:func:`~dirl.model.masks.tile_visibility`):
  O(L) memory, no dense (Q, K) tensor and no compile of the mask itself. Training
  forwards pad their length to a few buckets (:func:`bucket_length`: powers of
  two and 1.5x powers of two, >= 128), so the compiled kernel sees a bounded
  number of shapes. On CPU in torch 2.13 its forward compiles and runs but its
  backward raises, so CPU training uses ``sdpa``.

The dense SDPA mask costs Q x K bytes plus the mask rule's broadcast temporaries, and SDPA
converts a boolean mask to one of the query's float dtype (4 B per pair in fp32) for every
call, which its backward keeps. Above ``MASK_PAIRS`` (B x Q x K) the SDPA path therefore never
builds the whole mask: :class:`ChunkedMask` keeps the per-token fields, and :func:`attend`
runs the queries in chunks of at most ``MASK_PAIRS`` pairs, each with its own slice of the
mask, checkpointed when gradients flow (its mask is rebuilt in backward instead of kept), so
the mask memory is O(MASK_PAIRS) whatever the length. Every query row sees the same keys as
under the dense mask, so the result is the dense path's (``tests/test_masks.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dirl.model.masks import MaskFields, TokenMeta, dense_mask, mask_mod_for, tile_visibility

ATTENTION_IMPLS = ("sdpa", "flex")


FLEX_TILE = 128          # FlexAttention's sparse block size
FLEX_RECOMPILE_LIMIT = 64  # shapes (length buckets x batch sizes) the compiled kernel may see
MASK_PAIRS = 1 << 25     # (query, key) pairs of SDPA's dense mask above which it is built per query chunk


class ChunkedMask(NamedTuple):
    """SDPA's mask for long inputs, as the per-token fields of both sides ((B, Q) and (B, K) each):
    :func:`attend` builds it one query chunk at a time (a NamedTuple, so it passes through
    ``torch.utils.checkpoint`` like a tuple of tensors)."""

    q: MaskFields
    k: MaskFields


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # dynamic=False: recompiling flex on a new length with dynamic shapes has failed in practice;
    # lengths are bucketed instead, and the default limit of 8 shapes is raised to cover the buckets.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def bucket_length(length: int, minimum: int = FLEX_TILE) -> int:
    """The smallest of {m 2^k, 1.5 m 2^k} >= length (m = ``minimum``): <= 33% padding,
    about two shapes per doubling of the length."""
    size = minimum
    while size < length:
        if size * 3 // 2 >= length and (size * 3 // 2) % minimum == 0:
            return size * 3 // 2
        size *= 2
    return size


def flex_block_mask(q_meta: TokenMeta, k_meta: TokenMeta):
    """A FlexAttention BlockMask for the given metadata, built in O(L) memory."""
    from torch.nn.attention.flex_attention import BlockMask
    partial, full = tile_visibility(q_meta, k_meta, FLEX_TILE)  # (B, 1, nq, nk) each

    def ordered(blocks):  # dense block flags -> (count per row, column indices, visible first)
        flags = blocks.to(torch.int32)
        return (flags.sum(-1).to(torch.int32),
                torch.argsort(flags, dim=-1, descending=True, stable=True).to(torch.int32))

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_TILE,
                                    mask_mod=mask_mod_for(q_meta, k_meta),
                                    seq_lengths=(q_meta.shape[1], k_meta.shape[1]))


def pad_to_bucket(input_ids: torch.Tensor, position_ids: torch.Tensor, meta: TokenMeta):
    """Right-pad (B, T) inputs to ``bucket_length(T)`` with invisible tokens (doc -1).

    -> (input_ids, position_ids, meta), each (B, T'); the caller slices its outputs back to T."""
    pad = bucket_length(input_ids.shape[1]) - input_ids.shape[1]
    if pad == 0:
        return input_ids, position_ids, meta
    fill = (-1, 0, False, -1)  # doc, block, noisy, copy of a padding token
    padded = TokenMeta(*(F.pad(f, (0, pad), value=v) for f, v in zip(meta.fields(), fill)))
    return F.pad(input_ids, (0, pad)), F.pad(position_ids, (0, pad)), padded


def build_mask(q_meta: TokenMeta, k_meta: TokenMeta, impl: str):
    """Build the mask once per forward; every layer reuses it."""
    if impl == "sdpa":
        batch, num_q = q_meta.shape
        if batch * num_q * k_meta.shape[1] > MASK_PAIRS:
            return ChunkedMask(q_meta.fields(), k_meta.fields())
        return dense_mask(q_meta, k_meta)
    if impl == "flex":
        return flex_block_mask(q_meta, k_meta)
    raise ValueError(f"unknown attention impl {impl!r}; choose from {ATTENTION_IMPLS}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, impl: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, H, Q, D); k, v: (B, Hkv, K, D) -> (B, H, Q, D); ``mask`` comes from
    :func:`build_mask` with the same ``impl``.
    """
    gqa = q.shape[1] != k.shape[1]
    if impl == "sdpa":
        if isinstance(mask, ChunkedMask):
            return _chunked_sdpa(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=gqa)


def _masked_sdpa(q, k, v, q_fields: MaskFields, k_fields: MaskFields) -> torch.Tensor:
    """SDPA of one query chunk under its slice of the dense mask, built here from the fields."""
    mask = dense_mask(TokenMeta(*q_fields), TokenMeta(*k_fields))  # (B, 1, Qc, K)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _chunked_sdpa(q, k, v, mask: ChunkedMask) -> torch.Tensor:
    """q (B, H, Q, D) in query chunks of at most ``MASK_PAIRS`` mask pairs -> (B, H, Q, D).

    With gradients each chunk is checkpointed: backward rebuilds its mask from the fields rather
    than keep every chunk's (SDPA saves the float mask it converted)."""
    batch, _, num_q, _ = q.shape
    rows = max(1, MASK_PAIRS // (batch * k.shape[2]))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for start in range(0, num_q, rows):
        q_fields = MaskFields(*(f[:, start:start + rows] for f in mask.q))
        args = (q[:, :, start:start + rows], k, v, q_fields, mask.k)
        outs.append(checkpoint(_masked_sdpa, *args, use_reentrant=False) if grad else _masked_sdpa(*args))
    return torch.cat(outs, dim=2)
