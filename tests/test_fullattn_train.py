"""Full-attention training: LLaDA's SFT objective by hand (Dream shifted), and every estimator
through the one registry: trace = engine log-probs, packed states = one state per forward,
trace_mc unbiased for trace, the Dream shift at the first generated position."""

from __future__ import annotations

import math

import pytest
import torch

from dirl.algo.likelihood import EstimatorArgs, EstimatorOptions, plan_estimator, score_plan
from dirl.algo.nelbo import FixedNoise, TokenBatch, draw_noise, sft_nelbo
from dirl.engine.engine import Engine
from dirl.model.policy import policy_logprobs
from dirl.rollout import SamplingParams
from tests.fullattn_models import EOS_ID, MASK_ID, tiny_model

PROMPTS = [[5, 9, 12, 3, 7], [20, 4], [8, 8, 30, 2, 11, 6]]
SAMPLING = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=25, unmasking="low_confidence",
                          steps_per_block=3, block_length=4, stop_ids=[EOS_ID], n=2, seed=4)


def _ce(model, noisy, clean, position):
    """-log p(clean[position] | the noisy sample alone), read at the row the family reads it from."""
    logits = model(noisy[None], torch.arange(len(noisy))[None], None).logits[0]
    return -float(torch.log_softmax(logits[position - model.arch.logit_shift], -1)[clean[position]])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sft_loss_by_hand_on_two_rows(family):
    """Row 0: prompt [5, 9], response [12, 3, 1]; row 1: prompt [20], response [4, 7], one padding.
    t = (0.5, 0.9) -> p = 0.5005, 0.9001; uniforms pick the masked tokens. Loss = mean over the two
    samples of sum_masked CE / p / n_resp, each CE from the noisy sample alone (no padding)."""
    model = tiny_model(family, seed=5)
    ids = torch.tensor([[5, 9, 12, 3, 1], [20, 4, 7, 1, 1]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    doc = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, -1, -1]])
    sample = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, -1, -1]])
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]])
    batch = TokenBatch(ids, pos, doc, response, sample)
    uniform = torch.tensor([[0.9, 0.9, 0.2, 0.7, 0.1], [0.9, 0.95, 0.3, 0.0, 0.0]], dtype=torch.float64)
    noise = draw_noise(response, sample, fixed=FixedNoise(torch.tensor([0.5, 0.9], dtype=torch.float64), uniform))
    assert noise.masked[0].tolist() == [[False, False, True, False, True], [False, False, True, False, False]]
    with torch.no_grad():
        loss, stats = sft_nelbo(model, batch, noise, MASK_ID)
    noisy0, noisy1 = torch.tensor([5, 9, MASK_ID, 3, MASK_ID]), torch.tensor([20, 4, MASK_ID])
    clean0, clean1 = [5, 9, 12, 3, 1], [20, 4, 7]
    p0, p1 = (1 - 1e-3) * 0.5 + 1e-3, (1 - 1e-3) * 0.9 + 1e-3
    with torch.no_grad():
        row0 = (_ce(model, noisy0, clean0, 2) + _ce(model, noisy0, clean0, 4)) / p0 / 3
        row1 = _ce(model, noisy1, clean1, 2) / p1 / 2
    assert stats == {"num_masked": 3, "num_response": 5}
    assert float(loss) == pytest.approx((row0 + row1) / 2, abs=1e-5)
    assert math.isfinite(float(loss)) and float(loss) > 0


@pytest.fixture(scope="module", params=["llada", "dream"])
def rollout_setup(request):
    model = tiny_model(request.param, seed=6)
    rollouts = Engine(model).generate(PROMPTS, SAMPLING)
    return model, rollouts


def _plan(model, rollouts, name, seed=0, **options):
    args = EstimatorArgs.for_model(model, rollouts, torch.Generator().manual_seed(seed), EstimatorOptions(**options))
    return plan_estimator(name, args)


def test_trace_scores_every_completion_token_at_engine_logprob(rollout_setup):
    model, rollouts = rollout_setup
    plan = _plan(model, rollouts, "trace")
    with torch.no_grad():
        trainer = score_plan(model, plan, SAMPLING)
    engine = torch.tensor([rollouts[s].logps[i] for s, i in zip(plan.pack.seq_index.tolist(),
                                                                 plan.pack.token_index.tolist())])
    assert plan.exact and len(engine) == sum(r.num_tokens for r in rollouts)
    torch.testing.assert_close(trainer, engine, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["trace_shrink", "random_mask", "coupled", "mean_field"])
def test_packed_states_equal_one_state_per_forward(rollout_setup, name):
    """Scores of a plan whose states share rows as segments = each state forwarded alone."""
    model, rollouts = rollout_setup
    plan = _plan(model, rollouts, name, seed=1, shrink=2)
    pack = plan.pack
    with torch.no_grad():
        packed = score_plan(model, plan, SAMPLING)
        logits = model(pack.input_ids, pack.position_ids, pack.meta).logits  # (R, W, V)
    width, shift = pack.input_ids.shape[1], model.arch.logit_shift
    alone = []
    for at, target in zip(pack.score_index.tolist(), pack.target_ids.tolist()):
        row, col = divmod(at + shift, width)  # the scored token's own column
        copy = pack.meta.copy[row]
        seg = (copy == copy[col]).nonzero().squeeze(-1)  # the state's columns
        ids, pos = pack.input_ids[row, seg][None], pack.position_ids[row, seg][None]
        with torch.no_grad():
            state_logits = model(ids, pos, None).logits[0]
        logp = policy_logprobs(state_logits[col - int(seg[0]) - shift], SAMPLING.temperature, SAMPLING.top_k,
                               SAMPLING.top_p, MASK_ID)
        alone.append(float(logp[target]))
    assert len(alone) > 0 and logits.shape[0] == len(rollouts)
    torch.testing.assert_close(packed, torch.tensor(alone), atol=1e-4, rtol=0)


def test_trace_shrink_and_mean_field_shapes(rollout_setup):
    model, rollouts = rollout_setup
    full = _plan(model, rollouts, "trace").pack
    shrunk = _plan(model, rollouts, "trace_shrink", shrink=2).pack
    mean_field = _plan(model, rollouts, "mean_field").pack
    # every state of a row is the whole sequence: states per row = copies; shrink halves them (rounded up)
    for r, rollout in enumerate(rollouts):
        distinct = len(set(rollout.steps[: rollout.num_tokens]))
        n_full = int(full.meta.copy[r].max()) + 1
        n_shrunk = int(shrunk.meta.copy[r].max()) + 1
        assert n_full >= distinct and n_shrunk == -(-n_full // 2)
    assert int(mean_field.meta.copy.max()) == 0 and len(mean_field.target_ids) == sum(r.num_tokens for r in rollouts)
    prompt_masked = sum(int((mean_field.input_ids[r, :len(ro.prompt_ids)] == MASK_ID).sum())
                        for r, ro in enumerate(rollouts))
    assert 0 < prompt_masked < sum(len(ro.prompt_ids) for ro in rollouts)  # d1's p = 0.3 prompt masking


@pytest.fixture(scope="module")
def llada_rollouts():
    model = tiny_model("llada", seed=6)
    return model, Engine(model).generate(PROMPTS, SAMPLING)


@pytest.mark.parametrize("sampling", ["stratified", "uniform", "entropy"])
def test_trace_mc_is_unbiased_for_trace(llada_rollouts, sampling):
    """E[sum w f(token)] over trace_mc's draws = sum f over the exact trace, any f (here a fixed
    pseudo-random value per scored token); 300 seeded draws, within 4 standard errors. The draws
    depend on the states only, not on the family."""
    model, rollouts = llada_rollouts
    trace = _plan(model, rollouts, "trace").pack
    value = {(s, i): math.sin(3.7 * s + 1.3 * i) + 2 for s, i in zip(trace.seq_index.tolist(),
                                                                       trace.token_index.tolist())}
    exact = sum(value.values())
    draws = []
    for seed in range(300):
        plan = _plan(model, rollouts, "trace_mc", seed=seed, mc_steps=2, mc_sampling=sampling)
        w = plan.weight if plan.weight is not None else torch.ones(len(plan.pack.target_ids))
        draws.append(sum(float(wt) * value[(s, i)] for wt, s, i in zip(w, plan.pack.seq_index.tolist(),
                                                                        plan.pack.token_index.tolist())))
    mean, se = torch.tensor(draws).mean(), torch.tensor(draws).std() / math.sqrt(len(draws))
    assert abs(float(mean) - exact) <= 4 * float(se) + 1e-9


def test_dream_shift_at_first_generated_position():
    """Dream's first generated token is scored from its state's last prompt row; LLaDA's from its own."""
    for family, shift in (("dream", 1), ("llada", 0)):
        model = tiny_model(family, seed=7)
        rollouts = Engine(model).generate(PROMPTS[:1], SAMPLING)
        pack = _plan(model, rollouts, "trace").pack
        first = (pack.token_index == 0) & (pack.seq_index == 0)
        at = int(pack.score_index[first])
        width = pack.input_ids.shape[1]
        row, col = divmod(at, width)
        seg_start = int((pack.meta.copy[row] == pack.meta.copy[row, col + shift]).nonzero()[0])
        assert col - seg_start == len(PROMPTS[0]) - shift
        assert int(pack.input_ids[row, col + shift]) == MASK_ID  # the scored token is masked in its state
