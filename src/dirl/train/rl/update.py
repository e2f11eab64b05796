"""One DiPO policy update on a batch of scored rollouts (DESIGN §7).

Split out of the RL loop so the math reads in one place: build each mini-batch's
scoring plan once (so the old policy, the new policy and the frozen reference
are scored on identical states), then ``num_iterations`` passes of clipped
surrogate + k3 KL, one optimizer step per mini-batch.

Data parallel: the mini-batches are slices of the *global* rollout order
(``positions`` / ``total``), each rank scoring its own rollouts of each. A rank's
loss is rescaled from its local normaliser to the global one -- the token count
for ``token_mean``, the sequence count otherwise, all-reduced -- times the world
size (DDP / FSDP2 average gradients), so the step equals a single process's on
the whole mini-batch. A rank with nothing to score in a mini-batch still runs a
zero-weighted forward/backward so the gradient collectives stay matched. Exact
for the deterministic estimators (trace, trace_shrink, mean_field); the random
ones (trace_mc, random_mask, coupled) draw per rank, equal in distribution.

Micro-batches (DESIGN §12): each mini-batch's packed rows are scored and
backpropagated in groups of at most ``micro_batch_tokens`` real tokens
(a row -- one rollout and its copies -- is never split), gradients accumulate,
and each micro-batch's loss is rescaled from its own normaliser to the global
one exactly like a rank's, so K micro-batches give the update of one
(``tests/test_rl.py``). Peak memory is then set by the budget, not by the number
of rollouts per step. Every rank runs the same number of micro-batches (idle
ones backprop zero), so FSDP2's per-layer collectives stay matched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dirl.algo.likelihood import EstimatorArgs, Plan, plan_estimator, score_plan
from dirl.algo.losses import ScoredTokens, dipo_loss
from dirl.model.masks import TokenMeta
from dirl.model.trace import row_groups, select_rows
from dirl.rollout import Rollout, SamplingSpec
from dirl.train import dist as dist_lib
from dirl.train.optim import OptimConfig, clip_and_step
from dirl.train.rl.config import AlgoConfig


@dataclass
class Learner:
    """What a policy update reads and steps: the trained policy and everything around it."""

    model: torch.nn.Module            # as trained (DDP / FSDP2 under torchrun)
    ref_model: torch.nn.Module | None  # the frozen reference (beta > 0)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    optim: OptimConfig
    algo: AlgoConfig
    sampling: SamplingSpec            # the rollouts' distribution (the scored PolicyDist) and length


def minibatch_indices(num_seqs: int, num_minibatches: int) -> list[list[int]]:
    """Rollout indices of each mini-batch: consecutive slices of near-equal size (the policy
    update's and the value model's, so both step on the same rollouts)."""
    size = -(-num_seqs // max(1, num_minibatches))
    return [list(range(i, min(i + size, num_seqs))) for i in range(0, num_seqs, size)]


@dataclass
class _MicroBatch:
    """Some rows of one mini-batch's plan (at most ``micro_batch_tokens`` real tokens)."""

    plan: Plan                       # the rows' scoring plan
    tok_adv: torch.Tensor            # (N,) advantage of each scored token
    seq_lengths: torch.Tensor        # (S,) completion tokens per rollout
    logp_old: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None

    @property
    def num_scored(self) -> int:
        return self.plan.pack.score_index.numel()

    @property
    def num_seqs(self) -> int:
        return self.seq_lengths.numel()


def _split(plan: Plan, tok_adv, seq_lengths, logp_old, budget: int) -> list[_MicroBatch]:
    """The plan's rows in groups of at most ``budget`` real tokens, per-token tensors cut alike."""
    micro = []
    for rows in row_groups(plan.pack, budget):
        pack, keep = select_rows(plan.pack, rows)
        weight = None if plan.weight is None else plan.weight[keep]
        micro.append(_MicroBatch(Plan(pack, weight, plan.exact), tok_adv[keep], seq_lengths[rows],
                                 None if logp_old is None else logp_old[keep]))
    return micro


def _prepare(learner: Learner, rollouts: list[Rollout], adv: torch.Tensor, gen: torch.Generator,
             positions: list[int], total: int) -> list[list[_MicroBatch]]:
    """Per global mini-batch: this rank's micro-batches (none: no rollout of it here); for the
    exact estimators logp_old is the engine's recorded log-prob (no forward needed)."""
    model, algo = dist_lib.unwrap(learner.model), learner.algo
    device = next(model.parameters()).device
    local_of = {position: i for i, position in enumerate(positions)}
    prepared = []
    for global_idx in minibatch_indices(total, algo.num_minibatches):
        idx = [local_of[g] for g in global_idx if g in local_of]
        if not idx:
            prepared.append([])
            continue
        chunk = [rollouts[i] for i in idx]
        plan = plan_estimator(algo.estimator, EstimatorArgs.for_model(model, chunk, gen, algo))
        pack = plan.pack
        logp_old = None
        if plan.exact:  # the sampler's own states: its recorded log-probs are logp_old
            logp_old = torch.tensor([chunk[s].logps[t] for s, t in
                                     zip(pack.seq_index.tolist(), pack.token_index.tolist())],
                                    device=device, dtype=torch.float32)
        seq_lengths = torch.tensor([r.num_tokens for r in chunk], device=device)
        seq_adv = adv[idx].to(device)  # (S,) per rollout, or (S, L) per token (a critic's GAE)
        tok_adv = seq_adv[pack.seq_index] if seq_adv.dim() == 1 else seq_adv[pack.seq_index, pack.token_index]
        prepared.append(_split(plan, tok_adv, seq_lengths, logp_old, algo.micro_batch_tokens))
    return prepared


@torch.no_grad()
def _score_without_grad(prepared: list[list[_MicroBatch]], learner: Learner) -> None:
    """logp_old (inexact estimators) with the policy, then logp_ref with the frozen reference.

    Under FSDP2 each model's full weights are gathered in turn (never both at once), and only
    when some rank needs them (the gather is a collective)."""
    model, ref_model = learner.model, learner.ref_model
    items = [micro for minibatch in prepared for micro in minibatch]
    need_old = any(item.logp_old is None for item in items)
    if dist_lib.all_reduce_max([float(need_old)])[0]:
        with dist_lib.full_params(model):
            for item in items:
                if item.logp_old is None:
                    item.logp_old = score_plan(dist_lib.unwrap(model), item.plan, learner.sampling).float()
    if ref_model is not None and learner.algo.beta > 0:
        with dist_lib.full_params(ref_model):
            for item in items:
                item.logp_ref = score_plan(ref_model, item.plan, learner.sampling).float()


def _idle_backward(model) -> None:
    """A zero-weighted forward/backward on one pad block: joins the gradient collectives of a
    mini-batch in which this rank has nothing to score."""
    cfg = model.config
    device = next(model.parameters()).device
    ids = torch.full((1, cfg.block_size), cfg.pad_token_id, dtype=torch.long, device=device)
    positions = torch.arange(cfg.block_size, device=device)[None]
    meta = TokenMeta.clean(positions, cfg.block_size, torch.ones_like(ids, dtype=torch.bool))
    (model(ids, positions, meta).logits.sum() * 0.0).backward()  # a block of V logits: tiny


STAT_KEYS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "ratio_mean", "entropy")


def _micro_loss(learner: Learner, item: _MicroBatch, scale: float) -> dict:
    """Forward + backward of one micro-batch, its loss times ``scale`` (its share of the global
    normaliser x world size). -> the share of the loss and token-weighted sums of the statistics."""
    logp_new, entropy = score_plan(learner.model, item.plan, learner.sampling, with_entropy=True)
    tokens = ScoredTokens(logp_new, item.logp_old, item.tok_adv, item.plan.pack.seq_index, item.num_seqs,
                          weight=item.plan.weight, logp_ref=item.logp_ref, seq_lengths=item.seq_lengths)
    # Dr. GRPO's constant normaliser is the rollouts' length budget.
    loss, stats = dipo_loss(tokens, learner.algo, constant=float(learner.sampling.max_new_tokens))
    (loss * scale).backward()
    values = (stats.kl, stats.clipped_low_frac, stats.clipped_high_frac, stats.ratio_mean, float(entropy.mean()))
    return {"loss": loss.item() * scale / dist_lib.world_size(),
            **{k: v * item.num_scored for k, v in zip(STAT_KEYS, values)}}


def _minibatch_loss(learner: Learner, micro: list[_MicroBatch]) -> tuple[dict, float]:
    """Forward + backward of this rank's part of one mini-batch, micro-batch by micro-batch.
    -> (metrics, scored tokens), with metrics already global on one rank and token-weighted
    local sums (to reduce) otherwise."""
    model, algo = learner.model, learner.algo
    world = dist_lib.world_size()
    scored = sum(item.num_scored for item in micro)
    # token_mean divides by completion tokens (= scored tokens for the estimators that score each once)
    norm_of = (lambda item: int(item.seq_lengths.sum())) if algo.agg == "token_mean" else (lambda item: item.num_seqs)
    norm = sum(norm_of(item) for item in micro)  # dipo_loss's normaliser over this rank's micro-batches
    scored_all, norm_all = dist_lib.all_reduce_sum([scored, norm])
    if scored_all == 0:
        return {}, 0.0
    num_micro = int(dist_lib.all_reduce_max([float(len(micro))])[0])
    totals = {"loss": 0.0, **{k: 0.0 for k in STAT_KEYS}}
    for i in range(num_micro):  # the same count on every rank: FSDP2 gathers per forward
        with dist_lib.grad_sync(model, enabled=i == num_micro - 1):
            if i >= len(micro) or micro[i].num_scored == 0:
                _idle_backward(model)
                continue
            # x * 1.0 is exact: one micro-batch on one rank computes what it always did.
            values = _micro_loss(learner, micro[i], norm_of(micro[i]) / norm_all * world)
        totals = {k: totals[k] + values[k] for k in totals}
    if world == 1:  # token-weighted sums -> means
        totals = {k: v if k == "loss" else v / max(scored, 1) for k, v in totals.items()}
    return totals, float(scored)


def _reduce_step_metrics(values: dict, scored: float) -> dict:
    """Sum the ranks' loss shares; token-weighted means of the per-token statistics."""
    if dist_lib.world_size() == 1:
        return values
    keys = list(values)  # the same order on every rank (same code path)
    summed = dist_lib.all_reduce_sum([values[k] for k in keys] + [scored])
    return {k: summed[i] if k == "loss" else summed[i] / max(summed[-1], 1.0) for i, k in enumerate(keys)}


def policy_update(learner: Learner, rollouts: list[Rollout], adv: torch.Tensor, gen: torch.Generator,
                  positions: list[int] | None = None, total: int | None = None) -> dict:
    """Run the update; return averaged metrics (loss, kl, clip ratios, entropy, grad_norm, ...).

    ``adv``: (len(rollouts),) advantages, or (len(rollouts), L) per generated token (a critic's);
    ``gen`` draws the random estimators' states.
    ``positions``: each local rollout's index in the global batch of ``total`` rollouts
    (default: this rank holds the whole batch, in order)."""
    positions = list(range(len(rollouts))) if positions is None else positions
    total = len(rollouts) if total is None else total
    prepared = _prepare(learner, rollouts, adv, gen, positions, total)
    _score_without_grad(prepared, learner)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(learner.algo.num_iterations):
        for item in prepared:
            values, scored = _minibatch_loss(learner, item)
            if not values:  # nothing scored on any rank
                continue
            grad_norm, skipped = clip_and_step(learner.model, learner.optimizer, learner.scheduler, learner.optim)
            step_metrics = {**_reduce_step_metrics(values, scored), "grad_norm": grad_norm,
                            "skipped_steps": float(skipped)}
            for key, value in step_metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
    out = {k: v / max(count, 1) for k, v in totals.items()}
    out["skipped_steps"] = totals.get("skipped_steps", 0.0)
    out["optimizer_steps"] = count
    return out
