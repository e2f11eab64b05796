"""trace_mc's step sampling (``algo.mc_sampling``): systematic draws, entropy weights, batch coverage.

Hand-built rollouts (prompt = one full block of 4, one generated block) make the
copies and their probabilities computable by hand; the gradient-level
unbiasedness of every mode is ``tests/test_algo.py::test_trace_mc_is_unbiased_for_trace``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dirl.algo.likelihood import EstimatorArgs, EstimatorOptions, plan_estimator, systematic_draws, van_der_corput
from dirl.rollout import Rollout
from dirl.train.rl.config import AlgoConfig

MASK, PAD = 3, 0


def _rollout(steps, entropies=None) -> Rollout:
    """Prompt [5, 6, 7, 8] (block 0), four generated tokens (block 1) committed at ``steps``."""
    n = len(steps)
    return Rollout([5, 6, 7, 8], list(range(20, 20 + n)), list(steps), [-1.0] * n, n, "length", max(steps) + 1,
                   entropies=list(entropies) if entropies is not None else [])


def _drawn(plan) -> list[list[tuple[int, float]]]:
    """Per rollout, its scored (token index, weight) pairs."""
    out: dict[int, list] = {}
    for s, t, w in zip(plan.pack.seq_index.tolist(), plan.pack.token_index.tolist(), plan.weight.tolist()):
        out.setdefault(s, []).append((t, w))
    return [sorted(out.get(s, [])) for s in range(max(out) + 1)]


def test_systematic_draws_by_hand():
    probs = torch.tensor([0.65, 0.25, 0.05, 0.05])  # cdf 0.65, 0.9, 0.95, 1
    assert systematic_draws(probs, 1, 0.7) == pytest.approx({1: 1 / 0.25})
    # points 0.25, 0.75 -> steps 0 and 1, weight 1 / (k p) each
    assert systematic_draws(probs, 2, 0.5) == pytest.approx({0: 1 / (2 * 0.65), 1: 1 / (2 * 0.25)})
    # points 0.05, 0.55 both land on step 0: one step, the two weights summed
    assert systematic_draws(probs, 2, 0.1) == pytest.approx({0: 2 / (2 * 0.65)})
    assert [van_der_corput(n) for n in range(5)] == [0, 0.5, 0.25, 0.75, 0.125]


@pytest.mark.parametrize("probs,k", [([0.65, 0.25, 0.05, 0.05], 3), ([0.2] * 5, 2), ([0.1, 0.6, 0.3], 1)])
def test_systematic_draws_weigh_every_step_one_in_expectation(probs, k):
    """E over the offset of each step's weight = 1 (unbiased), by the midpoint rule on M offsets.

    The weight of a step is piecewise constant in the offset, with at most 2k jumps of at
    most 1 / (k p_min) each, so the midpoint rule is off by at most 2 / (p_min M)."""
    probs, num_offsets = torch.tensor(probs), 4000
    total = torch.zeros(len(probs), dtype=torch.float64)
    for i in range(num_offsets):
        for step, weight in systematic_draws(probs, k, (i + 0.5) / num_offsets).items():
            total[step] += weight
    bound = 2 / (float(probs.min()) * num_offsets)
    assert (total / num_offsets - 1).abs().max() <= bound


def test_entropy_weights_are_one_over_k_p():
    """Steps [0, 1, 1, 2] commit tokens {0}, {1, 2}, {3}; entropies 3, 0.5 + 0.5, 0 -> H = [3, 1, 0].
    floor 0.25: p = 0.75 * H / 4 + 0.25 / 3 = [0.6458, 0.2708, 0.0833]; k = 1 -> weight 1 / p."""
    rollout = _rollout([0, 1, 1, 2], [3.0, 0.5, 0.5, 0.0])
    p = [0.75 * 3 / 4 + 0.25 / 3, 0.75 * 1 / 4 + 0.25 / 3, 0.25 / 3]
    step_of = [0, 1, 1, 2]
    args = EstimatorArgs([rollout], 4, MASK, PAD, torch.Generator().manual_seed(0),
                         options=EstimatorOptions(mc_steps=1, mc_sampling="entropy", mc_floor=0.25))
    counts = [0, 0, 0]
    for _ in range(300):
        (drawn,) = _drawn(plan_estimator("trace_mc", args))
        steps = {step_of[t] for t, _ in drawn}
        assert len(steps) == 1 and [t for t, _ in drawn] == [t for t in range(4) if step_of[t] in steps]
        step = steps.pop()
        assert all(w == pytest.approx(1 / p[step]) for _, w in drawn)
        counts[step] += 1
    assert counts[0] > counts[1] > counts[2] > 0  # drawn by entropy, the zero-entropy step still reachable


def test_draws_cover_the_steps_evenly_across_the_batch():
    """Four (eight) identical 4-step responses, one draw each: the shared offset rotated by
    van der Corput puts the points on an even grid, so each step is drawn once (twice)."""
    for num in (4, 8):
        rollouts = [_rollout([0, 1, 2, 3], [1.0] * 4)] * num
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            plan = plan_estimator("trace_mc", EstimatorArgs(rollouts, 4, MASK, PAD, gen, options=EstimatorOptions(
                mc_steps=1, mc_sampling="uniform")))
            drawn = _drawn(plan)
            assert sorted(t for (t, w), in drawn) == sorted(list(range(4)) * (num // 4))
            assert all(w == 4.0 for (t, w), in drawn)  # T / k


def test_options_reach_the_estimator_and_bad_values_are_named():
    arch = SimpleNamespace(block_size=4, mask_token_id=MASK, pad_token_id=PAD, logit_shift=0, attention="block_causal")
    tiny_model = SimpleNamespace(arch=arch,
                                 parameters=lambda: iter([torch.zeros(1)]))
    algo = AlgoConfig(estimator="trace_mc", mc_steps=3, mc_sampling="entropy", mc_floor=0.5)
    args = EstimatorArgs.for_model(tiny_model, [], torch.Generator(), algo)
    opts = args.options
    assert (opts.mc_steps, opts.mc_sampling, opts.mc_floor, opts.shrink) == (3, "entropy", 0.5, 2)
    assert (args.block_size, args.mask_id, args.pad_id, args.logit_shift) == (4, MASK, PAD, 0)
    assert EstimatorArgs.for_model(tiny_model, [], torch.Generator()).options.mc_sampling == "stratified"
    rollouts = [_rollout([0, 1, 2, 3])]
    with pytest.raises(ValueError, match="unknown mc_sampling 'sobol'"):
        plan_estimator("trace_mc", EstimatorArgs(rollouts, 4, MASK, PAD, options=EstimatorOptions(mc_sampling="sobol")))
    with pytest.raises(ValueError, match="Rollout.entropies"):  # a rollout that did not record them
        plan_estimator("trace_mc", EstimatorArgs(rollouts, 4, MASK, PAD, options=EstimatorOptions(mc_sampling="entropy")))
    with pytest.raises(ValueError, match="mc_sampling must be one of"):
        AlgoConfig(mc_sampling="sobol")
