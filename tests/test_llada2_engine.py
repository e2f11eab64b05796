"""The block engine on the llada2 family at B = 32 with absolute alignment: cached = uncached,
engine = trace log-probs, and LLaDA2's commit rule (threshold, else the per-step schedule's top-k)."""

from __future__ import annotations

import pytest
import torch
from test_llada2 import B, tiny_llada2

from dirl.engine.engine import Engine
from dirl.engine.unmask import select_commits, transfer_schedule
from dirl.model.forward import Readout
from dirl.model.policy import policy_logprobs
from dirl.model.trace import pack_traces, trace_copies
from dirl.rollout import SamplingParams


@pytest.fixture
def peaky(tokenizer):
    """Tiny llada2 with a sharp LM head (confidences spread over (0, 1)) and a non-zero expert bias."""
    model = tiny_llada2(tokenizer, bias_std=0.02)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


# -- the block engine at B = 32, absolute alignment -------------------------------------------------------------

# Prompt lengths: inside the first block, exactly one block, across blocks, not aligned.
PROMPT_LENGTHS = (5, 32, 45, 70)
SETTINGS = {
    "greedy-dynamic": SamplingParams(max_new_tokens=40, temperature=0.0, threshold=0.3),
    "sampled-dynamic-n2": SamplingParams(max_new_tokens=50, temperature=1.0, threshold=0.3, n=2, seed=5),
    "static-topp": SamplingParams(max_new_tokens=33, temperature=0.8, top_p=0.9, unmasking="static",
                                  steps_per_block=8, seed=1),
    # The reference's decoding: 32 steps a block, threshold 0.95, else the schedule's top-k.
    "llada2-rule": SamplingParams(max_new_tokens=36, temperature=1.0, unmasking="threshold_schedule",
                                  threshold=0.95, steps_per_block=32, seed=7),
}


def _prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_cached_equals_uncached_at_block_32(peaky, name):
    params = SETTINGS[name]
    cached = Engine(peaky, use_cache=True).generate(_prompts(), params)
    reference = Engine(peaky, use_cache=False).generate(_prompts(), params)
    for x, y in zip(cached, reference):
        assert (x.token_ids, x.steps, x.num_forwards) == (y.token_ids, y.steps, y.num_forwards)
        torch.testing.assert_close(torch.tensor(x.logps), torch.tensor(y.logps), atol=1e-5, rtol=0)
    # Absolute alignment: the first generated block fills the prompt's last block up to a multiple of 32.
    for r in cached:
        first_steps = r.steps[: B - len(r.prompt_ids) % B]
        assert max(first_steps) < min(r.steps[len(first_steps):])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_trace_logprobs_equal_engine_logprobs_at_block_32(peaky, tokenizer, name):
    params = SETTINGS[name]
    rollouts = Engine(peaky).generate(_prompts(), params)
    copies = [trace_copies(len(r.prompt_ids), r.steps, B) for r in rollouts]
    pack = pack_traces(rollouts, copies, B, tokenizer.mask_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = peaky(pack.input_ids, pack.position_ids, pack.meta, readout=Readout(pack.score_index)).logits
    logp = policy_logprobs(logits, params.temperature, params.top_k, params.top_p, tokenizer.mask_token_id)
    recomputed = logp.gather(-1, pack.target_ids[:, None]).squeeze(-1)
    recorded = torch.tensor([rollouts[s].logps[i] for s, i in zip(pack.seq_index.tolist(), pack.token_index.tolist())])
    assert len(recorded) == sum(len(r.token_ids) for r in rollouts)
    torch.testing.assert_close(recomputed, recorded, atol=1e-4, rtol=0)


# -- LLaDA2's commit rule: threshold, else the per-step schedule's top-k -------------------------------------


def test_transfer_schedule_and_threshold_rule_by_hand():
    assert transfer_schedule(8, 3).tolist() == [3, 3, 2]
    assert transfer_schedule(32, 32).tolist() == [1] * 32
    conf = torch.tensor([[0.99, 0.97, 0.5, 0.4, 0.3, 0.2, 0.1, 0.96],    # step 0: 3 pass >= k 3: those 3
                         [0.99, 0.95, 0.5, 0.4, 0.3, 0.2, 0.1, 0.6],     # step 1: 1 passes (0.95 is not > 0.95): top-3
                         [0.99, 0.97, 0.96, 0.98, 0.3, 0.2, 0.1, 0.6],   # step 2 (k 2): 4 pass: all 4
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]])      # step 2, one masked position: it
    masked = torch.ones(4, 8, dtype=torch.bool)
    masked[3] = torch.arange(8) == 2
    commit = select_commits(conf, masked, "threshold_schedule", 0.95, 3, 8, torch.tensor([0, 1, 2, 2]))
    assert commit.int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 1],
                                     [1, 1, 0, 0, 0, 0, 0, 1],
                                     [1, 1, 1, 1, 0, 0, 0, 0],
                                     [0, 0, 1, 0, 0, 0, 0, 0]]


def test_threshold_schedule_takes_the_schedule_when_nothing_passes(peaky):
    """threshold 1 (never passed): every full block takes exactly steps_per_block forwards,
    committing 32 // 6 + (1 for the first 32 % 6 steps) tokens at each."""
    params = SamplingParams(max_new_tokens=64, temperature=1.0, unmasking="threshold_schedule", threshold=1.0,
                            steps_per_block=6, seed=4)
    for rollout in Engine(peaky).generate(_prompts((32, 64)), params):
        per_step = [rollout.steps.count(s) for s in range(rollout.num_forwards)]
        assert per_step == [6, 6, 5, 5, 5, 5] * 2
