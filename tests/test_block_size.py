"""Changing the block size of a trained model (TraceRL's B = 4 -> 8 adaptation, issue 18 item 3).

A B = 4 checkpoint loaded with ``block_size=8`` must decode, mask, score and save at B = 8:
the engine's log-probs equal the trace-packed forward's (the training-inference oracle), the
cached engine equals the uncached one, and ``dirl rl`` / ``dirl sft`` write block_size 8.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dirl import config as config_lib
from dirl.algo.likelihood import EstimatorArgs, plan_estimator, score_plan
from dirl.cli import main as cli_main
from dirl.engine.engine import Engine
from dirl.model.loading import load_model_spec
from dirl.rollout import SamplingParams
from dirl.train.models import set_block_size
from dirl.train.rl.config import RLConfig, parse_block_schedule
from dirl.train.rl.loop import build_run, train_step
from dirl.train.sft.config import SFTConfig
from dirl.train.sft.loop import build_run as build_sft_run

PROMPT_LENGTHS = (5, 8, 3, 12, 11)  # 8 is a multiple of B = 8, the others are not
SETTINGS = {
    "sampled-dynamic-n2": SamplingParams(max_new_tokens=20, temperature=1.0, threshold=0.3, n=2, seed=5),
    "static-topp": SamplingParams(max_new_tokens=19, temperature=0.8, top_p=0.9, unmasking="static",
                                  steps_per_block=2, seed=1),
    "sequential-topk": SamplingParams(max_new_tokens=13, temperature=1.2, top_k=10, unmasking="sequential",
                                      seed=2),
}


@pytest.fixture
def model_b8(tiny_checkpoint):
    """The B = 4 checkpoint loaded and switched to B = 8, with a sharper head (varied confidences)."""
    model, _ = load_model_spec(str(tiny_checkpoint))
    assert model.config.block_size == 4
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    set_block_size(model, 8)
    return model.eval()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, 100, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _trace_logps(model, rollouts, params, block_size):
    """The RL update's recomputation (trace plan, packed forward) -> (recomputed, recorded)."""
    cfg = model.config
    plan = plan_estimator("trace", EstimatorArgs(rollouts, block_size, cfg.mask_token_id, cfg.pad_token_id))
    with torch.no_grad():
        recomputed = score_plan(model, plan, params)
    recorded = torch.tensor([rollouts[s].logps[i] for s, i in
                             zip(plan.pack.seq_index.tolist(), plan.pack.token_index.tolist())])
    return recomputed, recorded


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_b8_engine_logprobs_equal_trace_logprobs_from_a_b4_checkpoint(model_b8, name):
    params = SETTINGS[name]
    rollouts = Engine(model_b8).generate(_prompts(), params)
    for r in rollouts:  # decoded in whole blocks of 8
        end = len(r.prompt_ids) + len(r.token_ids)
        assert end % 8 == 0
        if params.unmasking == "static":  # 2 forwards per block: 8 / 2 = 4 tokens per forward (B = 4: 2)
            assert max(r.steps.count(step) for step in set(r.steps)) == 4
    args = EstimatorArgs.for_model(model_b8, rollouts, torch.Generator())  # what the trainer builds
    assert args.block_size == 8
    recomputed, recorded = _trace_logps(model_b8, rollouts, params, args.block_size)
    assert recomputed.numel() == sum(r.num_tokens for r in rollouts)
    assert (recomputed - recorded).abs().max() <= 1e-4
    # The oracle can fail: scoring the same B = 8 traces with B = 4 masks disagrees.
    wrong, recorded4 = _trace_logps(model_b8, rollouts, params, 4)
    assert (wrong - recorded4).abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_b8_cached_equals_uncached(model_b8, name):
    params = SETTINGS[name]
    cached = Engine(model_b8, use_cache=True).generate(_prompts(), params)
    reference = Engine(model_b8, use_cache=False).generate(_prompts(), params)
    for x, y in zip(cached, reference, strict=True):
        assert (x.token_ids, x.steps, x.num_tokens, x.num_forwards) == (y.token_ids, y.steps, y.num_tokens,
                                                                        y.num_forwards)
        assert max(abs(a - b) for a, b in zip(x.logps, y.logps)) <= 1e-5


def test_set_block_size_keeps_the_checkpoints_when_unset(tiny_model):
    set_block_size(tiny_model, None)
    assert tiny_model.config.block_size == 4
    set_block_size(tiny_model, 2)
    assert tiny_model.config.block_size == 2


def test_schedule_is_parsed_and_looked_up_by_step():
    assert parse_block_schedule("0:4, 100:8") == [(0, 4), (100, 8)]
    assert parse_block_schedule("") == []
    cfg = RLConfig(block_size=2, block_size_schedule="3:4,5:8")
    assert [cfg.block_size_at(s) for s in range(7)] == [2, 2, 2, 4, 4, 8, 8]
    assert RLConfig(block_size_schedule="3:8").block_size_at(0) is None  # the checkpoint's
    for bad in ("0:4,0:8", "5:8,2:4", "0:0", "a:4", "4", "0:4:8", "-1:4"):
        with pytest.raises(config_lib.ConfigError, match="block_size_schedule must look like"):
            config_lib.load(RLConfig, None, [f"block_size_schedule={bad}"])


def _rl_args(ckpt: Path, out: Path) -> list[str]:
    return [f"model={ckpt}", f"out={out}", "rollout.num_prompts=2", "rollout.group_size=2",
            "rollout.sampling.max_new_tokens=8", "rewards.rl_rewards:digit_fraction=1.0", "optim.lr=1e-3"]


def test_cli_rl_step_at_b8_from_a_b4_checkpoint_saves_b8(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert cli_main(["rl", *_rl_args(tiny_checkpoint, out), "block_size=8", "max_steps=1", "--no-progress"]) == 0
    for directory in (out / "final", out / "checkpoints" / "step-000001"):
        assert json.loads((directory / "config.json").read_text())["block_size"] == 8
    assert json.loads((tiny_checkpoint / "config.json").read_text())["block_size"] == 4  # the start untouched
    model, _ = load_model_spec(str(out / "final"))
    assert model.config.block_size == 8
    saved = config_lib.load(RLConfig, out / "checkpoints" / "step-000001" / "config.yaml")
    assert saved.block_size == 8
    resumed = build_run(saved, resume=str(out))  # weights from the run, the B = 4 start, B = 8 again
    assert (resumed.start_step, resumed.learner.model.config.block_size) == (1, 8)


@pytest.mark.parametrize("backend", ["native", "checkpoint"])
def test_schedule_grows_the_block_size_between_steps(tiny_checkpoint, tmp_path, monkeypatch, backend):
    cfg = config_lib.load(RLConfig, None, [*_rl_args(tiny_checkpoint, tmp_path / "run"), "max_steps=2",
                                           "block_size_schedule=1:8", f"rollout.backend={backend}"])
    run = build_run(cfg)
    seen = []
    generate = run.collector.backend.generate

    def recording(prompts, params, seeds=None):
        rollouts = generate(prompts, params, seeds)
        ends = [len(r.prompt_ids) + len(r.token_ids) for r in rollouts]
        seen.append((run.collector.backend.engine.block_size, all(end % 8 == 0 for end in ends)))
        return rollouts

    run.collector.backend.generate = recording
    train_step(run, 0)
    assert run.learner.model.config.block_size == 4  # step 0: the checkpoint's
    train_step(run, 1)
    assert run.learner.model.config.block_size == 8
    assert seen[0][0] == 4 and seen[1] == (8, True)  # step 1's rollouts end on blocks of 8
    run.collector.backend.close()


def test_sft_at_b8_from_a_b4_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "sft"
    base = [f"model={tiny_checkpoint}", "data.limit=16", "data.max_length=64", "batch_size=4", "save_every=0",
            "progress=false", "max_steps=1"]
    run = build_sft_run(config_lib.load(SFTConfig, None, [*base, f"out={tmp_path / 'x'}", "block_size=8"]))
    assert run.model.config.block_size == 8
    assert all(len(e.input_ids) % 8 == 0 for e in run.loader.examples)  # padded to whole blocks of 8
    assert cli_main(["sft", *base, f"out={out}", "block_size=8"]) == 0
    assert json.loads((out / "final" / "config.json").read_text())["block_size"] == 8
