"""Sampling and unmasking rules: pure functions on tensors.

The engine samples from the policy distribution of :mod:`dirl.model.policy` and
records the log-prob of every sampled token under it; the RL trainer recomputes
log-probs with the very same function, which is what makes the DiPO ratio
exactly 1 on the first iteration after a rollout.
"""

from __future__ import annotations

import torch

from dirl.rollout import UNMASKING


def sample_from_logprobs(logp: torch.Tensor, uniforms: torch.Tensor | None, greedy: bool) -> torch.Tensor:
    """Draw one token per row by inverse CDF. logp: (N, V), uniforms: (N,) in [0, 1) (unused if greedy) -> (N,) ids.

    Inverse-CDF sampling with externally drawn uniforms keeps every sequence's
    randomness in its own generator, so batch composition never changes a
    seeded request's output.
    """
    if greedy:
        return logp.argmax(-1)
    cdf = logp.exp().cumsum(-1)  # (N, V)
    cdf = cdf / cdf[..., -1:]  # guard against a total slightly below 1
    ids = torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype)).squeeze(-1)
    return ids.clamp_max(logp.shape[-1] - 1)


def transfer_schedule(block_size: int, steps: int) -> torch.Tensor:
    """Tokens to commit at each of ``steps`` steps of a block: B // steps each, the first B % steps
    steps one more (LLaDA's ``get_num_transfer_tokens`` over a whole block). -> (steps,) long."""
    base, extra = divmod(block_size, steps)
    return torch.full((steps,), base, dtype=torch.long) + (torch.arange(steps) < extra)


def steps_into_block(step_ids: torch.Tensor, masked: torch.Tensor, num_forwards: torch.Tensor) -> torch.Tensor:
    """How many forwards each row has spent on its current block. step_ids, masked: (R, B); num_forwards: (R,).

    Every step commits at least one token, so the block began at the smallest step id among its
    committed positions (a prompt's tail carries step 0, the first forward); none committed: 0."""
    first = torch.where(masked, num_forwards[:, None], step_ids).min(-1).values  # (R,)
    return num_forwards - first


def select_commits(confidence: torch.Tensor, masked: torch.Tensor, strategy: str, threshold: float = 0.9,
                   steps_per_block: int = 4, block_size: int = 4,
                   block_step: torch.Tensor | None = None) -> torch.Tensor:
    """Which masked positions to commit this step. confidence, masked: (R, B) -> (R, B) bool.

    * ``dynamic``: every masked position with confidence >= threshold, and at
      least the most confident one (Fast-dLLM / SDAR's parallel decoding).
    * ``static``: the k most confident, k = ceil(B / steps_per_block), so a block
      takes exactly ``steps_per_block`` forwards when B divides evenly.
    * ``sequential``: the leftmost masked position (autoregressive order).
    * ``threshold_schedule``: LLaDA2's rule -- every masked position with confidence *above*
      ``threshold``, unless fewer than k_s pass, then the k_s most confident instead, where
      k_s = :func:`transfer_schedule` (B, steps_per_block)[s] and s = ``block_step`` (R,), the
      forwards already spent on the row's block (None: 0).
    Rows with nothing masked commit nothing.
    """
    conf = confidence.masked_fill(~masked, float("-inf"))
    any_masked = masked.any(-1, keepdim=True)
    best = torch.zeros_like(masked).scatter(-1, conf.argmax(-1, keepdim=True), True) & any_masked
    if strategy == "dynamic":
        return ((conf >= threshold) & masked) | best
    if strategy == "static":
        k = -(-block_size // steps_per_block)
        rank = conf.argsort(-1, descending=True).argsort(-1)  # 0 = most confident
        return (rank < k) & masked
    if strategy == "threshold_schedule":
        schedule = transfer_schedule(block_size, steps_per_block).to(masked.device)
        step = torch.zeros(len(masked), dtype=torch.long) if block_step is None else block_step
        k = schedule[step.clamp(0, steps_per_block - 1)][:, None]  # (R, 1)
        passed = (conf > threshold) & masked
        rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return torch.where(passed.sum(-1, keepdim=True) >= k, passed, (rank < k) & masked)
    if strategy == "sequential":
        first = masked.int().argmax(-1, keepdim=True)
        return torch.zeros_like(masked).scatter(-1, first, True) & any_masked
    raise ValueError(f"unknown unmasking strategy {strategy!r}; choose from {UNMASKING}")
