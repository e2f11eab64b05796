"""The policy distribution shared by the sampler and the trainer.

The policy distribution of a position is the temperature-scaled softmax of its
logits, restricted by top-k / top-p when those are set. The engine samples from
it and records log-probs under it; the RL trainer recomputes log-probs with this
same function, so trainer and engine agree to float precision.

Greedy decoding (temperature 0) picks the argmax; its log-prob is taken under
the untempered softmax (temperature 1).
"""

from __future__ import annotations

import torch


def policy_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, mask_token_id: int | None = None) -> torch.Tensor:
    """Log-probs of the policy distribution. logits: (..., V) -> (..., V), fp32.

    ``mask_token_id`` is excluded from the support: committing ``[MASK]`` as a
    token would leave a position that looks undecoded to every later step.
    """
    logits = logits.float()
    if mask_token_id is not None:
        logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
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
