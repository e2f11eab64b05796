"""Steps 1-3 of an RL step: prompts, rollouts, rewards, dynamic sampling (DESIGN §7, §8).

Data parallel: every rank draws the same prompt list (one cursor); prompt j of a round is
decoded by rank j % world with its own engine, its whole group of G samples included, and the
seed of a prompt depends only on its index (:func:`dirl.runtime.rollout_seed`), so a prompt gets
the same rollouts whichever rank decodes it. Rewards and advantages are per group, hence local;
dynamic sampling decides on the gathered rewards so every rank agrees.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dirl.algo.advantages import informative_groups
from dirl.data import reward_prompt
from dirl.errors import UserError
from dirl.rewards import RewardError, compute_rewards
from dirl.rollout import Rollout
from dirl.runtime import epoch_seed, rollout_seed
from dirl.train import dist as dist_lib
from dirl.train.rl.config import AlgoConfig, RolloutConfig


class PromptSampler:
    """Epochs of seeded permutations over the rows; the cursor is saved for exact resume."""

    def __init__(self, num_rows: int, seed: int, cursor: int = 0):
        self.num_rows, self.seed, self.cursor = num_rows, seed, cursor

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.cursor, self.num_rows)
            perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
            out.append(int(perm[offset]))
            self.cursor += 1
        return out


@dataclass
class Collector:
    """What steps 1-3 read: the prompts and their sampler, the rewards, the backend."""

    rollout: RolloutConfig            # group size, sampling, prompts per step
    algo: AlgoConfig                  # dynamic sampling and its refill rounds
    seed: int
    tokenizer: Any
    backend: Any                      # a dirl.backends RolloutBackend
    rows: list[dict]
    prompt_ids: Sequence[list[int]]   # PromptIds: row i tokenized when first drawn
    template: str                     # renders a row's question (a TRL reward's ``prompts``)
    rewards: dict                     # {name or callable: weight} of the rollouts' reward
    sampler: PromptSampler
    first_step: int = 0               # this invocation's first step: a reward failing on all of it stops the run
    context: int = 0                  # the model's context: prompt + max_new_tokens must fit (0: unchecked)


@dataclass
class RolloutBatch:
    """This rank's kept rollouts (whole groups) and where they sit in the global batch."""

    rollouts: list[Rollout] = field(default_factory=list)
    rewards: list[torch.Tensor] = field(default_factory=list)      # per local group, (G,) each
    positions: list[int] = field(default_factory=list)             # global index of each local rollout
    all_rewards: list[torch.Tensor] = field(default_factory=list)  # per kept group of every rank, in order

    def local_rewards(self) -> torch.Tensor:
        return torch.cat(self.rewards) if self.rewards else torch.zeros(0)

    def global_rewards(self) -> torch.Tensor:
        return torch.cat(self.all_rewards) if self.all_rewards else torch.zeros(0)


def collect(run: Collector, indices: list[int], step: int) -> tuple[list[Rollout], torch.Tensor, dict]:
    """Steps 2-3 for some prompts: G samples for each prompt index, scored.
    -> (rollouts, reward tensor, metrics)."""
    tokenizer = run.tokenizer
    group = run.rollout.group_size
    params = run.rollout.sampling.params(tokenizer.stop_ids(), n=group)
    seeds = [rollout_seed(run.seed, step, i) for i in indices]
    t0 = time.perf_counter()
    prompts_ids = [run.prompt_ids[i] for i in indices]
    _check_context(run, indices, prompts_ids)
    # A rank can get no prompt (a refill round smaller than the world): it only joins the collectives.
    rollouts = run.backend.generate(prompts_ids, params, seeds) if indices else []
    t1 = time.perf_counter()
    texts = [tokenizer.decode(r.completion_ids) for r in rollouts]
    rows = run.rows
    columns = {key: [rows[i][key] for i in indices for _ in range(group)] for key in rows[indices[0] if indices else 0]}
    # Rendered for the drawn rows only (a task may hold thousands of rows),
    # once a row: its G rollouts share the prompt.
    row_prompts = [reward_prompt(rows[i], run.template) for i in indices]
    prompts = [prompt for prompt in row_prompts for _ in range(group)]
    result = compute_rewards(run.rewards, texts, columns, prompts=prompts,
                             completion_ids=[r.completion_ids for r in rollouts])
    if step == run.first_step:
        _stop_on_a_broken_reward(result)
    metrics = {"timing/rollout": t1 - t0, "timing/reward": time.perf_counter() - t1, **result.metrics}
    return rollouts, torch.tensor(result.total, dtype=torch.float32), metrics


def _check_context(run: Collector, indices: list[int], prompts_ids: list[list[int]]) -> None:
    """A drawn prompt + ``max_new_tokens`` past the model's context is a user error naming the row
    (raised on every rank, so none waits in a collective for the others)."""
    new = run.rollout.sampling.max_new_tokens
    long = [(i, len(p)) for i, p in zip(indices, prompts_ids) if run.context and len(p) + new > run.context]
    if dist_lib.all_reduce_max([float(bool(long))])[0]:
        where = f"data row {long[0][0]} has a prompt of {long[0][1]} tokens; with" if long else "on another rank, with"
        raise UserError(f"{where} rollout.sampling.max_new_tokens={new} it exceeds the model's context of "
                        f"{run.context} tokens")


def _stop_on_a_broken_reward(result) -> None:
    """A reward that failed on every completion of the run's first step is a bug, not a score of
    0: stop (every rank, so none waits in a collective for the others)."""
    if dist_lib.all_reduce_max([float(bool(result.failures))])[0]:
        result.raise_if_all_failed()
        raise RewardError("a reward failed on every completion of the first step on another rank")


def _global_round(local_rewards: torch.Tensor, mine: list[int], count: int, group: int) -> torch.Tensor:
    """A round's rewards of all ``count`` prompts in prompt order, from every rank's share."""
    if dist_lib.world_size() == 1:
        return local_rewards
    out = torch.zeros(count, group)
    for positions, values in dist_lib.all_gather_object((mine, local_rewards.view(-1, group).tolist())):
        for position, row in zip(positions, values):
            out[position] = torch.tensor(row)
    return out.view(-1)


def _global_round_metrics(metrics: dict, count: int) -> dict:
    """One round's metrics over the ranks: the slowest rank's timings, summed error counts, other
    values (means over completions) weighted by each rank's ``count`` rollouts. Exact, except a
    reward mean when the reward is not applicable (None) to some completions."""
    if dist_lib.world_size() == 1:
        return metrics
    keys = list(metrics)  # the same order on every rank (same code path)
    # A rank without rollouts adds nothing (its means are NaN: over no completions).
    weighted = [0.0 if not count else metrics[k] if k.endswith("/errors") else metrics[k] * count for k in keys]
    summed = dist_lib.all_reduce_sum(weighted + [count])
    maxed = dist_lib.all_reduce_max([metrics[k] for k in keys])
    out = {}
    for i, key in enumerate(keys):
        if key.startswith("timing/"):
            out[key] = maxed[i]
        elif key.endswith("/errors"):
            out[key] = summed[i]
        else:
            out[key] = summed[i] / max(summed[-1], 1)
    return out


def gather_batch(run: Collector, step: int) -> tuple[RolloutBatch, dict]:
    """Steps 1-3: prompts, rollouts, rewards; with dynamic sampling, refill uninformative groups.

    -> (RolloutBatch, metrics). Kept groups are numbered in prompt order over all ranks."""
    group, wanted = run.rollout.group_size, run.rollout.num_prompts
    batch, metrics, kept = RolloutBatch(), {}, 0
    rounds = 1 + (run.algo.max_refill_rounds if run.algo.dynamic_sampling else 0)
    first_zero_std = None
    for _ in range(rounds):
        indices = run.sampler.take(wanted - kept)  # the same global list on every rank
        mine = dist_lib.shard_positions(len(indices))
        new_rollouts, new_rewards, m = collect(run, [indices[j] for j in mine], step)
        m = _global_round_metrics(m, len(new_rollouts))
        round_rewards = _global_round(new_rewards, mine, len(indices), group)
        keep = informative_groups(round_rewards, group)
        if first_zero_std is None:
            first_zero_std = float((~keep).float().mean())
            metrics.update(m)
        else:
            for key in ("timing/rollout", "timing/reward"):
                metrics[key] += m[key]
        if not run.algo.dynamic_sampling:
            keep = torch.ones_like(keep)
        ordinal = (torch.cumsum(keep.long(), 0) - 1 + kept).tolist()  # global number of each kept group
        for k, j in enumerate(mine):
            if keep[j]:
                batch.rollouts += new_rollouts[k * group:(k + 1) * group]
                batch.rewards.append(new_rewards[k * group:(k + 1) * group])
                batch.positions += range(ordinal[j] * group, (ordinal[j] + 1) * group)
        batch.all_rewards += [round_rewards[g * group:(g + 1) * group] for g in keep.nonzero().squeeze(-1).tolist()]
        kept += int(keep.sum())
        if kept >= wanted:
            break
    metrics["frac_reward_zero_std"] = first_zero_std
    return batch, metrics


def rollout_metrics(rollouts: list[Rollout], rewards_t: torch.Tensor) -> dict:
    """``rollouts``: this rank's; ``rewards_t``: every kept rollout's reward (all ranks)."""
    lengths = [r.num_tokens for r in rollouts]
    terminated = [r.num_tokens for r in rollouts if r.finish_reason != "length"]
    sums = [sum(lengths), sum(r.num_forwards for r in rollouts), len(rollouts), len(rollouts) - len(terminated),
            sum(terminated), len(terminated)]
    tokens, forwards, count, clipped, terminated_tokens, num_terminated = dist_lib.all_reduce_sum(sums)
    # min via the max of negatives; a rank without rollouts must not win either reduction
    longest, neg_shortest = dist_lib.all_reduce_max([max(lengths, default=-1), -min(lengths, default=2**31)])
    return {"reward": float(rewards_t.mean()) if rewards_t.numel() else 0.0,
            "reward_std": float(rewards_t.std(unbiased=False)) if rewards_t.numel() else 0.0,
            "completions/mean_length": tokens / max(count, 1),
            "completions/min_length": float(-neg_shortest) if count else 0.0,
            "completions/max_length": float(longest) if count else 0.0,
            "completions/mean_terminated_length": terminated_tokens / max(num_terminated, 1),
            "completions/clipped_ratio": clipped / max(count, 1),
            # as in `dirl eval`: completion tokens (not the positions after a stop) per forward
            "tokens_per_forward": tokens / max(forwards, 1)}
