"""Sampling and unmasking rules: pure functions on tensors.

The *policy distribution* of a position is the temperature-scaled softmax of its
logits, restricted by top-k / top-p when those are set. The engine records the
log-prob of every sampled token under it, and the RL trainer recomputes log-probs
with the very same function (:func:`policy_logprobs`), which is what makes the
DiPO ratio exactly 1 on the first iteration after a rollout.

Greedy decoding (temperature 0) picks the argmax; its recorded log-prob is under
the untempered softmax (temperature 1).
"""

from __future__ import annotations

import torch

UNMASKING = ("dynamic", "static", "sequential")


def policy_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the policy distribution. logits: (..., V) -> (..., V), fp32."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top one always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample_from_logprobs(logp: torch.Tensor, uniforms: torch.Tensor, greedy: bool) -> torch.Tensor:
    """Draw one token per row by inverse CDF. logp: (N, V), uniforms: (N,) in [0, 1) -> (N,) ids.

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


def select_commits(confidence: torch.Tensor, masked: torch.Tensor, strategy: str, threshold: float = 0.9,
                   steps_per_block: int = 4, block_size: int = 4) -> torch.Tensor:
    """Which masked positions to commit this step. confidence, masked: (R, B) -> (R, B) bool.

    * ``dynamic``: every masked position with confidence >= threshold, and at
      least the most confident one (Fast-dLLM / SDAR's parallel decoding).
    * ``static``: the k most confident, k = ceil(B / steps_per_block), so a block
      takes exactly ``steps_per_block`` forwards when B divides evenly.
    * ``sequential``: the leftmost masked position (autoregressive order).
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
    if strategy == "sequential":
        first = masked.int().argmax(-1, keepdim=True)
        return torch.zeros_like(masked).scatter(-1, first, True) & any_masked
    raise ValueError(f"unknown unmasking strategy {strategy!r}; choose from {UNMASKING}")
