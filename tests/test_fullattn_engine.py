"""The full-attention decoder: greedy = independent re-implementations of LLaDA's ``generate`` and
Dream's ``diffusion_generate`` (written here from their public descriptions), left padding changes
nothing, and the engine's log-probs are the trainer's on the recorded states."""

from __future__ import annotations

import pytest
import torch

from dirl.engine.engine import Engine
from dirl.model.layout.bidirectional import pack_states, state_copies
from dirl.model.policy import policy_logprobs
from dirl.model.forward import Readout
from dirl.rollout import SamplingParams
from tests.fullattn_models import MASK_ID, tiny_model

PROMPTS = [[5, 9, 12, 3, 7], [20, 4], [8, 8, 30, 2, 11, 6, 14, 9]]


def _logits(model, x):
    """The whole sequence's logits as the reference reads them: (1, L, V); Dream's shifted by one."""
    out = model(x, torch.arange(x.shape[1])[None], None).logits
    return torch.cat([out[:, :1], out[:, :-1]], dim=1) if model.arch.logit_shift else out


def _no_mask(logits):
    """dirl never samples [MASK] (the references may, where a trained model never would)."""
    return logits.index_fill(-1, torch.tensor([MASK_ID]), float("-inf"))


@torch.no_grad()
def llada_generate(model, prompt, steps, gen_length, block_length):
    """LLaDA ``generate``, greedy, low_confidence remasking: blocks of block_length, steps // blocks
    steps each, a linear count per step, the most probable (untempered softmax) positions."""
    x = torch.tensor([prompt + [MASK_ID] * gen_length])
    start, num_blocks = len(prompt), gen_length // block_length
    per_block = steps // num_blocks
    for b in range(num_blocks):
        n = int((x[0, start + b * block_length: start + (b + 1) * block_length] == MASK_ID).sum())
        counts = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            mask_index = x == MASK_ID
            logits = _logits(model, x)
            x0 = _no_mask(logits).argmax(-1)
            x0_p = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, start + (b + 1) * block_length:] = float("-inf")
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
            chosen = torch.topk(confidence[0], counts[i]).indices
            x[0, chosen] = torch.where(mask_index, x0, x)[0, chosen]
    return x[0, start:].tolist()


@torch.no_grad()
def dream_generate(model, prompt, steps, gen_length, alg, eps=1e-3):
    """Dream ``diffusion_generate``, greedy, no blocks: t = linspace(1, eps, steps + 1), commit the
    int(n (1 - s/t)) most confident masked positions (everything at the last step)."""
    x = torch.tensor([prompt + [MASK_ID] * gen_length])
    times = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK_ID
        mask_logits = _logits(model, x)[mask_index]  # (n, V)
        probs = torch.softmax(mask_logits, -1)
        x0 = _no_mask(mask_logits).argmax(-1)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
        if alg == "topk_margin":
            top = probs.sort(-1, descending=True).values
            confidence = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        num_mask = mask_index.sum() / mask_index.shape[0]
        t, s = times[i], times[i + 1]
        k = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full = torch.full(x.shape, float("-inf"))
        full[mask_index] = confidence
        if k > 0:
            chosen = torch.topk(full[0], k).indices
            proposal = torch.full_like(x, MASK_ID)
            proposal[mask_index] = x0
            x[0, chosen] = proposal[0, chosen]
    return x[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_greedy_low_confidence_equals_llada_generate(family):
    model = tiny_model(family)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, unmasking="low_confidence", steps_per_block=2,
                            block_length=4)
    rollouts = Engine(model).generate(PROMPTS, params)  # one batch, left-padded
    for prompt, rollout in zip(PROMPTS, rollouts):
        assert rollout.token_ids == llada_generate(model, prompt, steps=4, gen_length=8, block_length=4)
        assert rollout.num_forwards == 4 and sorted(set(rollout.steps)) == [0, 1, 2, 3]


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_greedy_equals_dream_diffusion_generate(family, alg):
    model = tiny_model(family, seed=1)
    params = SamplingParams(max_new_tokens=9, temperature=0.0, unmasking=alg, steps_per_block=5, block_length=9)
    rollouts = Engine(model).generate(PROMPTS, params)
    for prompt, rollout in zip(PROMPTS, rollouts):
        assert rollout.token_ids == dream_generate(model, prompt, steps=5, gen_length=9, alg=alg)
        assert rollout.num_forwards == 5


@pytest.mark.parametrize("rule", ["low_confidence", "random", "origin", "maskgit_plus", "dynamic"])
def test_sampled_rows_do_not_depend_on_their_batch(rule):
    """A seeded row decodes the same alone and left-padded beside others (temperature 0.8, top-k)."""
    model = tiny_model("dream", seed=2)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, unmasking=rule, steps_per_block=3,
                            block_length=4, threshold=0.3, alg_temp=0.5 if rule == "maskgit_plus" else 0.0)
    engine = Engine(model)
    together = engine.generate(PROMPTS, params, seeds=[11, 12, 13])
    alone = engine.generate(PROMPTS[2:], params, seeds=[13])[0]
    assert (together[2].token_ids, together[2].steps) == (alone.token_ids, alone.steps)
    torch.testing.assert_close(torch.tensor(together[2].logps), torch.tensor(alone.logps), atol=1e-5, rtol=0)
    assert all(MASK_ID not in r.token_ids and len(r.token_ids) == 8 for r in together)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_trainer_logprobs_equal_engine_logprobs(family):
    """Every token re-scored in the state it was committed in (all states of a row packed as
    segments): log-prob under the sampler's tempered, top-k/top-p distribution = the engine's."""
    model = tiny_model(family, seed=3)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=30, top_p=0.9, unmasking="low_confidence",
                            steps_per_block=3, block_length=4, n=2)
    rollouts = Engine(model).generate(PROMPTS, params)
    pack = pack_states(rollouts, [state_copies(r.steps) for r in rollouts], MASK_ID, 1, model.arch.logit_shift)
    with torch.no_grad():
        logits = model(pack.input_ids, pack.position_ids, pack.meta, readout=Readout(pack.score_index)).logits
    logp = policy_logprobs(logits, params.temperature, params.top_k, params.top_p, MASK_ID)
    trainer = logp.gather(-1, pack.target_ids[:, None]).squeeze(-1)
    engine = torch.tensor([rollouts[s].logps[i] for s, i in zip(pack.seq_index.tolist(), pack.token_index.tolist())])
    assert len(engine) == sum(len(r.token_ids) for r in rollouts)
    torch.testing.assert_close(trainer, engine, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_approximate_cache_is_exact_until_the_state_changes(family, mode):
    """prefix / dual: a window step right after the recording forward (nothing committed in
    between) = a full recompute; after one commit the stale K/V make the logits drift; decoding
    with the cache commits the same tokens as the exact decoder at every block's first step."""
    from dirl.engine import full_attention
    model = tiny_model(family, seed=8)
    base = dict(max_new_tokens=8, temperature=0.0, unmasking="low_confidence", steps_per_block=4, block_length=4)
    params = SamplingParams(**base, cache=mode)
    exact, approx = (Engine(model).generate(PROMPTS, p) for p in (SamplingParams(**base), params))
    for e, a in zip(exact, approx):
        assert [t for t, s in zip(e.token_ids, e.steps) if s == 0] == [t for t, s in zip(a.token_ids, a.steps) if s == 0]
        assert MASK_ID not in a.token_ids and a.num_forwards == e.num_forwards
    rows = full_attention._Rows(model, [list(p) for p in PROMPTS], [0, 1, 2], params)
    cand = rows.masked & rows.in_block()
    drift = []
    with torch.no_grad():
        for _ in range(2):
            rows.fresh = True
            full = full_attention._candidate_logits(model, rows, cand, mode)  # records
            rows.fresh = False
            cached = full_attention._candidate_logits(model, rows, cand, mode)
            drift.append(float((cached - full).abs().max()))
            full_attention._step(model, rows, params, "low_confidence")  # commits one token per row
            rows.fresh = False
            cand = rows.masked & rows.in_block()
        stale = full_attention._candidate_logits(model, rows, cand, mode)
        rows.fresh = True
        drift.append(float((stale - full_attention._candidate_logits(model, rows, cand, mode)).abs().max()))
    assert drift[0] <= 1e-5 and drift[1] <= 1e-5 and drift[2] > 1e-3


def test_cancelled_prompt_leaves_the_batch_others_unchanged():
    model = tiny_model("llada", seed=9)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, unmasking="low_confidence", steps_per_block=2,
                            block_length=4, n=2)
    full = Engine(model).generate(PROMPTS, params)
    cancelled = Engine(model).generate(PROMPTS, params, is_cancelled=lambda i: i == 1)
    assert cancelled[2] is None and cancelled[3] is None
    assert [r.token_ids for k, r in enumerate(cancelled) if k not in (2, 3)] == \
        [r.token_ids for k, r in enumerate(full) if k not in (2, 3)]
    assert [(r.prompt_index, r.sample_index) for r in full] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_feed_decode_serves_rows_of_different_lengths():
    """Engine.decode (the serving batcher's entry): each row decodes its own max_new_tokens, as
    generate does for that length."""
    from dirl.engine.scheduler import ListFeed, RowRequest

    model = tiny_model("dream", seed=10)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, unmasking="maskgit_plus", steps_per_block=4,
                            block_length=8)
    requests = [RowRequest(list(p), 7, i, 0, owner=i, max_new_tokens=length)
                for i, (p, length) in enumerate(zip(PROMPTS, (8, 4, 8)))]
    feed = ListFeed(requests)
    Engine(model).decode(feed, params)
    assert [len(r.token_ids) for r in feed.results] == [8, 4, 8]
    short = Engine(model).generate([PROMPTS[1]], SamplingParams(**{**params.__dict__, "max_new_tokens": 4}))[0]
    assert feed.results[1].token_ids == short.token_ids
