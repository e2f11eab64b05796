"""Group-relative advantages (GRPO, DeepSeekMath 2024; DiPO, DiRL §3).

Rewards arrive flat, grouped by prompt: ``rewards[g * G + j]`` is sample j of
prompt g. Every mode gives advantages that sum to zero inside each group, so a
group whose rewards are all equal contributes no gradient.
"""

from __future__ import annotations

import torch

ADVANTAGE_MODES = ("zscore", "mean", "loo")


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "zscore", eps: float = 1e-6) -> torch.Tensor:
    """rewards: (P*G,) -> advantages (P*G,).

    * ``zscore`` (default, DiRL): (r - mean) / (std + eps), population std.
    * ``mean``: r - mean (Dr. GRPO: no std division, which otherwise up-weights
      near-uniform groups).
    * ``loo``: leave-one-out baseline r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean)
      (RLOO); needs G >= 2.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if mode == "zscore":
        adv = centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif mode == "mean":
        adv = centred
    elif mode == "loo":
        if group_size < 2:
            raise ValueError("leave-one-out advantages need group_size >= 2")
        adv = centred * group_size / (group_size - 1)
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; choose from {ADVANTAGE_MODES}")
    return adv.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-9) -> torch.Tensor:
    """(P,) bool: groups whose rewards are not all equal (DAPO's dynamic sampling keeps these)."""
    grouped = rewards.float().view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > tol
