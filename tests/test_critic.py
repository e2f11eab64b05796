"""TraceRL's value model: Proposition 1 by hand, its special cases, the clipped loss, and RL
steps with ``algo.critic=value`` (both models move, exact resume, the first step's oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dirl import config as config_lib
from dirl.algo.critic import (ValueConfig, clipped_value_loss, outcome_rewards, returns_and_advantages, rollout_steps,
                              step_means, step_ranks, step_recursions)
from dirl.cli import main as cli_main
from dirl.engine.engine import Engine
from dirl.model.checkpoint import load_pretrained
from dirl.rollout import Rollout, SamplingParams, SamplingSpec
from dirl.train.optim import OptimConfig
from dirl.model.loading import load_model_spec
from dirl.train.rl.config import RLConfig, RolloutConfig
from dirl.train.rl.loop import train_rl
from dirl.train.rl.critic import build_critic
from dirl.train.rl.config import AlgoConfig
from dirl.train.state import TRAINER_STATE, resolve_resume

REPO = Path(__file__).resolve().parents[1]

# Two response blocks of B = 4 after a 4-token prompt. Block 1 commits tokens {0, 2} at step 0
# and {1, 3} at step 1; block 2 commits {4, 6} at step 2 (6 is the stop token), 5 at step 3 and
# the post-stop token 7 at step 4, which is in no trace step (num_tokens = 7).
TWO_BLOCKS = Rollout(prompt_ids=[1, 2, 3, 4], token_ids=[10, 11, 12, 13, 14, 15, 0, 9],
                     steps=[0, 1, 0, 1, 2, 3, 2, 4], logps=[0.0] * 8, num_tokens=7, finish_reason="stop",
                     num_forwards=5)
VALUES = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])


def test_rollout_steps_and_ranks_stop_at_the_stop_token():
    short = Rollout([1], [5, 6], [3, 7], [0.0, 0.0], 2, "stop", 2)  # step ids with a gap
    steps = rollout_steps([TWO_BLOCKS, short])
    assert steps.tolist() == [[0, 1, 0, 1, 2, 3, 2], [3, 7, -1, -1, -1, -1, -1]]
    rank, num_steps = step_ranks(steps)
    assert rank.tolist() == [[0, 1, 0, 1, 2, 3, 2], [0, 1, -1, -1, -1, -1, -1]]
    assert num_steps == 4
    # The outcome sits on the last step's tokens: token 5 (step 3), not the stop token (step 2).
    assert outcome_rewards(torch.tensor([1.0, -2.0]), rank).tolist() == [
        [0, 0, 0, 0, 0, 1, 0], [0, -2, 0, 0, 0, 0, 0]]


def test_step_recursions_by_hand_on_two_blocks():
    gamma, lam = 0.9, 0.5
    rank, num_steps = step_ranks(rollout_steps([TWO_BLOCKS]))
    rewards = outcome_rewards(torch.tensor([1.0]), rank)
    v_star = step_means(VALUES, rank, num_steps)
    r_star = step_means(rewards, rank, num_steps)
    assert torch.allclose(v_star, torch.tensor([[0.2, 0.3, 0.6, 0.6]]))
    assert r_star.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    ret_star, adv_star = step_recursions(r_star, v_star, gamma, lam)
    # R*: 1, .9, .81, .729; delta: .07, .24, -.06, .4; A*_t = delta_t + .45 A*_{t+1}; column T is 0.
    assert torch.allclose(ret_star, torch.tensor([[0.729, 0.81, 0.9, 1.0, 0.0]]))
    assert torch.allclose(adv_star, torch.tensor([[0.2023, 0.294, 0.12, 0.4, 0.0]]))
    ret, adv = returns_and_advantages(rewards, VALUES, rank, num_steps, gamma, lam)
    # A_j = r_j - V_j + .9 V*_{t_j+1} + .45 A*_{t_j+1};  R_j = r_j + .9 R*_{t_j+1}
    assert torch.allclose(adv, torch.tensor([[0.3023, 0.394, 0.1023, 0.194, 0.22, 0.4, 0.02]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.729, 0.81, 0.729, 0.81, 0.9, 1.0, 0.9]]), atol=1e-6)
    # A step's mean token advantage is its step advantage (the aggregates are means).
    assert torch.allclose(step_means(adv, rank, num_steps), adv_star[:, :num_steps], atol=1e-6)


@pytest.mark.parametrize("constant", [True, False])
def test_gamma_lambda_one_gives_return_minus_value(constant):
    steps = rollout_steps([TWO_BLOCKS, Rollout([1], [5, 6, 7], [0, 0, 1], [0.0] * 3, 3, "length", 2)])
    rank, num_steps = step_ranks(steps)
    gen = torch.Generator().manual_seed(0)
    values = torch.full(rank.shape, 0.25) if constant else torch.rand(rank.shape, generator=gen)
    outcome = torch.tensor([0.8, -1.3])
    ret, adv = returns_and_advantages(outcome_rewards(outcome, rank), values, rank, num_steps, 1.0, 1.0)
    valid = rank >= 0
    expected_ret = outcome[:, None].expand_as(rank)
    assert torch.allclose(ret[valid], expected_ret[valid], atol=1e-6)  # R_j = R for every token
    assert torch.allclose(adv[valid], (expected_ret - values)[valid], atol=1e-6)  # A_j = R - V_j
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()


def test_lambda_zero_is_the_one_step_td_error():
    rank, num_steps = step_ranks(rollout_steps([TWO_BLOCKS]))
    rewards = outcome_rewards(torch.tensor([1.0]), rank)
    _, adv = returns_and_advantages(rewards, VALUES, rank, num_steps, 1.0, 0.0)
    v_next = torch.tensor([[0.3, 0.6, 0.3, 0.6, 0.6, 0.0, 0.6]])  # V*_{t_j+1}; 0 past the last step
    assert torch.allclose(adv, rewards - VALUES + v_next, atol=1e-6)


def test_clipped_value_loss_by_hand():
    loss, clipped = clipped_value_loss(torch.tensor([1.0, 0.0, 0.55]), torch.tensor([0.5, 0.5, 0.5]),
                                       torch.tensor([0.0, 0.0, 1.0]), clip=0.2)
    # V_clip = .7, .3, .55 -> 0.5 max((V-R)^2, (V_clip-R)^2) = .5, .045, .10125
    assert torch.allclose(loss, torch.tensor([0.5, 0.045, 0.10125]))
    assert clipped.tolist() == [False, True, False]


def test_bad_critic_settings_name_the_key():
    with pytest.raises(config_lib.ConfigError, match="algo.critic"):
        config_lib.from_dict(RLConfig, {"algo": {"critic": "q"}})
    with pytest.raises(config_lib.ConfigError, match="algo.value.gamma"):
        config_lib.from_dict(RLConfig, {"algo": {"critic": "value", "value": {"gamma": 1.5}}})


def _cfg(out, critic: str = "value", max_steps: int = 1, **value) -> RLConfig:
    return RLConfig(model="init:tiny", out=str(out), rewards={"rl_rewards:digit_fraction": 1.0}, max_steps=max_steps,
                    optim=OptimConfig(lr=1e-3, schedule="constant"),
                    rollout=RolloutConfig(num_prompts=2, group_size=4, sampling=SamplingSpec(max_new_tokens=8)),
                    algo=AlgoConfig(critic=critic, value=ValueConfig(lr=1e-2, **value)))


def _critic_state(run_dir: Path) -> dict:
    return torch.load(resolve_resume(run_dir) / TRAINER_STATE, weights_only=True)["extra"]["critic"]


@pytest.mark.parametrize("outcome", ["group", "raw"])
def test_zero_head_advantages_are_the_outcome_on_every_token(tiny_model, outcome):
    """Before any value step V = 0, so at gamma = lam = 1 every completion token's advantage is
    the outcome (the group advantage or the raw reward), in micro-batches of one row."""
    rollouts = Engine(tiny_model).generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=8, n=2, seed=0))
    rewards, group_adv = torch.tensor([0.5, 1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, -1.0, 1.0])
    algo = AlgoConfig(critic="value", value=ValueConfig(outcome=outcome), micro_batch_tokens=1,
                      num_minibatches=2)
    critic = build_critic(tiny_model, algo, OptimConfig(), lora_rank=0)
    assert critic.model.config is tiny_model.config  # one block size for both models
    batch = critic.advantages(rollouts, rewards, group_adv)
    outcome_values = group_adv if outcome == "group" else rewards
    for s, r in enumerate(rollouts):
        assert batch.adv[s, :r.num_tokens].tolist() == [float(outcome_values[s])] * r.num_tokens
        assert (batch.adv[s, r.num_tokens:] == 0).all()
    assert sum(len(mb) for mb in batch.minibatches) == len(rollouts)  # one row per micro-batch
    before = critic.model.value_head.weight.clone()
    metrics = critic.update(batch)
    assert metrics["value/loss"] > 0 and not torch.equal(before, critic.model.value_head.weight)
    with pytest.raises(ValueError, match="algo.critic=value needs a full-weight policy"):
        build_critic(tiny_model, algo, OptimConfig(), lora_rank=4)


def test_first_step_with_a_zero_value_head_is_the_group_update(tmp_path):
    """V = 0 before any value step, so at gamma = lam = 1 with group outcomes A_j = z: the policy's
    first update equals the run without a critic."""
    plain = train_rl(_cfg(tmp_path / "none", critic="none"), progress=False)
    valued = train_rl(_cfg(tmp_path / "value"), progress=False)
    a, b = load_pretrained(plain / "final")[0].state_dict(), load_pretrained(valued / "final")[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


RL = ["--config", str(REPO / "configs/tiny-rl.yaml"), "rewards.rl_rewards:digit_fraction=1.0", "algo.critic=value",
      "algo.value.lr=1e-2", "rollout.sampling.max_new_tokens=8", "--no-progress"]


def test_cli_steps_with_a_critic_move_both_models_and_resume_exactly(tmp_path, monkeypatch):
    straight, half = tmp_path / "a", tmp_path / "b"
    assert cli_main(["rl", *RL, f"out={straight}", "max_steps=3"]) == 0
    assert cli_main(["rl", *RL, f"out={half}", "max_steps=2"]) == 0
    assert cli_main(["rl", "--resume", str(half), "max_steps=3", "--no-progress"]) == 0
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for x, y in zip(read(straight), read(half), strict=True):
        assert (x["loss"], x["value/loss"], x["value/mean"]) == (y["loss"], y["value/loss"], y["value/mean"])
    assert "timing/critic" in read(straight)[0] and read(straight)[2]["value/mean"] != 0.0
    sa, sb = _critic_state(straight), _critic_state(half)
    assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items())
    assert all(torch.equal(v["exp_avg"], sb["optimizer"]["state"][i]["exp_avg"])
               for i, v in sa["optimizer"]["state"].items())
    # Both models moved: every policy tensor, the zero-initialised value head and the value trunk.
    init = load_model_spec("init:tiny", seed=0)[0].state_dict()
    policy = load_pretrained(straight / "final")[0].state_dict()
    assert all(not torch.equal(v, policy[k]) for k, v in init.items())
    value = sa["model"]
    assert value["value_head.weight"].abs().sum() > 0 and value["value_head.bias"].abs().sum() > 0
    trunk = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(value[f"backbone.{trunk}"], init[trunk])
    assert "backbone.lm_head.weight" not in value  # the copy has no LM head
