"""Training the llada2 MoE family: the trainer scores exactly what the engine sampled (routing is a
deterministic function of the weights), with LoRA on and off."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from test_llada2 import tiny_llada2

from dirl.algo.likelihood import EstimatorArgs, plan_estimator, score_plan
from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47))]  # the first block shared with the prompt; a block boundary crossed
PARAMS = SamplingParams(max_new_tokens=30, temperature=1.0, threshold=0.5, n=2, seed=11)


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


# -- router freezing, utilisation, the memory plan ------------------------------------------------------------


def test_frozen_router_gets_no_update_and_utilisation_counts_decoding(tokenizer):
    from dirl.train.moe import (
        MoEConfig,
        apply_moe_settings,
        reset_utilisation,
        utilisation_metrics,
    )

    model = tiny_llada2(tokenizer, bias_std=0.02)
    assert apply_moe_settings(model, MoEConfig(freeze_router=True)) == 1
    router = model.moe_blocks()[1].gate
    assert not router.weight.requires_grad and "expert_bias" not in dict(model.named_parameters()) \
        and "model.layers.1.mlp.gate.expert_bias" in model.state_dict()
    reset_utilisation(model)
    rollouts = Engine(model).generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
    metrics = utilisation_metrics(model)
    assert set(metrics) == {"moe/max_load/layer1", "moe/used/layer1", "moe/max_load"}
    assert 1.0 <= metrics["moe/max_load"] <= 8.0 and 0 < metrics["moe/used/layer1"] <= 1.0
    plan = plan_estimator("trace", EstimatorArgs.for_model(model, rollouts, torch.Generator()))
    score_plan(model.train(), plan, PARAMS).sum().backward()  # a training forward: not counted
    assert utilisation_metrics(model)["moe/used/layer1"] == 0.0
    assert router.weight.grad is None
    assert all(e.up_proj.weight.grad is not None for e in model.moe_blocks()[1].experts)  # idle ones: zeros


def test_the_recipe_fits_8x80gb_by_the_plan_counting_total_and_active_params():
    import json

    from test_llada2 import MINI

    from dirl import config as config_lib
    from dirl.memory_plan import fits, plan, rl_workload
    from dirl.model.llada2.config import LLaDA2Config
    from dirl.train.rl.config import RLConfig

    if not (MINI / "config.json").exists():
        pytest.skip(f"{MINI} not available")
    model = LLaDA2Config.from_hf_dict(json.loads((MINI / "config.json").read_text()))
    cfg = config_lib.load(RLConfig, REPO / "configs/llada2-mini-rl.yaml", [])
    assert (cfg.rollout.group_size, cfg.optim.lr, cfg.moe.freeze_router) == (32, 1e-6, True)
    assert cfg.rollout.sampling.unmasking == "threshold_schedule" and cfg.rollout.sampling.steps_per_block == 32
    work = rl_workload(cfg, world=8, block_size=model.block_size)
    assert work.tokens >= 512 + 33 * cfg.rollout.sampling.max_new_tokens  # one worst-case B = 32 trace row
    out = plan(model, work)
    assert round(out["params_total_b"], 2) == 16.26 and round(out["params_active_b"], 2) == 1.43
    assert out["decode_weights"] == pytest.approx(model.num_parameters() * 2 / 2**30)  # every expert, bf16
    assert fits(model, work, device_gb=80)


def test_every_estimator_scores_llada2_rollouts_at_block_32(tokenizer):
    """SFT and RL code is family-agnostic: each estimator's plan scores llada2 rollouts (B = 32)
    with finite log-probs and a gradient into the experts."""
    from dirl.algo.likelihood import ESTIMATORS

    model = tiny_llada2(tokenizer, bias_std=0.02)
    rollouts = Engine(model).generate(PROMPTS[:2], SamplingParams(max_new_tokens=20, temperature=1.0,
                                                                   threshold=0.5, n=2, seed=1))
    model.train()
    for name in ESTIMATORS:
        plan = plan_estimator(name, EstimatorArgs.for_model(model, rollouts, torch.Generator().manual_seed(0)))
        logp = score_plan(model, plan, PARAMS)
        assert logp.numel() > 0 and torch.isfinite(logp).all(), name
        model.zero_grad()
        logp.sum().backward()
        assert model.moe_blocks()[1].experts[0].down_proj.weight.grad is not None, name
