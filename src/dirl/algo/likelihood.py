"""Likelihood estimators for RL on blockwise diffusion LMs -- one registry, one engine.

Each estimator turns a batch of rollouts into a *plan*: a packed input whose
noisy copies hold the denoising states to score, which tokens each state scores,
and an importance weight per scored token. The same plan is scored under the
policy (with grad), the frozen reference and -- for the inexact estimators -- the
old policy, so every ratio compares like with like.

| name           | states scored                                  | unbiased            |
|----------------|------------------------------------------------|---------------------|
| ``trace``      | every denoising step, exact (DiPO, DiRL §3)    | yes                 |
| ``trace_shrink`` | s consecutive steps merged into one copy (TraceRL, Wang et al. 2025) | no |
| ``trace_mc``   | k steps per response drawn stratified, weighted by stratum size (AGRPO-style, Zhan et al. 2025) | in expectation |
| ``random_mask``| one random mask per block, ratio t ~ U(0,1) (ELBO surrogate, diffu-GRPO style) | no |
| ``coupled``    | two complementary random masks per block; every token scored once | no |
| ``mean_field`` | the whole response masked, one step (d1, Zhao et al. 2025) | no |

``exact`` estimators score the sampler's own states, so the engine's recorded
log-probs are their ``logp_old``; the others recompute ``logp_old`` on their plan.
Only tokens of the completion (up to the stop token) are scored; later tokens of
the final block stay in the states as context.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from dirl.model.lm_head import head_logprobs
from dirl.model.masks import TokenMeta
from dirl.model.policy import policy_logprobs
from dirl.model.trace import Copy, MaskCopy, TracePack, pack_traces, trace_copies
from dirl.rollout import PolicyDist, Rollout

__all__ = ["ESTIMATORS", "EstimatorArgs", "Plan", "PolicyDist", "plan_estimator", "score_plan"]


@dataclass
class Plan:
    pack: TracePack
    weight: torch.Tensor | None   # (N,) importance weights, None = all ones
    exact: bool                   # scores the sampler's states: engine logps are logp_old


def _default_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@dataclass
class EstimatorArgs:
    """The one argument of every estimator: the rollouts, the model's special ids, the options."""

    rollouts: Sequence[Rollout]
    block_size: int
    mask_id: int
    pad_id: int
    gen: torch.Generator = field(default_factory=_default_generator)  # the random estimators' draws
    shrink: int = 2               # trace_shrink: denoising steps merged per copy
    mc_steps: int = 2             # trace_mc: copies drawn per response
    device: torch.device | str = "cpu"

    @classmethod
    def for_model(cls, model, rollouts: Sequence[Rollout], gen: torch.Generator, shrink: int = 2,
                  mc_steps: int = 2) -> EstimatorArgs:
        cfg = model.config
        return cls(rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id, gen, shrink, mc_steps,
                   next(model.parameters()).device)


def _scorable(rollout: Rollout, copy: Copy, block_size: int) -> bool:
    """Does the copy score at least one completion token?"""
    prompt_len = len(rollout.prompt_ids)
    for offset in range(block_size):
        i = copy.block * block_size + offset - prompt_len
        if 0 <= i < rollout.num_tokens and copy.scores(offset, rollout.steps[i]):
            return True
    return False


def _stratified(copies: list[Copy], k: int, gen: torch.Generator) -> tuple[list[Copy], list[float]]:
    """One copy drawn uniformly from each of k contiguous strata; weight = stratum size."""
    k = min(k, len(copies))
    bounds = [round(j * len(copies) / k) for j in range(k + 1)]
    picked, weights = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        picked.append(copies[lo + int(torch.randint(hi - lo, (1,), generator=gen))])
        weights.append(float(hi - lo))
    return picked, weights


def _random_mask_copies(rollout: Rollout, block_size: int, gen: torch.Generator, coupled: bool) -> list[Copy]:
    """One copy per response block with a Bernoulli(t) mask (and its complement if coupled)."""
    prompt_len, total = len(rollout.prompt_ids), len(rollout.token_ids)
    t = float(torch.rand((), generator=gen)) * (1 - 1e-3) + 1e-3  # as the SFT objective: p in [eps, 1]
    copies = []
    for block in range(prompt_len // block_size, (prompt_len + total + block_size - 1) // block_size):
        masked = tuple(bool(torch.rand((), generator=gen) < t) for _ in range(block_size))
        copies.append(MaskCopy(block, masked))
        if coupled:
            copies.append(MaskCopy(block, tuple(not m for m in masked)))
    return copies


def _plan_copies(args: EstimatorArgs, copies: list[list[Copy]], weights, exact: bool) -> Plan:
    rollouts = args.rollouts
    pack = pack_traces([r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts],
                       [r.steps for r in rollouts], copies, args.block_size, args.mask_id, args.pad_id,
                       args.device)
    pack = _drop_unscored(pack, rollouts)
    weight = None
    if weights is not None:
        per_copy = [torch.tensor(w, dtype=torch.float32) for w in weights]
        flat = torch.stack([per_copy[s][c] for s, c in zip(pack.seq_index.tolist(), pack.copy_index.tolist())]) \
            if pack.seq_index.numel() else torch.zeros(0)
        weight = flat.to(args.device)
    return Plan(pack, weight, exact)


def _drop_unscored(pack: TracePack, rollouts: Sequence[Rollout]) -> TracePack:
    """Keep only scores of completion tokens (index < num_tokens)."""
    limits = torch.tensor([r.num_tokens for r in rollouts], device=pack.seq_index.device)
    keep = pack.token_index < limits[pack.seq_index]
    for name in ("score_index", "target_ids", "seq_index", "token_index", "copy_index"):
        setattr(pack, name, getattr(pack, name)[keep])
    return pack


def plan_estimator(name: str, args: EstimatorArgs) -> Plan:
    """Build the scoring plan of estimator ``name`` for ``args.rollouts``."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](args)


def _trace_copies(args: EstimatorArgs, merge: int) -> list[list[Copy]]:
    size = args.block_size
    return [[c for c in trace_copies(len(r.prompt_ids), r.steps, size, merge) if _scorable(r, c, size)]
            for r in args.rollouts]


def _trace(args: EstimatorArgs) -> Plan:
    return _plan_copies(args, _trace_copies(args, 1), None, exact=True)


def _trace_shrink(args: EstimatorArgs) -> Plan:
    return _plan_copies(args, _trace_copies(args, args.shrink), None, exact=args.shrink == 1)


def _trace_mc(args: EstimatorArgs) -> Plan:
    copies, weights = [], []
    for full in _trace_copies(args, 1):
        picked, w = _stratified(full, args.mc_steps, args.gen) if full else ([], [])
        copies.append(picked)
        weights.append(w)
    return _plan_copies(args, copies, weights, exact=True)


def _elbo(args: EstimatorArgs, coupled: bool = False) -> Plan:
    size = args.block_size
    copies = [[c for c in _random_mask_copies(r, size, args.gen, coupled) if _scorable(r, c, size)]
              for r in args.rollouts]
    return _plan_copies(args, copies, None, exact=False)


def _coupled(args: EstimatorArgs) -> Plan:
    return _elbo(args, coupled=True)


def _mean_field(args: EstimatorArgs) -> Plan:
    """prompt + all-[MASK] response as one block-causal stream; score every response position."""
    rollouts = args.rollouts
    width = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    ids = torch.full((len(rollouts), width), args.pad_id, dtype=torch.long)
    valid = torch.zeros((len(rollouts), width), dtype=torch.bool)
    scores = []
    for s, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.token_ids)
        ids[s, :p] = torch.tensor(r.prompt_ids)
        ids[s, p:p + n] = args.mask_id
        valid[s, :p + n] = True
        scores += [(s * width + p + i, r.token_ids[i], s, i, 0) for i in range(r.num_tokens)]
    pos = torch.arange(width).expand(len(rollouts), width)
    cols = torch.tensor(scores, dtype=torch.long).view(-1, 5).T
    device = args.device
    meta = TokenMeta.clean(pos, args.block_size, valid).to(device)
    pack = TracePack(ids.to(device), pos.to(device), meta, *(c.to(device) for c in cols))
    return Plan(pack, None, exact=False)


ESTIMATORS: dict[str, Callable[[EstimatorArgs], Plan]] = {
    "trace": _trace,
    "trace_shrink": _trace_shrink,
    "trace_mc": _trace_mc,
    "random_mask": _elbo,
    "coupled": _coupled,
    "mean_field": _mean_field,
}


def policy_logp_fn(policy: PolicyDist, mask_token_id: int):
    """logits (n, V) -> the sampler's policy log-probs (n, V), for the chunked head."""
    return functools.partial(policy_logprobs, temperature=policy.temperature, top_k=policy.top_k,
                             top_p=policy.top_p, mask_token_id=mask_token_id)


def score_plan(model, plan: Plan, policy: PolicyDist, with_entropy: bool = False):
    """Policy log-probs of the plan's scored tokens: (N,) [and their entropies (N,), detached].

    ``policy``: the rollouts' distribution (any :class:`~dirl.rollout.SamplingSpec` is one).
    The LM head runs chunked (:func:`dirl.model.lm_head.head_logprobs`): no (N, V) tensor."""
    pack = plan.pack
    if pack.score_index.numel() == 0:
        empty = torch.zeros(0, device=pack.input_ids.device)
        return (empty, empty) if with_entropy else empty
    hidden = model(pack.input_ids, pack.position_ids, pack.meta, logits_index=pack.score_index,
                   return_hidden=True).hidden  # (N, d)
    return head_logprobs(model, hidden, pack.target_ids, policy_logp_fn(policy, model.config.mask_token_id),
                         with_entropy)
