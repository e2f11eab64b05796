"""The value model in the RL loop, ``algo.critic=value`` (TraceRL, Wang et al. 2025, §3.3).

Per RL step, around the policy update (:mod:`dirl.train.rl.loop`):

1. :meth:`Critic.advantages` -- the value model scores every completion token's state on
   the ``trace`` plan (one copy per denoising step, the exact states the sampler saw),
   whatever estimator the policy uses, since GAE needs every step's value; Proposition 1
   (:mod:`dirl.algo.critic`) turns the old values and the outcome into per-token returns
   R_j and advantages A_j. The outcome is the group advantage (``algo.value.outcome=group``,
   TraceRL's choice: its rewards are group z-scores) or the raw reward (``raw``).
2. the policy update runs unchanged on the per-token A_j (no group z-score on top);
3. :meth:`Critic.update` -- ``algo.num_iterations`` epochs of ``algo.num_minibatches``
   steps of the clipped value loss on the same plans, micro-batched by
   ``algo.micro_batch_tokens``, with the value model's own AdamW (``algo.value.lr``,
   constant; the run's betas, weight decay and grad clip).

The value model and its optimizer state go into every checkpoint (``extra["critic"]``), so
a resumed run continues bit for bit. One process only (no torchrun), full-weight policies
only (no LoRA): both are refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from dirl.algo.critic import clipped_value_loss, outcome_rewards, returns_and_advantages, rollout_steps, step_ranks
from dirl.algo.likelihood import EstimatorArgs, plan_estimator
from dirl.errors import UserError
from dirl.model.trace import TracePack, row_groups, select_rows
from dirl.model.value import ValueModel
from dirl.rollout import Rollout
from dirl.train import dist as dist_lib
from dirl.train.optim import OptimConfig, build_optimizer, clip_and_step
from dirl.train.rl.config import AlgoConfig
from dirl.train.rl.update import minibatch_indices


@dataclass
class _ValueMicro:
    """Rows of one mini-batch's ``trace`` plan (at most ``micro_batch_tokens`` real tokens)."""

    pack: TracePack
    seq_ids: torch.Tensor             # (N,) index of each scored token's rollout in the step's batch
    old_values: torch.Tensor | None = None  # (N,) V_j before the update
    returns: torch.Tensor | None = None     # (N,) R_j


@dataclass
class ValueBatch:
    """What :meth:`Critic.advantages` leaves for :meth:`Critic.update`."""

    adv: torch.Tensor                 # (S, L) per-token advantages A_j, 0 past num_tokens
    minibatches: list[list[_ValueMicro]]
    metrics: dict


class Critic:
    """The value model, its optimizer and the settings it reads (``algo``, the run's optim)."""

    def __init__(self, policy: torch.nn.Module, algo: AlgoConfig, optim: OptimConfig):
        self.model = ValueModel(policy).train()
        self.algo, self.value = algo, algo.value
        self.optim = dataclasses.replace(optim, lr=algo.value.lr, schedule="constant", warmup_steps=0)
        self.optimizer = build_optimizer(self.model, self.optim)

    def _plans(self, rollouts: list[Rollout]) -> list[list[_ValueMicro]]:
        device = next(self.model.parameters()).device
        out = []
        for idx in minibatch_indices(len(rollouts), self.algo.num_minibatches):
            chunk = [rollouts[i] for i in idx]
            pack = plan_estimator("trace", EstimatorArgs.for_model(self.model, chunk, torch.Generator())).pack
            global_ids = torch.tensor(idx, device=device)[pack.seq_index]  # (N,)
            micro = []
            for rows in row_groups(pack, self.algo.micro_batch_tokens):
                sub, keep = select_rows(pack, rows)
                micro.append(_ValueMicro(sub, global_ids[keep]))
            out.append(micro)
        return out

    @torch.no_grad()
    def advantages(self, rollouts: list[Rollout], rewards: torch.Tensor, group_adv: torch.Tensor) -> ValueBatch:
        """rewards, group_adv (S,) -> the per-token GAE advantages and the value update's batch."""
        start = time.perf_counter()
        minibatches = self._plans(rollouts)
        steps = rollout_steps(rollouts)  # (S, L)
        rank, num_steps = step_ranks(steps)
        values = torch.zeros(steps.shape)  # (S, L) V_j^old
        items = [m for mb in minibatches for m in mb]
        for item in items:
            item.old_values = self.model(item.pack)
            values[item.seq_ids.cpu(), item.pack.token_index.cpu()] = item.old_values.cpu()
        outcome = group_adv if self.value.outcome == "group" else rewards
        token_rewards = outcome_rewards(outcome.cpu(), rank)
        returns, adv = returns_and_advantages(token_rewards, values, rank, num_steps, self.value.gamma,
                                              self.value.lam)
        for item in items:
            item.returns = returns[item.seq_ids.cpu(), item.pack.token_index.cpu()].to(item.old_values.device)
        valid = rank >= 0
        metrics = {"value/mean": float(values[valid].mean()), "value/return_mean": float(returns[valid].mean()),
                   "value/adv_std": float(adv[valid].std()) if valid.sum() > 1 else 0.0,
                   "timing/critic": time.perf_counter() - start}
        return ValueBatch(adv, minibatches, metrics)

    def update(self, batch: ValueBatch) -> dict:
        """The clipped value loss's optimizer steps on ``batch``. -> metrics (means over steps)."""
        start = time.perf_counter()
        totals = {"value/loss": 0.0, "value/clip_frac": 0.0, "value/grad_norm": 0.0}
        count = 0
        for _ in range(self.algo.num_iterations):
            for micro in batch.minibatches:
                num_tokens = sum(item.returns.numel() for item in micro)
                if num_tokens == 0:
                    continue
                loss_sum, clipped = 0.0, 0.0
                for item in micro:
                    loss, was_clipped = clipped_value_loss(self.model(item.pack), item.old_values, item.returns,
                                                           self.value.clip)
                    (loss.sum() / num_tokens).backward()
                    loss_sum, clipped = loss_sum + float(loss.detach().sum()), clipped + float(was_clipped.sum())
                grad_norm, _ = clip_and_step(self.model, self.optimizer, None, self.optim)
                for key, value in zip(totals, (loss_sum / num_tokens, clipped / num_tokens, grad_norm)):
                    totals[key] += value
                count += 1
        metrics = {**batch.metrics, **{k: v / max(count, 1) for k, v in totals.items()}}
        metrics["timing/critic"] += time.perf_counter() - start  # scoring + update: part of timing/train
        return metrics

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise UserError("algo.critic=value: the checkpoint holds no value model (saved by a run without one)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_critic(policy: torch.nn.Module, algo: AlgoConfig, optim: OptimConfig, lora_rank: int) -> Critic | None:
    """The run's critic (None for ``algo.critic=none``), a copy of ``policy`` as it is now."""
    if algo.critic == "none":
        return None
    if dist_lib.world_size() > 1:
        raise UserError("algo.critic=value runs in one process only (not under torchrun)")
    if lora_rank > 0:
        raise UserError("algo.critic=value needs a full-weight policy (lora.r=0)")
    return Critic(policy, algo, optim)
