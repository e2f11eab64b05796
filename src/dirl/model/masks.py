"""Attention masks of blockwise diffusion, built from per-token metadata.

Every attention pattern dirl needs (DESIGN §4) is one rule over four per-token
vectors, so no dense per-step (2L)^2 tensor is ever built by hand:

* ``doc``   -- which document (sample) the token belongs to; -1 = padding.
* ``block`` -- absolute block index, ``position // block_size``.
* ``noisy`` -- False for a clean token (x0, the KV cache, the prompt), True for a
  token of a noisy copy (x_t in SFT, the block being denoised, a trace copy).
* ``copy``  -- which noisy copy the token belongs to (-1 for clean tokens).

The rule (:func:`visible`): a query sees a key of the same document iff
  - the key is clean and lies in an earlier block, or in the query's own block
    when the query is clean too (block-causal clean stream, BD3-LM), or
  - the key is noisy and belongs to the query's own noisy copy (bidirectional
    inside the block being denoised).
Clean tokens therefore never see noisy ones, and nothing sees another copy.

The layouts built from it:
  * training ``[x_t ; x_0]`` -- :func:`sft_meta` (one copy per noisy block),
  * decoding -- the cache is clean, the current block is one noisy copy,
  * DiPO trace packing -- clean prompt+response, then one copy of block b per
    denoising step of b (:func:`dirl.model.trace`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class MaskFields(NamedTuple):
    """The four mask vectors of one side -- the queries or the keys -- of :func:`visible`.

    Any shapes that broadcast against the other side's: (B, Q, 1) against (B, 1, K) for
    SDPA, scalars inside a FlexAttention ``mask_mod``. A NamedTuple, so ``torch.compile``
    traces it as a plain tuple of tensors."""

    doc: torch.Tensor
    block: torch.Tensor
    noisy: torch.Tensor
    copy: torch.Tensor


def visible(q: MaskFields, k: MaskFields) -> torch.Tensor:
    """The mask rule, written with tensor ops only so it serves both paths:
    broadcast over (B, Q, 1) x (B, 1, K) for SDPA, and scalar-indexed inside a
    FlexAttention ``mask_mod``."""
    same_doc = (q.doc == k.doc) & (k.doc >= 0)
    clean_key = ~k.noisy & ((k.block < q.block) | ((k.block == q.block) & ~q.noisy))
    own_copy = k.noisy & q.noisy & (k.copy == q.copy)
    return same_doc & (clean_key | own_copy)


def _visible_pairs(q_fields, k_fields) -> torch.Tensor:
    """:func:`visible` of every (query, key) pair: (B, Q) and (B, K) fields -> (B, Q, K)."""
    return visible(MaskFields(*(t[:, :, None] for t in q_fields)), MaskFields(*(t[:, None, :] for t in k_fields)))


@dataclass
class TokenMeta:
    """Per-token mask metadata; every field is (B, T)."""

    doc: torch.Tensor     # long
    block: torch.Tensor   # long
    noisy: torch.Tensor   # bool
    copy: torch.Tensor    # long

    @property
    def shape(self) -> torch.Size:
        return self.doc.shape

    def cat(self, other: "TokenMeta") -> "TokenMeta":
        """Concatenate along the sequence dimension (cache keys, then new tokens)."""
        return TokenMeta(*(torch.cat([a, b], dim=1) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> MaskFields:
        return MaskFields(self.doc, self.block, self.noisy, self.copy)

    def to(self, device) -> "TokenMeta":
        return TokenMeta(*(t.to(device) for t in self.fields()))

    @staticmethod
    def clean(position_ids: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> "TokenMeta":
        """A block-causal clean stream (prefill, the KV cache, the clean half of training)."""
        doc = torch.zeros_like(position_ids) if valid is None else torch.where(valid, 0, -1)
        return TokenMeta(doc, position_ids // block_size, torch.zeros_like(position_ids, dtype=torch.bool),
                         torch.full_like(position_ids, -1))

    @staticmethod
    def noisy_copy(position_ids: torch.Tensor, block_size: int, copy_ids: torch.Tensor,
                   valid: torch.Tensor | None = None) -> "TokenMeta":
        """Noisy tokens; ``copy_ids`` (B, T) groups them into copies."""
        doc = torch.zeros_like(position_ids) if valid is None else torch.where(valid, 0, -1)
        return TokenMeta(doc, position_ids // block_size, torch.ones_like(position_ids, dtype=torch.bool), copy_ids)


def dense_mask(q: TokenMeta, k: TokenMeta) -> torch.Tensor:
    """Boolean mask (B, 1, Q, K) for SDPA (True = attend).

    A query that sees nothing (padding) is allowed to see every key: SDPA would
    return NaN for an all-False row, and those outputs are never read."""
    mask = _visible_pairs(q.fields(), k.fields())  # (B, Q, K)
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]


def tile_visibility(q: TokenMeta, k: TokenMeta, tile: int = 128,
                    max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (tile x tile) blocks of the mask are partly / fully visible, without a (Q, K) tensor.

    -> (partial, full): (B, 1, ceil(Q / tile), ceil(K / tile)) bool, partial = some but not
    all pairs visible, full = every pair visible (FlexAttention then skips the mask_mod).
    The rule is evaluated on a few query tiles at a time (at most ``max_elements`` pairs),
    so memory is O(B x K x rows-per-chunk) + the O((Q K) / tile^2) block summary: O(L).
    Positions past Q / K count as not visible, so a ragged last tile is never full.
    """
    batch, num_q = q.shape
    num_k = k.shape[1]
    q_tiles, k_tiles = -(-num_q // tile), -(-num_k // tile)
    k_pad = k_tiles * tile - num_k
    k_fields = [torch.nn.functional.pad(f, (0, k_pad), value=-1 if f.dtype != torch.bool else False)
                for f in k.fields()]  # doc -1: padded keys are never visible
    rows_per_chunk = max(tile, (max_elements // max(1, batch * k_tiles * tile)) // tile * tile)
    any_parts, all_parts = [], []
    for start in range(0, q_tiles * tile, rows_per_chunk):
        end = min(start + rows_per_chunk, q_tiles * tile)
        q_fields = [f[:, start:end] for f in q.fields()]
        vis = _visible_pairs(q_fields, k_fields)  # (B, r, Kp)
        rows = vis.shape[1]
        vis = torch.nn.functional.pad(vis, (0, 0, 0, end - start - rows))  # queries past Q: not visible
        tiles = vis.view(batch, (end - start) // tile, tile, k_tiles, tile)
        any_parts.append(tiles.any(dim=4).any(dim=2))
        all_parts.append(tiles.all(dim=4).all(dim=2))
    any_vis, all_vis = torch.cat(any_parts, dim=1), torch.cat(all_parts, dim=1)  # (B, q_tiles, k_tiles)
    return (any_vis & ~all_vis)[:, None], all_vis[:, None]


def mask_mod_for(q: TokenMeta, k: TokenMeta):
    """A FlexAttention ``mask_mod`` closing over the metadata tensors."""
    qd, qb, qn, qc = q.fields()
    kd, kb, kn, kc = k.fields()

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(MaskFields(qd[b, q_idx], qb[b, q_idx], qn[b, q_idx], qc[b, q_idx]),
                       MaskFields(kd[b, kv_idx], kb[b, kv_idx], kn[b, kv_idx], kc[b, kv_idx]))

    return mask_mod


def sft_meta(position_ids: torch.Tensor, block_size: int, doc_ids: torch.Tensor | None = None) -> TokenMeta:
    """Metadata of a training row ``[x_t ; x_0]`` (both halves share ``position_ids``).

    ``position_ids`` / ``doc_ids``: (B, L) for one half; packed rows give each
    sample its own doc id (padding -1) and restart positions at 0. Each noisy
    block is its own copy, so x_t block b sees itself and clean blocks < b.
    """
    if doc_ids is None:
        doc_ids = torch.zeros_like(position_ids)
    block = position_ids // block_size
    # Copy id unique per (doc, block) so packed samples never share a copy.
    copy = doc_ids * (int(block.max()) + 1 if block.numel() else 1) + block
    noisy = TokenMeta(doc_ids, block, torch.ones_like(block, dtype=torch.bool), copy)
    clean = TokenMeta(doc_ids, block, torch.zeros_like(block, dtype=torch.bool), torch.full_like(block, -1))
    return noisy.cat(clean)

