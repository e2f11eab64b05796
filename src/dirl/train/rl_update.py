"""One DiPO policy update on a batch of scored rollouts (DESIGN §7).

Split out of the RL loop so the math reads in one place: build each mini-batch's
scoring plan once (so the old policy, the new policy and the frozen reference
are scored on identical states), then ``num_iterations`` passes of clipped
surrogate + k3 KL, one optimizer step per mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dirl.algo.likelihood import PolicyDist, plan_estimator, score_plan
from dirl.algo.losses import dipo_loss
from dirl.train.common import clip_and_step


@dataclass
class AlgoConfig:
    estimator: str = "trace"          # trace | trace_shrink | trace_mc | random_mask | coupled | mean_field
    shrink: int = 2                   # trace_shrink: denoising steps merged per copy
    mc_steps: int = 2                 # trace_mc: copies drawn per response
    adv_mode: str = "zscore"          # zscore | mean | loo
    dynamic_sampling: bool = False    # drop groups with equal rewards and refill from more prompts
    max_refill_rounds: int = 3
    clip_low: float = 0.2
    clip_high: float = 0.28
    beta: float = 0.0                 # k3 KL coefficient to the frozen reference (0 = no reference)
    agg: str = "token_mean"           # token_mean | seq_mean_token_mean | constant
    num_iterations: int = 1           # PPO epochs per rollout batch
    num_minibatches: int = 1          # optimizer steps per epoch


def _minibatches(num_seqs: int, num_minibatches: int) -> list[list[int]]:
    size = -(-num_seqs // max(1, num_minibatches))
    return [list(range(i, min(i + size, num_seqs))) for i in range(0, num_seqs, size)]


def _prepare(model, ref_model, rollouts, adv, algo: AlgoConfig, dist, gen):
    """Per mini-batch: plan, per-token advantages, logp_old and logp_ref (no grad)."""
    cfg = model.config
    device = next(model.parameters()).device
    prepared = []
    for idx in _minibatches(len(rollouts), algo.num_minibatches):
        chunk = [rollouts[i] for i in idx]
        plan = plan_estimator(algo.estimator, chunk, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id,
                              gen=gen, shrink=algo.shrink, mc_steps=algo.mc_steps, device=device)
        pack = plan.pack
        tok_adv = adv[idx].to(device)[pack.seq_index]  # (N,)
        with torch.no_grad():
            if plan.exact:  # the sampler's own states: its recorded log-probs are logp_old
                logp_old = torch.tensor([chunk[s].logps[t] for s, t in
                                         zip(pack.seq_index.tolist(), pack.token_index.tolist())],
                                        device=device, dtype=torch.float32)
            else:
                logp_old = score_plan(model, plan, dist).float()
            logp_ref = score_plan(ref_model, plan, dist).float() if (ref_model is not None and algo.beta > 0) \
                else None
        seq_lengths = torch.tensor([r.num_tokens for r in chunk], device=device)
        prepared.append((chunk, plan, tok_adv, logp_old, logp_ref, seq_lengths))
    return prepared


def policy_update(model, ref_model, rollouts, adv: torch.Tensor, algo: AlgoConfig, dist: PolicyDist,
                  optimizer, scheduler, optim_cfg, gen: torch.Generator, max_new_tokens: int) -> dict:
    """Run the update; return averaged metrics (loss, kl, clip ratios, entropy, grad_norm, ...)."""
    prepared = _prepare(model, ref_model, rollouts, adv, algo, dist, gen)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(algo.num_iterations):
        for chunk, plan, tok_adv, logp_old, logp_ref, seq_lengths in prepared:
            if plan.pack.score_index.numel() == 0:
                continue
            logp_new, entropy = score_plan(model, plan, dist, with_entropy=True)
            loss, stats = dipo_loss(logp_new, logp_old, tok_adv, plan.pack.seq_index, len(chunk),
                                    weight=plan.weight, logp_ref=logp_ref, beta=algo.beta,
                                    eps_low=algo.clip_low, eps_high=algo.clip_high, agg=algo.agg,
                                    seq_lengths=seq_lengths, constant=float(max_new_tokens))
            loss.backward()
            grad_norm, skipped = clip_and_step(model, optimizer, scheduler, optim_cfg)
            step_metrics = {"loss": loss.item(), "kl": stats.kl, "clip_ratio/low_mean": stats.clip_low,
                            "clip_ratio/high_mean": stats.clip_high, "ratio_mean": stats.ratio_mean,
                            "entropy": float(entropy.mean()), "grad_norm": grad_norm,
                            "skipped_steps": float(skipped)}
            for key, value in step_metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
    out = {k: v / max(count, 1) for k, v in totals.items()}
    out["skipped_steps"] = totals.get("skipped_steps", 0.0)
    out["optimizer_steps"] = count
    return out
