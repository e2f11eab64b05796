"""The bidirectional layout (LLaDA, Dream): full attention, in TokenMeta terms.

A *state* is one noisy copy of the whole sequence (prompt + response): every token is
``noisy`` with the state's copy id, so the mask rule (:func:`dirl.model.masks.visible`) makes it
bidirectional inside; padding has doc -1 and is seen by nobody. Several states of one sequence
packed in a row are separate copies (segment-bidirectional, FlexAttention's document masking on
GPU, a block-diagonal dense mask on CPU); each restarts its position ids at 0.

Readout: the token at flat row j is scored at ``readout_rows(j, arch.logit_shift)`` -- its own
row, or (Dream) the row before it, which is in the same state because a scored token is never a
state's first (the prompt is never masked and has at least one token).

Three producers, one per use, behind :data:`LAYOUT` (what :func:`dirl.model.layout.get_layout`
returns): :func:`decode_inputs` (a denoising step over left-padded rows), :func:`sft_inputs` (one
noisy copy per SFT sample) and :func:`pack_states` (trace states).
"""

from __future__ import annotations

from typing import Sequence

import torch

from dirl.model.layout import readout_rows
from dirl.model.layout.block_causal import SFTInputs
from dirl.model.masks import TokenMeta
from dirl.model.trace import Copy, StepCopy, Trace, TracePack



def state_meta(doc: torch.Tensor, copy: torch.Tensor) -> TokenMeta:
    """(B, T) doc ids (-1 = padding) and copy ids -> the meta of bidirectional states."""
    return TokenMeta(doc, torch.zeros_like(doc), torch.ones_like(doc, dtype=torch.bool), copy)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, TokenMeta | None]:
    """Rows of different lengths, left-padded: -> ids (R, W), positions (R, W) (0 at each row's first
    real token), meta (None when no row is padded: then the forward needs no mask at all)."""
    width = max(len(r) for r in rows)
    pads = torch.tensor([width - len(r) for r in rows], device=device)  # (R,)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    return (ids, *padded_frame(pads, width))


def padded_frame(pads: torch.Tensor, width: int) -> tuple[torch.Tensor, TokenMeta | None]:
    """(R,) left padding of rows of ``width`` columns -> positions (R, W) and meta (as :func:`left_padded`)."""
    cols = torch.arange(width, device=pads.device)[None]
    pos = (cols - pads[:, None]).clamp_min(0)  # (R, W)
    if not len(pads) or int(pads.max()) == 0:
        return pos, None
    valid = cols >= pads[:, None]
    doc = torch.where(valid, 0, -1)
    return pos, state_meta(doc, torch.zeros_like(doc))


def decode_inputs(rows: Sequence[Sequence[int]], pad_id: int, device):
    """One denoising step's inputs (each row = one state: prompt + current response)."""
    return left_padded(rows, pad_id, device)


def sft_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor, masked: torch.Tensor,
               mask_id: int, shift: int):
    """C noisy copies of each SFT row side by side; every (sample, copy) is its own state.

    input_ids, position_ids, doc_ids: (B, L) (doc -1 = padding); masked: (C, B, L) bool (response
    tokens only). -> :class:`SFTInputs` (ids (B, C L), positions, meta, readout rows (N,), (copy, row,
    column) of each masked token): the readout rows score the masked tokens in that order."""
    num_copies, _, length = masked.shape
    if shift and bool((masked & (position_ids == 0)[None]).any()):
        raise ValueError("a shifted-logit model cannot score a sample's first token: every SFT sample needs a prompt")
    ids = torch.cat(list(torch.where(masked, torch.full_like(input_ids, mask_id)[None], input_ids[None])), dim=1)
    stride = int(doc_ids.max()) + 1 if doc_ids.numel() else 1
    copy = torch.cat([doc_ids.clamp_min(0) + c * stride for c in range(num_copies)], dim=1)
    meta = state_meta(doc_ids.repeat(1, num_copies), copy)
    copy_idx, row_idx, col_idx = masked.nonzero(as_tuple=True)  # (N,) each
    target_index = row_idx * num_copies * length + copy_idx * length + col_idx
    return SFTInputs(ids, position_ids.repeat(1, num_copies), meta, readout_rows(target_index, shift),
                     (copy_idx, row_idx, col_idx))


def _pack_one(trace: Trace, copies: Sequence[Copy], mask_id: int):
    """One sequence's states side by side: ids, positions, copy ids, scores (target index, at, token, copy)."""
    prompt, tokens, steps = list(trace.prompt_ids), list(trace.token_ids), list(trace.steps)
    length = len(prompt) + len(tokens)
    ids, pos, copy_ids, scores = [], [], [], []
    for c, cp in enumerate(copies):
        start = len(ids)
        state = [mask_id if cp.masks(i, steps[i]) else t for i, t in enumerate(tokens)]
        ids += prompt + state
        pos += list(range(length))
        copy_ids += [c] * length
        scores += [(start + len(prompt) + i, t, i, c) for i, t in enumerate(tokens) if cp.scores(i, steps[i])]
    return ids, pos, copy_ids, scores


def pack_states(traces: Sequence[Trace], copies: Sequence[Sequence[Copy]], mask_id: int, pad_id: int, shift: int,
                device="cpu") -> TracePack:
    """Each sequence's states as segments of one row (right-padded rows); a copy's ``masks`` /
    ``scores`` get the generated token's index as their offset (the state spans the sequence)."""
    packed = [_pack_one(t, c, mask_id) for t, c in zip(traces, copies)]
    width = max(1, max(len(p[0]) for p in packed))
    rows = len(packed)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    doc = torch.full((rows, width), -1, dtype=torch.long)
    copy = torch.full((rows, width), -1, dtype=torch.long)
    score_rows = []
    for r, (row_ids, row_pos, row_copy, scores) in enumerate(packed):
        n = len(row_ids)
        ids[r, :n], pos[r, :n], doc[r, :n] = torch.tensor(row_ids), torch.tensor(row_pos), 0
        copy[r, :n] = torch.tensor(row_copy)
        score_rows += [(r * width + at, target, r, i, c) for at, target, i, c in scores]
    cols = torch.tensor(score_rows, dtype=torch.long).view(-1, 5).T
    at, rest = readout_rows(cols[0], shift), cols[1:]
    meta = state_meta(doc, copy).to(device)
    return TracePack(ids.to(device), pos.to(device), meta, at.to(device), *(c.to(device) for c in rest))


def state_copies(steps: Sequence[int], merge: int = 1) -> list[Copy]:
    """A sequence's trace states: one per distinct denoising step (``merge`` consecutive steps per
    state, TraceRL's shrink), each masking the tokens committed at steps >= its first and scoring
    those committed in its group. A state spans the whole sequence (block 0)."""
    distinct = sorted(set(steps))
    return [StepCopy(0, group[0], group[-1] + 1) for group in
            (distinct[j: j + merge] for j in range(0, len(distinct), merge))]


class BidirectionalLayout:
    """The layout object of ``arch.attention == "bidirectional"`` (same methods as block-causal's)."""

    name = "bidirectional"

    def sft(self, arch, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
            masked: torch.Tensor, mask_token_id: int) -> SFTInputs:
        return sft_inputs(input_ids, position_ids, doc_ids, masked, mask_token_id, arch.logit_shift)

    def decode_meta(self, *args):
        raise ValueError("a bidirectional model decodes with dirl.engine.full_attention, not block by block")

    def traces(self, arch, traces: Sequence, copies: Sequence[list[Copy]], device="cpu") -> TracePack:
        return pack_states(traces, copies, arch.mask_token_id, arch.pad_token_id, arch.logit_shift, device)


LAYOUT = BidirectionalLayout()
