"""DiPO trace packing: every denoising state of a response in one forward.

A row holds the clean sequence (prompt + response, block-causal) followed by one
copy of block b per scored denoising state of that block: the block as it was
right before step ``lo`` (tokens committed at steps >= lo are ``[MASK]``; prompt
tokens are never masked). The copy scores the tokens committed at steps in
``[lo, hi)``. A copy sees the clean blocks < b and itself; nothing sees a copy;
its position ids are block b's. So one forward yields, for every generated
token, the logits of the exact state the sampler committed it in (DESIGN §4).

``hi = lo + 1`` for every step is exact DiPO; merging s consecutive steps into
one copy is TraceRL's shrink; a random subset of copies is AGRPO's Monte Carlo.
Cost grows with the number of copies, not with B x sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import torch

from dirl.model.layout import readout_rows
from dirl.model.masks import TokenMeta


@dataclass(frozen=True)
class StepCopy:
    """Block ``block`` as it was right before denoising step ``lo``: it masks the tokens
    committed at steps >= lo and scores those committed at steps in [lo, hi) (DiPO, TraceRL)."""

    block: int
    lo: int
    hi: int

    def masks(self, offset: int, step: int) -> bool:
        return step >= self.lo

    def scores(self, offset: int, step: int) -> bool:
        return self.lo <= step < self.hi


@dataclass(frozen=True)
class MaskCopy:
    """Block ``block`` with an explicit mask (one flag per offset; ELBO-style estimators): it
    scores exactly the tokens it masks. Prompt offsets are never masked, whatever the flag."""

    block: int
    masked: tuple[bool, ...]

    def masks(self, offset: int, step: int) -> bool:
        return self.masked[offset]

    def scores(self, offset: int, step: int) -> bool:
        return self.masked[offset]


Copy = Union[StepCopy, MaskCopy]  # one noisy copy of a block: which tokens it masks and scores


class Trace(NamedTuple):
    """What packing reads of one sampled response. A :class:`dirl.rollout.Rollout` has the
    same three fields, so rollouts are packed as they are (this layer does not import it)."""

    prompt_ids: Sequence[int]
    token_ids: Sequence[int]  # every generated position, up to the end of the last block
    steps: Sequence[int]      # the denoising step each generated token was committed at


def trace_copies(prompt_len: int, steps: list[int], block_size: int, merge: int = 1) -> list[Copy]:
    """The copies of a response: one per denoising step of each block (``merge`` steps per copy)."""
    by_block: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        block = (prompt_len + i) // block_size
        by_block.setdefault(block, [])
        if step not in by_block[block]:
            by_block[block].append(step)
    copies = []
    for block, block_steps in by_block.items():
        block_steps.sort()
        for j in range(0, len(block_steps), merge):
            group = block_steps[j: j + merge]
            copies.append(StepCopy(block, group[0], group[-1] + 1))
    return copies


@dataclass
class TracePack:
    input_ids: torch.Tensor      # (R, T)
    position_ids: torch.Tensor   # (R, T)
    meta: TokenMeta              # (R, T)
    score_index: torch.Tensor    # (N,) flat index into R*T: where each scored token's logits are (readout_rows)
    target_ids: torch.Tensor     # (N,) the committed token
    seq_index: torch.Tensor      # (N,) which sequence (row of the input list)
    token_index: torch.Tensor    # (N,) which generated token of that sequence
    copy_index: torch.Tensor     # (N,) which copy (position in that sequence's copy list)


def _pack_one(trace: Trace, copies: list[Copy], block_size: int, mask_id: int):
    """Token ids, positions, meta vectors and scores of one sequence (Python lists)."""
    steps = trace.steps
    prompt_len = len(trace.prompt_ids)
    clean = list(trace.prompt_ids) + list(trace.token_ids)
    ids, pos = list(clean), list(range(len(clean)))
    noisy, copy_id = [False] * len(clean), [-1] * len(clean)
    scores = []  # (position in row, target, token index, copy number)
    for c, cp in enumerate(copies):
        start = cp.block * block_size
        for offset in range(block_size):
            p = start + offset
            i = p - prompt_len  # index into the generated tokens (< 0: prompt)
            if p >= len(clean):
                raise ValueError(f"copy {cp} reaches past the sequence end ({len(clean)} tokens)")
            step = steps[i] if i >= 0 else -1
            masked, scored = i >= 0 and cp.masks(offset, step), i >= 0 and cp.scores(offset, step)
            if scored:
                scores.append((len(ids), clean[p], i, c))
            ids.append(mask_id if masked else clean[p])
            pos.append(p)
            noisy.append(True)
            copy_id.append(c)
    return ids, pos, noisy, copy_id, scores


def pack_traces(traces: Sequence[Trace], copies: Sequence[list[Copy]], block_size: int, mask_id: int, pad_id: int,
                device: torch.device | str = "cpu", logit_shift: int = 0) -> TracePack:
    """Pack each sequence (one per row; a :class:`Trace` or a rollout) with its copies
    (``copies[r]`` belong to ``traces[r]``); rows are right-padded. ``logit_shift``: the
    model's (:func:`~dirl.model.layout.readout_rows`)."""
    packed = [_pack_one(trace, row_copies, block_size, mask_id) for trace, row_copies in zip(traces, copies)]
    width = max(len(p[0]) for p in packed)
    rows = len(packed)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    doc = torch.full((rows, width), -1, dtype=torch.long)
    noisy = torch.zeros((rows, width), dtype=torch.bool)
    copy = torch.full((rows, width), -1, dtype=torch.long)
    score_rows = []
    for r, (row_ids, row_pos, row_noisy, row_copy, scores) in enumerate(packed):
        n = len(row_ids)
        ids[r, :n] = torch.tensor(row_ids)
        pos[r, :n] = torch.tensor(row_pos)
        doc[r, :n] = 0
        noisy[r, :n] = torch.tensor(row_noisy)
        copy[r, :n] = torch.tensor(row_copy)
        score_rows += [(r * width + at, target, r, i, c) for at, target, i, c in scores]
    cols = torch.tensor(score_rows, dtype=torch.long).view(-1, 5).T
    cols[0] = readout_rows(cols[0], logit_shift)
    meta = TokenMeta(doc, pos // block_size, noisy, copy).to(device)
    return TracePack(ids.to(device), pos.to(device), meta, *(c.to(device) for c in cols))


def row_groups(pack: TracePack, budget: int) -> list[list[int]]:
    """Consecutive rows of ``pack`` in groups of at most ``budget`` real (non-padding) tokens.

    A row longer than the budget forms its own group (a row is never split: its copies
    need its clean tokens). ``budget <= 0``: one group of every row."""
    widths = (pack.meta.doc >= 0).sum(dim=1).tolist()  # (R,) real tokens per row
    if budget <= 0:
        return [list(range(len(widths)))]
    groups, current, used = [], [], 0
    for row, width in enumerate(widths):
        if current and used + width > budget:
            groups.append(current)
            current, used = [], 0
        current.append(row)
        used += width
    return groups + ([current] if current else [])


def select_rows(pack: TracePack, rows: list[int]) -> tuple[TracePack, torch.Tensor]:
    """The sub-pack of ``rows`` (cut to their widest real row) and which of the pack's scores
    it holds: -> (sub_pack, keep (N,) bool). ``seq_index`` becomes the position in ``rows``."""
    device = pack.input_ids.device
    row_ids = torch.tensor(rows, dtype=torch.long, device=device)
    width = int((pack.meta.doc[row_ids] >= 0).sum(dim=1).max()) if rows else 0
    total_width = pack.input_ids.shape[1]
    score_row, score_col = pack.score_index // total_width, pack.score_index % total_width  # (N,) each
    local_of = torch.full((pack.input_ids.shape[0],), -1, dtype=torch.long, device=device)
    local_of[row_ids] = torch.arange(len(rows), device=device)
    keep = local_of[score_row] >= 0  # (N,)
    cut = lambda t: t[row_ids, :width]  # noqa: E731
    sub = TracePack(cut(pack.input_ids), cut(pack.position_ids), TokenMeta(*(cut(f) for f in pack.meta.fields())),
                    local_of[score_row[keep]] * width + score_col[keep], pack.target_ids[keep],
                    local_of[pack.seq_index[keep]], pack.token_index[keep], pack.copy_index[keep])
    return sub, keep
