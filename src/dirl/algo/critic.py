"""TraceRL's diffusion value model: step-wise returns and GAE, and the clipped value loss.

TraceRL (Wang et al. 2025, "Revolutionizing Reinforcement Learning Framework for
Diffusion Large Language Models", Proposition 1; dLLM-RL ``train/train_trado_value.py``).
A response's trace is split into steps t = 1..T -- the sampler's forwards, in order
(``Rollout.steps``; tokens committed together share a step, and steps run on across
block boundaries, so the first step of block b+1 simply follows the last of block b).
Token j is committed at step t_j, and ``V_j`` is the value model's output at j's noisy
position in the trace copy of that step (the state right before t_j). Then

    step aggregates   V*_t = mean_{j in t} V_j,   r*_t = mean_{j in t} r_j
    step recursions   R*_t = r*_t + gamma R*_{t+1}
                      delta_t = r*_t - V*_t + gamma V*_{t+1}
                      A*_t = delta_t + gamma lam A*_{t+1}
    token-wise        R_j = r_j + gamma R*_{t_j+1}
                      A_j = r_j - V_j + gamma V*_{t_j+1} + gamma lam A*_{t_j+1}

Boundary cases: past the last step R*_{T+1} = V*_{T+1} = A*_{T+1} = 0 (the response
ends; a length-truncated response is not bootstrapped either). An outcome reward sits on
the tokens of the last step (the step with the highest id among the completion's
tokens); a completion ends at its stop token, so tokens after it in the final block
belong to no step. With gamma = lam = 1 the sums telescope: R_j = R (the outcome) and
A_j = R - V_j for every token.

Departures from the paper / dLLM-RL: none in the recursions. The value loss is the
token mean of ``0.5 max((V - R)^2, (V_clip - R)^2)`` over the batch (dLLM-RL divides
each sequence's sum by the maximum generation length); only outcome rewards are
supported (no process reward). Pure functions on padded (S, L) tensors: S sequences,
L generated positions, ``step_rank`` -1 where a position is in no step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dirl.errors import FINITE_NON_NEGATIVE, FINITE_POSITIVE, UNIT_INTERVAL, check_fields, one_of
from dirl.rollout import Rollout

CRITICS = ("none", "value")
OUTCOMES = ("group", "raw")


@dataclass
class ValueConfig:
    """The value model's settings (``algo.value.*``; used when ``algo.critic=value``)."""

    lr: float = 5e-6                  # its own AdamW, constant lr (TraceRL: 5e-6 beside a policy lr of 1e-6)
    clip: float = 0.2                 # value clip eps: V_clip = V_old + clamp(V - V_old, -eps, eps)
    gamma: float = 1.0                # discount over trace steps
    lam: float = 1.0                  # GAE lambda
    # What GAE's outcome reward is. group: the group advantage of algo.adv_mode (TraceRL: its
    # rewards are group z-scores, so A_j = z - V_j at gamma = lam = 1); raw: the reward itself
    # (a plain PPO critic, no group baseline).
    outcome: str = "group"

    def __post_init__(self) -> None:
        check_fields(self, {"lr": FINITE_POSITIVE, "clip": FINITE_NON_NEGATIVE, "gamma": UNIT_INTERVAL,
                            "lam": UNIT_INTERVAL, "outcome": one_of(*OUTCOMES)})


def rollout_steps(rollouts: Sequence[Rollout]) -> torch.Tensor:
    """(S, L) long: each completion token's step id, -1 past ``num_tokens`` (L = the longest)."""
    width = max((r.num_tokens for r in rollouts), default=0)
    steps = torch.full((len(rollouts), width), -1, dtype=torch.long)
    for s, r in enumerate(rollouts):
        steps[s, :r.num_tokens] = torch.tensor(r.steps[:r.num_tokens], dtype=torch.long)
    return steps


def step_ranks(steps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """steps (S, L), -1 = none -> (rank (S, L): 0-based order of each token's step within its
    sequence, -1 = none; T = the most steps of any sequence). Step ids may have gaps (a
    forward that committed only tokens after the stop token belongs to no step)."""
    valid = steps >= 0
    big = int(steps.max()) + 1 if steps.numel() else 1
    key = torch.where(valid, steps, torch.full_like(steps, big))
    sorted_key, order = key.sort(dim=1)
    new_step = torch.ones_like(sorted_key, dtype=torch.bool)
    new_step[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    rank_sorted = new_step.long().cumsum(dim=1) - 1  # (S, L)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    rank = torch.where(valid, rank, torch.full_like(rank, -1))
    return rank, int(rank.max()) + 1 if rank.numel() else 0


def outcome_rewards(seq_reward: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """seq_reward (S,), rank (S, L) -> token rewards r_j (S, L): the outcome on the tokens of
    each sequence's last step, 0 elsewhere."""
    last = rank.max(dim=1, keepdim=True).values  # (S, 1)
    on_last = (rank == last) & (rank >= 0)
    return torch.where(on_last, seq_reward.float().to(rank.device)[:, None], 0.0)


def step_means(token_values: torch.Tensor, rank: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(S, L) token quantities -> (S, T) their mean over each step's tokens (0 for no step)."""
    valid = rank >= 0
    index = rank.clamp_min(0)
    zeros = torch.zeros(rank.shape[0], num_steps, device=rank.device)
    sums = zeros.scatter_add(1, index, torch.where(valid, token_values, 0.0))
    counts = zeros.scatter_add(1, index, valid.float())
    return sums / counts.clamp_min(1.0)


def step_recursions(r_star: torch.Tensor, v_star: torch.Tensor, gamma: float, lam: float):
    """r*, V* (S, T), 0 past each sequence's last step -> (R* (S, T+1), A* (S, T+1)), with the
    boundary column T (and every step past a sequence's end) 0."""
    num_seqs, num_steps = r_star.shape
    ret = r_star.new_zeros(num_seqs, num_steps + 1)
    adv = r_star.new_zeros(num_seqs, num_steps + 1)
    v_next = torch.cat([v_star, v_star.new_zeros(num_seqs, 1)], dim=1)
    for t in range(num_steps - 1, -1, -1):  # T iterations of (S,) vector ops
        ret[:, t] = r_star[:, t] + gamma * ret[:, t + 1]
        delta = r_star[:, t] - v_star[:, t] + gamma * v_next[:, t + 1]
        adv[:, t] = delta + gamma * lam * adv[:, t + 1]
    return ret, adv


def returns_and_advantages(rewards: torch.Tensor, values: torch.Tensor, rank: torch.Tensor, num_steps: int,
                           gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposition 1's token-wise quantities. rewards r_j, values V_j (S, L), rank (S, L) from
    :func:`step_ranks` -> (R_j (S, L), A_j (S, L)), 0 at positions in no step."""
    rewards, values = rewards.float(), values.float()
    r_star = step_means(rewards, rank, num_steps)  # (S, T)
    v_star = step_means(values, rank, num_steps)   # (S, T)
    ret_star, adv_star = step_recursions(r_star, v_star, gamma, lam)  # (S, T+1)
    v_star_ext = torch.cat([v_star, v_star.new_zeros(rank.shape[0], 1)], dim=1)  # (S, T+1)
    valid = rank >= 0
    nxt = torch.where(valid, rank + 1, torch.full_like(rank, num_steps))  # t_j + 1, or the boundary
    ret = rewards + gamma * ret_star.gather(1, nxt)
    adv = rewards - values + gamma * v_star_ext.gather(1, nxt) + gamma * lam * adv_star.gather(1, nxt)
    zero = torch.zeros_like(ret)
    return torch.where(valid, ret, zero), torch.where(valid, adv, zero)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: values, old_values, returns (N,) ->
    (0.5 max((V - R)^2, (V_clip - R)^2) (N,), clipped (N,) bool: the clipped term is larger)."""
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain
