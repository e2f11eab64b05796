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
| ``trace_mc``   | k steps per response, drawn by ``mc_sampling`` and importance-weighted (AGRPO, Zhan et al. 2025) | in expectation |
| ``random_mask``| one random mask per block, ratio t ~ U(0,1) (ELBO surrogate, diffu-GRPO style) | no |
| ``coupled``    | two complementary random masks per block; every token scored once | no |
| ``mean_field`` | the whole response masked, one step (d1, Zhao et al. 2025) | no |

``trace_mc``'s draws (``mc_sampling``), each unbiased for ``trace``:

* ``stratified`` (default): the response's T steps cut into k contiguous strata, one step
  drawn uniformly from each, weight = stratum size.
* ``uniform``: k points (j + o) / k of [0, 1) mapped to steps through the uniform CDF --
  systematic sampling, so k <= T distinct steps (without replacement), weight T / k.
* ``entropy``: the same points through the CDF of p(step) = (1 - f) H_step / sum H + f / T,
  H_step the summed rollout entropy of the tokens that step commits (``Rollout.entropies``)
  and f = ``mc_floor``, AGRPO's floor that keeps every step reachable; weight 1 / (k p) =
  (T / k) (1/T) / p, the uniform weight times AGRPO's importance ratio. A step hit twice is
  scored once with the summed weight.

Each point is marginally U(0, 1) whatever the offset's place in the batch, which is all the
unbiasedness needs. The offsets are low-discrepancy across the responses of a plan (AGRPO's
low-discrepancy draws): response s gets o_s = frac(u + vdc(s)), one shared u ~ U(0, 1) and
vdc the base-2 van der Corput sequence, so any 2^m aligned consecutive responses (a prompt's
group) -- and the whole batch when its size is one -- cover [0, 1) on an even grid.
AGRPO draws timesteps of a continuous-time sampler; here the "steps" are the trace's
denoising steps (one copy per block and forward), its departure.

``exact`` estimators score the sampler's own states, so the engine's recorded
log-probs are their ``logp_old``; the others recompute ``logp_old`` on their plan.
Only tokens of the completion (up to the stop token) are scored; later tokens of
the final block stay in the states as context.

Full-attention models (LLaDA, Dream: ``arch.attention == "bidirectional"``) use the same
estimators over their own layout (:mod:`dirl.model.layout.bidirectional`): a state is the whole
prompt + response sequence, so a trace has one state per distinct denoising step (not per block),
``random_mask`` / ``coupled`` draw one mask over the whole response, and ``mean_field`` also
masks the prompt i.i.d. at p = 0.3 (d1). A sequence's states share a row as separate segments.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from dirl.model.forward import Readout
from dirl.model.layout import bidirectional, readout_rows
from dirl.model.lm_head import head_logprobs
from dirl.model.masks import TokenMeta
from dirl.model.policy import policy_logprobs
from dirl.model.trace import Copy, MaskCopy, Trace, TracePack, pack_traces, trace_copies
from dirl.rollout import PolicyDist, Rollout

__all__ = ["ESTIMATORS", "MC_SAMPLING", "EstimatorArgs", "EstimatorOptions", "Plan", "plan_estimator", "score_plan"]


@dataclass
class Plan:
    pack: TracePack
    weight: torch.Tensor | None   # (N,) importance weights, None = all ones
    exact: bool                   # scores the sampler's states: engine logps are logp_old


def _default_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


MC_SAMPLING = ("stratified", "uniform", "entropy")


@dataclass
class EstimatorOptions:
    """The estimators' user settings, declared once: ``AlgoConfig`` extends this (YAML keys
    ``algo.shrink`` ...) and :class:`EstimatorArgs` carries it as ``options``."""

    shrink: int = 2               # trace_shrink: denoising steps merged per copy
    mc_steps: int = 2             # trace_mc: copies drawn per response
    mc_sampling: str = "stratified"  # trace_mc: stratified | uniform | entropy (module docstring)
    mc_floor: float = 0.1         # trace_mc entropy: the probability mass spread uniformly, in (0, 1]


@dataclass
class EstimatorArgs:
    """The one argument of every estimator: the rollouts, the model's special ids, the options."""

    rollouts: Sequence[Rollout]
    block_size: int
    mask_id: int
    pad_id: int
    gen: torch.Generator = field(default_factory=_default_generator)  # the random estimators' draws
    device: torch.device | str = "cpu"
    logit_shift: int = 0          # the model's (Arch.logit_shift): where a scored token's logits are
    attention: str = "block_causal"   # the model's Arch.attention: which layout packs the states
    options: EstimatorOptions = field(default_factory=EstimatorOptions)

    @classmethod
    def for_model(cls, model, rollouts: Sequence[Rollout], gen: torch.Generator,
                  options: EstimatorOptions | None = None) -> EstimatorArgs:
        """``options``: e.g. the RL ``AlgoConfig`` (an ``EstimatorOptions``); None = the defaults."""
        arch = model.arch
        return cls(rollouts, arch.block_size, arch.mask_token_id, arch.pad_token_id, gen,
                   next(model.parameters()).device, arch.logit_shift, arch.attention, options or EstimatorOptions())

    @property
    def bidirectional(self) -> bool:
        return self.attention == "bidirectional"


def _scored_tokens(rollout: Rollout, copy: Copy, block_size: int) -> list[int]:
    """The completion tokens (indices into ``token_ids``) the copy scores (``block_size`` 0: a
    bidirectional state, which spans the whole response)."""
    if block_size == 0:
        return [i for i in range(rollout.num_tokens) if copy.scores(i, rollout.steps[i])]
    first = copy.block * block_size - len(rollout.prompt_ids)
    return [first + offset for offset in range(block_size)
            if 0 <= first + offset < rollout.num_tokens and copy.scores(offset, rollout.steps[first + offset])]


def _scorable(rollout: Rollout, copy: Copy, block_size: int) -> bool:
    """Does the copy score at least one completion token?"""
    return bool(_scored_tokens(rollout, copy, block_size))


def _stratified(copies: list[Copy], k: int, gen: torch.Generator) -> tuple[list[Copy], list[float]]:
    """One copy drawn uniformly from each of k contiguous strata; weight = stratum size."""
    k = min(k, len(copies))
    bounds = [round(j * len(copies) / k) for j in range(k + 1)]
    picked, weights = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        picked.append(copies[lo + int(torch.randint(hi - lo, (1,), generator=gen))])
        weights.append(float(hi - lo))
    return picked, weights


def van_der_corput(n: int) -> float:
    """The n-th point of the base-2 van der Corput sequence (bits of n mirrored after the point)."""
    out, scale = 0.0, 0.5
    while n:
        out += scale * (n & 1)
        n, scale = n >> 1, scale / 2
    return out


def systematic_draws(probs: torch.Tensor, k: int, offset: float) -> dict[int, float]:
    """k systematic draws from ``probs`` (T,): the points (j + offset) / k, j < k, through the
    inverse CDF. -> {step: weight}, weight 1 / (k p) per hit, summed over repeated hits.

    With offset ~ U(0, 1) each point is marginally U(0, 1), each draw marginally ~ probs, so
    sum(weight * f(step)) is unbiased for sum(f) (the draws are negatively correlated: that
    is the variance they save over independent ones)."""
    probs = probs.double()
    cdf = probs.cumsum(0)  # (T,)
    points = (torch.arange(k, dtype=torch.float64) + offset) / k * cdf[-1]  # (k,)
    steps = torch.searchsorted(cdf, points, right=True).clamp_max(len(probs) - 1)  # (k,)
    out: dict[int, float] = {}
    for step in steps.tolist():
        out[step] = out.get(step, 0.0) + float(1.0 / (k * probs[step]))
    return out


def _step_probs(args: EstimatorArgs, rollout: Rollout, copies: list[Copy]) -> torch.Tensor:
    """p(step) (T,) of ``mc_sampling``: uniform, or entropy-proportional mixed with uniform."""
    uniform = torch.full((len(copies),), 1.0 / len(copies), dtype=torch.float64)
    if args.options.mc_sampling == "uniform":
        return uniform
    if len(rollout.entropies) < rollout.num_tokens:
        raise ValueError("mc_sampling='entropy' needs the rollouts' per-token entropies (Rollout.entropies): "
                         "decode with dirl's engine or a `dirl serve` that returns them")
    entropy = torch.tensor([sum(rollout.entropies[i] for i in _scored_tokens(rollout, c, _span(args)))
                            for c in copies], dtype=torch.float64).clamp_min(0)  # (T,)
    if entropy.sum() <= 0:  # greedy-like rollouts: no entropy anywhere, sample uniformly
        return uniform
    return (1 - args.options.mc_floor) * entropy / entropy.sum() + args.options.mc_floor * uniform


def _importance_draws(args: EstimatorArgs, full: list[list[Copy]]) -> tuple[list[list[Copy]], list[list[float]]]:
    """``uniform`` / ``entropy``: systematic draws per response, offsets low-discrepancy across them."""
    shared = float(torch.rand((), generator=args.gen))
    copies, weights = [], []
    for s, (rollout, options) in enumerate(zip(args.rollouts, full)):
        drawn = {}
        if options:
            k = min(args.options.mc_steps, len(options))
            drawn = systematic_draws(_step_probs(args, rollout, options), k, (shared + van_der_corput(s)) % 1.0)
        copies.append([options[step] for step in sorted(drawn)])
        weights.append([drawn[step] for step in sorted(drawn)])
    return copies, weights


def _random_mask_copies(rollout: Rollout, block_size: int, gen: torch.Generator, coupled: bool) -> list[Copy]:
    """One copy per response block with a Bernoulli(t) mask (and its complement if coupled);
    ``block_size`` 0 (bidirectional): one copy masking over the whole response."""
    prompt_len, total = len(rollout.prompt_ids), len(rollout.token_ids)
    t = float(torch.rand((), generator=gen)) * (1 - 1e-3) + 1e-3  # as the SFT objective: p in [eps, 1]
    if block_size == 0:
        masked = tuple(bool(m) for m in (torch.rand(total, generator=gen) < t).tolist())
        return [MaskCopy(0, masked)] + ([MaskCopy(0, tuple(not m for m in masked))] if coupled else [])
    copies = []
    for block in range(prompt_len // block_size, (prompt_len + total + block_size - 1) // block_size):
        masked = tuple(bool(torch.rand((), generator=gen) < t) for _ in range(block_size))
        copies.append(MaskCopy(block, masked))
        if coupled:
            copies.append(MaskCopy(block, tuple(not m for m in masked)))
    return copies


def _plan_copies(args: EstimatorArgs, copies: list[list[Copy]], weights, exact: bool) -> Plan:
    rollouts = args.rollouts
    if args.bidirectional:
        pack = bidirectional.pack_states(rollouts, copies, args.mask_id, args.pad_id, args.logit_shift, args.device)
    else:
        pack = pack_traces(rollouts, copies, args.block_size, args.mask_id, args.pad_id, args.device,
                           args.logit_shift)
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


def _span(args: EstimatorArgs) -> int:
    """The tokens a state covers, as ``_scored_tokens`` reads it: a block, or 0 = the whole response."""
    return 0 if args.bidirectional else args.block_size


def _trace_copies(args: EstimatorArgs, merge: int) -> list[list[Copy]]:
    size = _span(args)
    if args.bidirectional:
        return [[c for c in bidirectional.state_copies(r.steps, merge) if _scorable(r, c, 0)] for r in args.rollouts]
    return [[c for c in trace_copies(len(r.prompt_ids), r.steps, size, merge) if _scorable(r, c, size)]
            for r in args.rollouts]


def _trace(args: EstimatorArgs) -> Plan:
    return _plan_copies(args, _trace_copies(args, 1), None, exact=True)


def _trace_shrink(args: EstimatorArgs) -> Plan:
    return _plan_copies(args, _trace_copies(args, args.options.shrink), None, exact=args.options.shrink == 1)


def _trace_mc(args: EstimatorArgs) -> Plan:
    if args.options.mc_sampling not in MC_SAMPLING:
        raise ValueError(f"unknown mc_sampling {args.options.mc_sampling!r}; choose from {list(MC_SAMPLING)}")
    if not 0 < args.options.mc_floor <= 1:  # a zero floor leaves zero-entropy steps undrawable: biased
        raise ValueError(f"mc_floor must be in (0, 1], got {args.options.mc_floor!r}")
    full = _trace_copies(args, 1)
    if args.options.mc_sampling != "stratified":
        return _plan_copies(args, *_importance_draws(args, full), exact=True)
    copies, weights = [], []
    for options in full:
        picked, w = _stratified(options, args.options.mc_steps, args.gen) if options else ([], [])
        copies.append(picked)
        weights.append(w)
    return _plan_copies(args, copies, weights, exact=True)


def _elbo(args: EstimatorArgs, coupled: bool = False) -> Plan:
    size = _span(args)
    copies = [[c for c in _random_mask_copies(r, size, args.gen, coupled) if _scorable(r, c, size)]
              for r in args.rollouts]
    return _plan_copies(args, copies, None, exact=False)


def _coupled(args: EstimatorArgs) -> Plan:
    return _elbo(args, coupled=True)


def _mean_field(args: EstimatorArgs) -> Plan:
    """prompt + all-[MASK] response as one block-causal stream; score every response position."""
    if args.bidirectional:
        return _mean_field_bidirectional(args)
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
    cols[0] = readout_rows(cols[0], args.logit_shift)
    device = args.device
    meta = TokenMeta.clean(pos, args.block_size, valid).to(device)
    pack = TracePack(ids.to(device), pos.to(device), meta, *(c.to(device) for c in cols))
    return Plan(pack, None, exact=False)


MEAN_FIELD_PROMPT_MASK = 0.3  # d1's prompt masking probability (full attention)


def _mean_field_bidirectional(args: EstimatorArgs) -> Plan:
    """d1 (Zhao et al. 2025): the whole response masked, the prompt masked i.i.d. at p = 0.3 (drawn
    once per plan, so the policy, old and reference scores share it); one state per sequence."""
    copies, traces = [], []
    for r in args.rollouts:
        keep = (torch.rand(len(r.prompt_ids), generator=args.gen) >= MEAN_FIELD_PROMPT_MASK).tolist()
        prompt = [t if k else args.mask_id for t, k in zip(r.prompt_ids, keep)]
        traces.append(Trace(prompt, r.token_ids, r.steps))
        copies.append([MaskCopy(0, (True,) * len(r.token_ids))])
    pack = bidirectional.pack_states(traces, copies, args.mask_id, args.pad_id, args.logit_shift, args.device)
    return Plan(_drop_unscored(pack, args.rollouts), None, exact=False)


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
    hidden = model(pack.input_ids, pack.position_ids, pack.meta,
                   readout=Readout(pack.score_index, hidden=True)).hidden  # (N, d)
    return head_logprobs(model, hidden, pack.target_ids, policy_logp_fn(policy, model.arch.mask_token_id),
                         with_entropy)
