"""Training the llada2 MoE family: the trainer scores exactly what the engine sampled (routing is a
deterministic function of the weights), with LoRA on and off."""

from __future__ import annotations

import pytest
import torch

from dirl.algo.likelihood import EstimatorArgs, plan_estimator, score_plan
from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams
from tests.test_llada2 import tiny_llada2

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 50)), [60] * 33]
PARAMS = SamplingParams(max_new_tokens=40, temperature=1.0, threshold=0.5, n=2, seed=11)


def _lora(model, experts: bool):
    """LoRA on the family's targets (the routed experts' by ``lora.experts``), non-zero B so the adapters count."""
    pytest.importorskip("peft")
    from dirl.model.lora import LoraConfig, apply_lora

    model = apply_lora(model, LoraConfig(r=4, alpha=8, experts=experts), base="init:llada2-tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("lora", ["off", "attention+shared", "experts"])
def test_trainer_logprobs_equal_engine_logprobs(tokenizer, lora):
    model = tiny_llada2(tokenizer, bias_std=0.02)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    base = Engine(model).generate(PROMPTS, PARAMS)
    if lora != "off":
        model = _lora(model, experts=lora == "experts")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any(".shared_experts." in n for n in names) and any(".attention.dense." in n for n in names)
        assert any(".experts.0." in n for n in names) == (lora == "experts")
    rollouts = Engine(model).generate(PROMPTS, PARAMS)
    if lora != "off":  # the adapters really change the sampled function
        assert [r.logps for r in rollouts] != [r.logps for r in base]
    model.train()
    plan = plan_estimator("trace", EstimatorArgs.for_model(model, rollouts, torch.Generator()))
    logp = score_plan(model, plan, PARAMS)  # the update's forward: grad on, train mode
    assert logp.requires_grad
    recorded = torch.tensor([rollouts[s].logps[i] for s, i in zip(plan.pack.seq_index.tolist(),
                                                                   plan.pack.token_index.tolist())])
    assert len(recorded) == sum(r.num_tokens for r in rollouts)
    torch.testing.assert_close(logp.detach(), recorded, atol=1e-4, rtol=0)
