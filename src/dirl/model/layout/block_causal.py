"""The block-causal layout (SDAR, BD3-LM): clean blocks are causal at block granularity,
a noisy block sees the clean blocks before it and itself (:func:`dirl.model.masks.visible`).

* SFT: one forward over ``[x_t^1 ; (x_t^2 ;) x_0]`` (:meth:`BlockCausalLayout.sft`);
* decoding: the clean prefix (cache or recomputed) + the current noisy block
  (:meth:`BlockCausalLayout.decode_meta`);
* trace states: the clean sequence + one noisy copy of a block per state
  (:meth:`BlockCausalLayout.traces`, :mod:`dirl.model.trace`).
Every scored row goes through :func:`~dirl.model.layout.readout_rows`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from dirl.model.layout import readout_rows
from dirl.model.masks import TokenMeta, sft_meta
from dirl.model.trace import Copy, TracePack, pack_traces


class SFTInputs(NamedTuple):
    input_ids: torch.Tensor      # (B, (C+1) L): the C noisy streams, then x_0
    position_ids: torch.Tensor   # (B, (C+1) L)
    meta: TokenMeta              # (B, (C+1) L)
    readout_index: torch.Tensor  # (N,) flat rows whose logits score the masked tokens
    masked_at: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (copy, row, column) of each masked token, (N,) each


def multi_copy_meta(position_ids: torch.Tensor, block_size: int, doc_ids: torch.Tensor,
                    num_copies: int) -> TokenMeta:
    """Metadata of ``[x_t^1 ; ... ; x_t^C ; x_0]``, each stream (B, L) -> (B, (C + 1) L).

    Built from :func:`sft_meta`; the copy ids of noisy stream c are shifted so that
    streams never see each other.
    """
    length = position_ids.shape[1]
    base = sft_meta(position_ids, block_size, doc_ids)
    noisy = TokenMeta(*(f[:, :length] for f in base.fields()))
    clean = TokenMeta(*(f[:, length:] for f in base.fields()))
    stride = int(noisy.copy.max()) + 1 if noisy.copy.numel() else 1
    streams = [TokenMeta(noisy.doc, noisy.block, noisy.noisy, noisy.copy + c * stride) for c in range(num_copies)]
    meta = streams[0]
    for stream in streams[1:] + [clean]:
        meta = meta.cat(stream)
    return meta


class BlockCausalLayout:
    name = "block_causal"

    def sft(self, arch, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
            masked: torch.Tensor, mask_token_id: int) -> SFTInputs:
        """The SFT row of (B, L) examples and the (C, B, L) masks of C noisy copies."""
        num_copies, _, length = masked.shape
        noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id)[None], input_ids[None])
        row_ids = torch.cat([*noisy, input_ids], dim=1)  # (B, (C+1) L)
        row_positions = position_ids.repeat(1, num_copies + 1)  # (B, (C+1) L)
        meta = multi_copy_meta(position_ids, arch.block_size, doc_ids, num_copies)
        # Flat index into (B, (C+1) L) of each masked noisy token; copy c occupies columns [cL, (c+1)L).
        copy_idx, row_idx, col_idx = masked.nonzero(as_tuple=True)  # (N,) each
        token_index = row_idx * (num_copies + 1) * length + copy_idx * length + col_idx  # (N,)
        return SFTInputs(row_ids, row_positions, meta, readout_rows(token_index, arch.logit_shift),
                         (copy_idx, row_idx, col_idx))

    def decode_meta(self, prefix_pos: torch.Tensor, prefix_valid: torch.Tensor, block_pos: torch.Tensor,
                    block_size: int) -> TokenMeta:
        """A decode step without a cache: the clean prefix (R, P), then the current block (R, B) as one copy."""
        return TokenMeta.clean(prefix_pos, block_size, prefix_valid).cat(
            TokenMeta.noisy_copy(block_pos, block_size, torch.zeros_like(block_pos)))

    def traces(self, arch, traces: Sequence, copies: Sequence[list[Copy]], device="cpu") -> TracePack:
        """Trace states of each sequence packed into one row each (:func:`dirl.model.trace.pack_traces`)."""
        return pack_traces(traces, copies, arch.block_size, arch.mask_token_id, arch.pad_token_id, device,
                           logit_shift=arch.logit_shift)


LAYOUT = BlockCausalLayout()
