"""DiPO math: advantages, the clipped/KL loss and its aggregations, and the estimators.

Loss values are computed by hand in the comments; the estimator tests are
equality oracles (packed trace = per-step loop; shrink(1) = trace; MC -> trace).
"""

from __future__ import annotations

import math

import pytest
import torch

from dirl.algo.advantages import group_advantages, informative_groups
from dirl.algo.likelihood import EstimatorArgs, EstimatorOptions, plan_estimator, score_plan
from dirl.algo.losses import LossConfig, ScoredTokens, aggregate, dipo_loss
from dirl.engine.engine import Engine
from dirl.rollout import PolicyDist, SamplingParams
from dirl.model.masks import TokenMeta
from dirl.model.policy import policy_logprobs

# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize("mode", ["zscore", "mean", "loo"])
def test_advantages_sum_to_zero_per_group(mode):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.9, 0.1])
    adv = group_advantages(rewards, 4, mode).view(2, 4)
    assert torch.allclose(adv.sum(1), torch.zeros(2), atol=1e-6)
    assert adv[0, 0] > 0 > adv[0, 1]


def test_zscore_uses_population_std():
    # group [1, 0]: mean 0.5, population std 0.5 -> advantages +-1 (sample std would give +-0.707)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, "zscore")
    assert torch.allclose(adv, torch.tensor([1.0, -1.0]), atol=1e-5)
    # leave-one-out: r_i - mean of the others = 1 - 0 = 1
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0.0]), 2, "loo"), torch.tensor([1.0, -1.0]))


def test_equal_rewards_give_zero_advantage_and_are_uninformative():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert informative_groups(rewards, 3).tolist() == [False, True]


# ------------------------------------------------------------------ loss

def _loss(new, old, adv, seq, num_seqs, beta=0.0, agg="token_mean", constant=None, **kw):
    tokens = ScoredTokens(torch.tensor(new), torch.tensor(old), torch.tensor(adv), torch.tensor(seq), num_seqs, **kw)
    return dipo_loss(tokens, LossConfig(beta=beta, agg=agg), constant=constant)


def test_unclipped_loss_is_minus_ratio_times_advantage():
    # ratio = exp(0.1) = 1.10517 (inside [0.8, 1.28]); A = 2 -> loss = -2.21034
    loss, stats = _loss([0.1], [0.0], [2.0], [0], 1)
    assert loss.item() == pytest.approx(-2 * math.exp(0.1), rel=1e-6)
    assert stats.clipped_high_frac == 0 and stats.clipped_low_frac == 0


def test_clipping_on_both_sides():
    # A > 0, ratio = e^0.5 = 1.6487 > 1.28 -> clipped surrogate 1.28 * 1 -> loss -1.28
    loss, stats = _loss([0.5], [0.0], [1.0], [0], 1)
    assert loss.item() == pytest.approx(-1.28, rel=1e-6)
    assert stats.clipped_high_frac == 1.0
    # A < 0, ratio = e^-0.5 = 0.6065 < 0.8 -> min(0.6065 * -1, 0.8 * -1) = -0.8 -> loss 0.8
    loss, stats = _loss([-0.5], [0.0], [-1.0], [0], 1)
    assert loss.item() == pytest.approx(0.8, rel=1e-6)
    assert stats.clipped_low_frac == 1.0
    # A < 0 and ratio above the range: not clipped (pessimistic bound) -> loss = ratio = 1.6487
    loss, _ = _loss([0.5], [0.0], [-1.0], [0], 1)
    assert loss.item() == pytest.approx(math.exp(0.5), rel=1e-6)


def test_k3_kl_term():
    # new = old = 0 (ratio 1, A = 0); ref - new = -0.2 -> k3 = e^-0.2 + 0.2 - 1 = 0.0187308
    loss, stats = _loss([0.0], [0.0], [0.0], [0], 1, logp_ref=torch.tensor([-0.2]), beta=0.5)
    k3 = math.exp(-0.2) + 0.2 - 1
    assert stats.kl == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * k3, rel=1e-5)


def test_aggregation_modes_by_hand():
    # sequence 0 has token losses [1, 2, 3], sequence 1 has [6]
    token_loss = torch.tensor([1.0, 2.0, 3.0, 6.0])
    seq = torch.tensor([0, 0, 0, 1])
    assert aggregate(token_loss, seq, 2, "token_mean").item() == pytest.approx(12 / 4)
    # With the completion lengths (an estimator that scored 4 of 3 + 5 tokens): / 8, not / 4.
    lengths = torch.tensor([3, 5])
    assert aggregate(token_loss, seq, 2, "token_mean", seq_lengths=lengths).item() == pytest.approx(12 / 8)
    assert aggregate(token_loss, seq, 2, "seq_mean_token_mean").item() == pytest.approx((2 + 6) / 2)
    assert aggregate(token_loss, seq, 2, "constant", constant=10).item() == pytest.approx(12 / 20)
    with pytest.raises(ValueError):
        aggregate(token_loss, seq, 2, "constant")
    with pytest.raises(ValueError):
        aggregate(token_loss, seq, 2, "nope")


def test_importance_weights_scale_token_losses():
    loss, _ = _loss([0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0, 0], 1, weight=torch.tensor([3.0, 1.0]),
                    agg="constant", constant=1.0)
    assert loss.item() == pytest.approx(-4.0)


def test_equal_rewards_give_zero_gradient(tiny_model):
    rollouts = _rollouts(tiny_model, [[5, 6, 7]], n=4)
    adv = group_advantages(torch.ones(4), 4)
    plan = plan_estimator("trace", EstimatorArgs(rollouts, 4, tiny_model.config.mask_token_id, 0))
    logp = score_plan(tiny_model, plan, PolicyDist())
    loss, _ = dipo_loss(ScoredTokens(logp, logp.detach(), adv[plan.pack.seq_index], plan.pack.seq_index, 4),
                        LossConfig())
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in tiny_model.parameters())


# ------------------------------------------------------------------ estimators

def _rollouts(model, prompts, n=2, temperature=1.0, **kw):
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 14), temperature=temperature, n=n,
                            threshold=kw.pop("threshold", 0.03), seed=kw.pop("seed", 1), **kw)
    return Engine(model).generate(prompts, params)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [18]]  # lengths 4, 3, 6, 1


def _per_step_loop_logps(model, rollout, block_size, mask_id, dist):
    """One forward per denoising state: clean prefix blocks + the block as it was before the step."""
    prompt, tokens, steps = rollout.prompt_ids, rollout.token_ids, rollout.steps
    seq = prompt + tokens
    out = {}
    for i in range(rollout.num_tokens):
        pos_i = len(prompt) + i
        block = pos_i // block_size
        start = block * block_size
        state = [mask_id if (p >= len(prompt) and steps[p - len(prompt)] >= steps[i]) else seq[p]
                 for p in range(start, start + block_size)]
        ids = torch.tensor([seq[:start] + state])
        pos = torch.arange(start + block_size)[None]
        meta = TokenMeta.clean(pos[:, :start], block_size).cat(
            TokenMeta.noisy_copy(pos[:, start:], block_size, torch.zeros(1, block_size, dtype=torch.long)))
        logits = model(ids, pos, meta).logits[0, pos_i]
        out[i] = policy_logprobs(logits, dist.temperature, dist.top_k, dist.top_p, mask_id)[tokens[i]].item()
    return out


def test_packed_trace_equals_per_step_loop(tiny_model):
    dist = PolicyDist(temperature=0.9, top_k=30)
    rollouts = _rollouts(tiny_model, PROMPTS, temperature=0.9, top_k=30)
    cfg = tiny_model.config
    plan = plan_estimator("trace", EstimatorArgs(rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id))
    with torch.no_grad():
        packed = score_plan(tiny_model, plan, dist)
        for s, rollout in enumerate(rollouts):
            loop = _per_step_loop_logps(tiny_model, rollout, cfg.block_size, cfg.mask_token_id, dist)
            mine = {t: packed[j].item() for j, (ss, t) in
                    enumerate(zip(plan.pack.seq_index.tolist(), plan.pack.token_index.tolist())) if ss == s}
            assert sorted(mine) == list(range(rollout.num_tokens))
            assert max(abs(mine[t] - loop[t]) for t in loop) <= 1e-5


def test_first_iteration_ratio_is_one(tiny_model):
    """Trainer and engine agree: logp_new == the engine's logp_old for every token, and the
    entropy the engine records (trace_mc's entropy sampling) == the trainer's recomputed one."""
    rollouts = _rollouts(tiny_model, PROMPTS, temperature=0.7, top_p=0.9, n=3)
    cfg = tiny_model.config
    plan = plan_estimator("trace", EstimatorArgs(rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id))
    with torch.no_grad():
        new, entropy = score_plan(tiny_model, plan, PolicyDist(0.7, 0, 0.9), with_entropy=True)
    index = list(zip(plan.pack.seq_index.tolist(), plan.pack.token_index.tolist()))
    old = torch.tensor([rollouts[s].logps[t] for s, t in index])
    assert new.numel() == sum(r.num_tokens for r in rollouts)
    assert torch.exp(new - old).sub(1).abs().max() <= 1e-4
    assert all(len(r.entropies) == len(r.token_ids) for r in rollouts)
    recorded = torch.tensor([rollouts[s].entropies[t] for s, t in index])
    assert recorded.min() > 0.01  # top-p 0.9 of a tiny untrained model: far from one-hot
    torch.testing.assert_close(recorded, entropy, atol=1e-4, rtol=0)


def test_trace_shrink_one_equals_trace(tiny_model):
    rollouts = _rollouts(tiny_model, PROMPTS)
    cfg = tiny_model.config
    args = (rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id)
    exact = plan_estimator("trace", EstimatorArgs(*args))
    shrink = plan_estimator("trace_shrink", EstimatorArgs(*args, options=EstimatorOptions(shrink=1)))
    with torch.no_grad():
        assert torch.equal(score_plan(tiny_model, exact, PolicyDist()), score_plan(tiny_model, shrink, PolicyDist()))
    # merging steps really changes the states (fewer copies, a biased estimate)
    merged = plan_estimator("trace_shrink", EstimatorArgs(*args, options=EstimatorOptions(shrink=2)))
    assert merged.pack.input_ids.shape[1] < exact.pack.input_ids.shape[1]


def _grad_of_sum(model, plan):
    model.zero_grad()
    logp = score_plan(model, plan, PolicyDist())
    weight = plan.weight if plan.weight is not None else torch.ones_like(logp)
    (logp * weight).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mc_sampling", ["stratified", "uniform", "entropy"])
def test_trace_mc_is_unbiased_for_trace(tiny_model, mc_sampling):
    """Averaged over many draws, the MC gradient converges to the exact one, in every mode.

    Tolerance: the mean of M = 100 draws must lie within 4 standard errors
    (sqrt(E||g_i - mean||^2 / M)) of the exact trace gradient, and that bound must
    be much tighter than a single draw's error, so a biased estimator fails it.
    A sharper LM head makes the per-step entropies (and the tokens per step) differ, so
    ``entropy`` really samples non-uniformly (the untrained head's are all ~log V).
    """
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(20.0)
    rollouts = _rollouts(tiny_model, PROMPTS[:2], n=2, max_new_tokens=8)
    cfg = tiny_model.config
    args = (rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id)
    # The gradient w.r.t. the last layer's MLP and the LM head: a real gradient of the
    # objective, at a fraction of the cost of a full backward per draw.
    for name, param in tiny_model.named_parameters():
        param.requires_grad_(name.startswith(("lm_head", "model.norm", "model.layers.1.mlp")))
    exact = _grad_of_sum(tiny_model, plan_estimator("trace", EstimatorArgs(*args)))
    gen = torch.Generator().manual_seed(0)
    mc = EstimatorArgs(*args, gen=gen, options=EstimatorOptions(mc_steps=2, mc_sampling=mc_sampling))
    draws = torch.stack([_grad_of_sum(tiny_model, plan_estimator("trace_mc", mc)) for _ in range(100)])
    mean = draws.mean(0)
    std_error = ((draws - mean).pow(2).sum(1).mean() / len(draws)).sqrt()
    single_error = (draws[0] - exact).norm()
    assert single_error > 5 * std_error, "the test must be able to tell one draw from the mean"
    assert (mean - exact).norm() < 4 * std_error


def test_elbo_estimators_score_completion_tokens(tiny_model):
    rollouts = _rollouts(tiny_model, PROMPTS)
    cfg = tiny_model.config
    args = (rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id)
    total = sum(r.num_tokens for r in rollouts)
    coupled = plan_estimator("coupled", EstimatorArgs(*args))
    # complementary masks: every completion token scored exactly once
    pairs = sorted(zip(coupled.pack.seq_index.tolist(), coupled.pack.token_index.tolist()))
    assert len(pairs) == total and len(set(pairs)) == total
    mean_field = plan_estimator("mean_field", EstimatorArgs(*args))
    assert mean_field.pack.score_index.numel() == total
    # mean field hides the whole response: every response token in the input is [MASK]
    for s, r in enumerate(rollouts):
        p = len(r.prompt_ids)
        assert (mean_field.pack.input_ids[s, p:p + len(r.token_ids)] == cfg.mask_token_id).all()
    random_mask = plan_estimator("random_mask", EstimatorArgs(*args))
    assert 0 < random_mask.pack.score_index.numel() <= total
    assert not random_mask.exact and plan_estimator("trace_mc", EstimatorArgs(*args)).exact
    with pytest.raises(ValueError, match="unknown estimator"):
        plan_estimator("nope", EstimatorArgs(*args))
