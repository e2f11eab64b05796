"""The left-to-right likelihood of a diffusion LM: exact, deterministic, one packed forward.

A block-diffusion LM has no next-token distribution, but it has an exact likelihood for
any fixed unmasking order; the natural one is **left to right, one token per step**: token j
is scored in the state where the blocks before its block are clean, the tokens of its block
before j are unmasked and j and the rest of its block are masked. Those states are the
denoising states of one trace whose step ids are the positions, so the packed trace scorer
(:mod:`dirl.model.trace`, DiPO's) scores every token of a sequence in one forward
(:func:`left_to_right_trace` + :func:`score_traces`). The first token has no context and is
not scored. ``dirl serve``'s ``echo`` log-probs and the lm-eval model use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dirl.model.forward import Readout
from dirl.model.layout import get_layout
from dirl.model.policy import policy_logprobs
from dirl.model.trace import StepCopy, Trace
from dirl.rollout import PolicyDist

SCORE_CHUNK_ROWS = 256  # LM-head rows per chunk: (rows, V) logits at a time, never (N, V)
MODEL_DIST = PolicyDist(temperature=1.0)  # the model's own distribution (no top-k / top-p)


@dataclass
class Scored:
    """Log-probs of one sequence's tokens: ``logps[i]`` (None: not scored) and ``top[i]``, the
    ``k`` most likely ``(token id, log-prob)`` of that position's distribution."""

    logps: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


def left_to_right_trace(token_ids: list[int], block_size: int, mask_id: int) -> tuple[Trace, list[StepCopy]]:
    """The trace of a sequence unmasked left to right, one token per step, and its copies (token
    j committed at step j; the tail of the last block is padding, masked in every copy). Token 0
    has no copy: no context to score it in."""
    n = len(token_ids)
    width = -(-n // block_size) * block_size
    trace = Trace([], list(token_ids) + [mask_id] * (width - n), list(range(width)))
    return trace, [StepCopy(j // block_size, j, j + 1) for j in range(1, n)]


@torch.no_grad()
def score_traces(model, traces: list, copies: list[list], dist: PolicyDist, top: int) -> list[Scored]:
    """Every scored token's log-prob (and its position's ``top`` alternatives) under ``dist``, by
    the packed trace scorer: one forward for all traces, the LM head in row chunks."""
    arch = model.arch
    device = next(model.parameters()).device
    pack = get_layout(arch).traces(arch, traces, copies, device)
    out = [Scored([None] * len(t.token_ids), [[] for _ in t.token_ids]) for t in traces]
    if pack.score_index.numel() == 0:
        return out
    hidden = model(pack.input_ids, pack.position_ids, pack.meta, readout=Readout(pack.score_index, hidden=True)).hidden
    for start in range(0, hidden.shape[0], SCORE_CHUNK_ROWS):
        rows = slice(start, start + SCORE_CHUNK_ROWS)
        logp = policy_logprobs(model.lm_head(hidden[rows]), dist.temperature, dist.top_k, dist.top_p,
                               arch.mask_token_id)  # (n, V)
        chosen = logp.gather(-1, pack.target_ids[rows, None]).squeeze(-1).tolist()  # (n,)
        best = logp.topk(top, dim=-1) if top else None
        for k, (seq, tok) in enumerate(zip(pack.seq_index[rows].tolist(), pack.token_index[rows].tolist())):
            out[seq].logps[tok] = chosen[k]
            if best is not None:
                out[seq].top[tok] = list(zip(best.indices[k].tolist(), best.values[k].tolist()))
    return out
