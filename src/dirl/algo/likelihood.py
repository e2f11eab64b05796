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

from dataclasses import dataclass
from typing import Callable

import torch

from dirl.model.masks import TokenMeta
from dirl.model.policy import policy_logprobs
from dirl.model.trace import Copy, TracePack, pack_traces, trace_copies


@dataclass
class Plan:
    pack: TracePack
    weight: torch.Tensor | None   # (N,) importance weights, None = all ones
    exact: bool                   # scores the sampler's states: engine logps are logp_old


@dataclass
class PolicyDist:
    """The sampling distribution used by the rollouts (DESIGN §5)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def _scorable(rollout, copy: Copy, block_size: int) -> bool:
    """Does the copy score at least one completion token?"""
    prompt_len = len(rollout.prompt_ids)
    for offset in range(block_size):
        i = copy.block * block_size + offset - prompt_len
        if 0 <= i < rollout.num_tokens:
            if copy.scored is not None and copy.scored[offset]:
                return True
            if copy.scored is None and copy.lo <= rollout.steps[i] < copy.hi:
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


def _random_mask_copies(rollout, block_size: int, gen: torch.Generator, coupled: bool) -> list[Copy]:
    """One copy per response block with a Bernoulli(t) mask (and its complement if coupled)."""
    prompt_len, total = len(rollout.prompt_ids), len(rollout.token_ids)
    t = float(torch.rand((), generator=gen)) * (1 - 1e-3) + 1e-3  # as the SFT objective: p in [eps, 1]
    copies = []
    for block in range(prompt_len // block_size, (prompt_len + total + block_size - 1) // block_size):
        masked = tuple(bool(torch.rand((), generator=gen) < t) for _ in range(block_size))
        copies.append(Copy(block, masked=masked, scored=masked))
        if coupled:
            other = tuple(not m for m in masked)
            copies.append(Copy(block, masked=other, scored=other))
    return copies


def _plan_copies(rollouts, copies: list[list[Copy]], weights, block_size, mask_id, pad_id, device, exact) -> Plan:
    pack = pack_traces([r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts],
                       [r.steps for r in rollouts], copies, block_size, mask_id, pad_id, device)
    pack = _drop_unscored(pack, rollouts)
    weight = None
    if weights is not None:
        per_copy = [torch.tensor(w, dtype=torch.float32) for w in weights]
        flat = torch.stack([per_copy[s][c] for s, c in zip(pack.seq_index.tolist(), pack.copy_index.tolist())]) \
            if pack.seq_index.numel() else torch.zeros(0)
        weight = flat.to(device)
    return Plan(pack, weight, exact)


def _drop_unscored(pack: TracePack, rollouts):
    """Keep only scores of completion tokens (index < num_tokens)."""
    limits = torch.tensor([r.num_tokens for r in rollouts], device=pack.seq_index.device)
    keep = pack.token_index < limits[pack.seq_index]
    for name in ("score_index", "target_ids", "seq_index", "token_index", "copy_index"):
        setattr(pack, name, getattr(pack, name)[keep])
    return pack


def plan_estimator(name: str, rollouts, block_size: int, mask_id: int, pad_id: int,
                   gen: torch.Generator | None = None, shrink: int = 2, mc_steps: int = 2,
                   device: torch.device | str = "cpu") -> Plan:
    """Build the scoring plan of estimator ``name`` for a list of rollouts."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return ESTIMATORS[name](rollouts, block_size, mask_id, pad_id, gen, shrink, mc_steps, device)


def _trace(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device, merge=1) -> Plan:
    copies = [[c for c in trace_copies(len(r.prompt_ids), r.steps, size, merge) if _scorable(r, c, size)]
              for r in rollouts]
    return _plan_copies(rollouts, copies, None, size, mask_id, pad_id, device, exact=merge == 1)


def _trace_shrink(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device) -> Plan:
    return _trace(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device, merge=shrink)


def _trace_mc(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device) -> Plan:
    copies, weights = [], []
    for r in rollouts:
        full = [c for c in trace_copies(len(r.prompt_ids), r.steps, size) if _scorable(r, c, size)]
        picked, w = _stratified(full, mc_steps, gen) if full else ([], [])
        copies.append(picked)
        weights.append(w)
    return _plan_copies(rollouts, copies, weights, size, mask_id, pad_id, device, exact=True)


def _elbo(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device, coupled=False) -> Plan:
    copies = [[c for c in _random_mask_copies(r, size, gen, coupled) if _scorable(r, c, size)] for r in rollouts]
    return _plan_copies(rollouts, copies, None, size, mask_id, pad_id, device, exact=False)


def _coupled(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device) -> Plan:
    return _elbo(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device, coupled=True)


def _mean_field(rollouts, size, mask_id, pad_id, gen, shrink, mc_steps, device) -> Plan:
    """prompt + all-[MASK] response as one block-causal stream; score every response position."""
    width = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rollouts), width), dtype=torch.bool)
    scores = []
    for s, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.token_ids)
        ids[s, :p] = torch.tensor(r.prompt_ids)
        ids[s, p:p + n] = mask_id
        valid[s, :p + n] = True
        scores += [(s * width + p + i, r.token_ids[i], s, i, 0) for i in range(r.num_tokens)]
    pos = torch.arange(width).expand(len(rollouts), width)
    cols = torch.tensor(scores, dtype=torch.long).view(-1, 5).T
    meta = TokenMeta.clean(pos, size, valid).to(device)
    pack = TracePack(ids.to(device), pos.to(device), meta, *(c.to(device) for c in cols))
    return Plan(pack, None, exact=False)


ESTIMATORS: dict[str, Callable[..., Plan]] = {
    "trace": _trace,
    "trace_shrink": _trace_shrink,
    "trace_mc": _trace_mc,
    "random_mask": _elbo,
    "coupled": _coupled,
    "mean_field": _mean_field,
}


def score_plan(model, plan: Plan, dist: PolicyDist, with_entropy: bool = False):
    """Policy log-probs of the plan's scored tokens: (N,) [and their entropies (N,), detached]."""
    pack = plan.pack
    if pack.score_index.numel() == 0:
        empty = torch.zeros(0, device=pack.input_ids.device)
        return (empty, empty) if with_entropy else empty
    out = model(pack.input_ids, pack.position_ids, pack.meta, logits_index=pack.score_index)
    logp_all = policy_logprobs(out.logits, dist.temperature, dist.top_k, dist.top_p,
                               model.config.mask_token_id)  # (N, V)
    logp = logp_all.gather(-1, pack.target_ids[:, None]).squeeze(-1)
    if not with_entropy:
        return logp
    with torch.no_grad():
        probs = logp_all.exp()
        entropy = -(probs * logp_all.masked_fill(probs == 0, 0)).sum(-1)
    return logp, entropy
