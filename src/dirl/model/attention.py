"""The two attention paths: SDPA with a boolean mask, and FlexAttention.

Both take the same :class:`~dirl.model.masks.TokenMeta` for queries and keys and
must give the same numbers (``tests/test_masks.py`` holds them equal).

* ``sdpa`` -- works everywhere and supports backward on CPU; the mask is a
  dense (B, 1, Q, K) bool tensor built by broadcasting the mask rule.
* ``flex`` -- ``torch.nn.attention.flex_attention`` under ``torch.compile``, the
  GPU fast path (block-sparse, never materialises the mask). On CPU in torch
  2.13 its forward compiles and runs but its backward raises, so CPU training
  uses ``sdpa``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dirl.model.masks import TokenMeta, dense_mask, mask_mod_for

ATTENTION_IMPLS = ("sdpa", "flex")


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # dynamic=False: recompiling flex on a new length with dynamic shapes has failed in practice.
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(q_meta: TokenMeta, k_meta: TokenMeta):
    """A FlexAttention BlockMask for the given metadata."""
    from torch.nn.attention.flex_attention import create_block_mask
    batch, num_q = q_meta.shape
    return create_block_mask(mask_mod_for(q_meta, k_meta), batch, None, num_q, k_meta.shape[1],
                             device=q_meta.doc.device)


def build_mask(q_meta: TokenMeta, k_meta: TokenMeta, impl: str):
    """Build the mask once per forward; every layer reuses it."""
    if impl == "sdpa":
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
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=gqa)
