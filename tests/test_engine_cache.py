"""The engine at scale: the ragged step, the LM head on masked rows, bf16 decoding (the cache itself: test_kv_cache.py)."""

from __future__ import annotations

import pytest
import torch

from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams
from dirl.engine.kv_cache import KVCache
from dirl.model.policy import policy_logprobs
from dirl.model.trace import pack_traces, trace_copies
from dirl.model.forward import Readout

B = 4


def _prompts(lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=gen).tolist() for n in lengths]


def _count_calls(module) -> list[int]:
    """Appends the number of input rows (B * T) of every call of ``module``."""
    rows: list[int] = []
    module.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows


# -- the ragged step -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [False, True])
def test_a_batch_takes_as_many_forwards_as_its_slowest_row(peaky_model, stop):
    """Rows out of step (prompt lengths, dynamic commits, stops) share every forward: no commit
    forwards, and no prefill forward (the prompts' clean blocks ride along in the first step)."""
    calls = _count_calls(peaky_model.model.embed_tokens)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, threshold=0.3, seed=3)
    prompts = _prompts((5, 8, 3, 12, 11, 6))
    if stop:  # a token some rows generate and others don't: only some rows end early
        free = [set(r.completion_ids[4:]) for r in Engine(peaky_model).generate(prompts, params)]
        params.stop_ids = [next(t for t in sorted(set.union(*free)) if 0 < sum(t in f for f in free) < len(free))]
        calls.clear()
    rollouts = Engine(peaky_model).generate(prompts, params)
    per_row = [r.num_forwards for r in rollouts]
    assert min(per_row) < max(per_row)  # the rows really were out of step
    assert len(calls) == max(per_row)  # one forward per step of the slowest row, the prefill riding along
    if stop:
        assert {r.finish_reason for r in rollouts} == {"stop", "length"}


def test_lm_head_runs_on_masked_positions_only(peaky_model):
    """Sequential decoding of block-aligned prompts: B, B-1, ..., 1 masked positions per block."""
    rows = _count_calls(peaky_model.lm_head)
    params = SamplingParams(max_new_tokens=2 * B, temperature=1.0, unmasking="sequential")
    Engine(peaky_model).generate(_prompts((4, 8)), params)
    assert rows == [2 * m for m in range(B, 0, -1)] * 2  # (no prefill forward: it rides along)


# -- bf16 ------------------------------------------------------------------------------------------------


def test_bf16_engine_decodes_with_a_bf16_cache_and_fp32_logprobs(make_tiny_model, tokenizer, monkeypatch):
    model = make_tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    dtypes = []
    original = KVCache.reserve
    monkeypatch.setattr(KVCache, "reserve", lambda self, end: (original(self, end), dtypes.append(self.keys[0].dtype)))
    params = SamplingParams(max_new_tokens=16, temperature=1.0, threshold=0.3, n=2, seed=5)
    rollouts = Engine(model).generate(_prompts((5, 8, 3)), params)
    assert set(dtypes) == {torch.bfloat16}
    copies = [trace_copies(len(r.prompt_ids), r.steps, B) for r in rollouts]
    pack = pack_traces(rollouts, copies, B, tokenizer.mask_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(pack.input_ids, pack.position_ids, pack.meta, readout=Readout(pack.score_index)).logits
    logp = policy_logprobs(logits, params.temperature, mask_token_id=tokenizer.mask_token_id)
    recomputed = logp.gather(-1, pack.target_ids[:, None]).squeeze(-1)
    recorded = torch.tensor([rollouts[s].logps[i] for s, i in zip(pack.seq_index.tolist(), pack.token_index.tolist())])
    assert recomputed.dtype == torch.float32 and torch.isfinite(recorded).all()
    # bf16 rounds K/V and activations (8 bits of mantissa): the same states agree to bf16 precision.
    torch.testing.assert_close(recomputed, recorded, atol=0.1, rtol=0)
