"""The RL trainer end to end: the real CLI, the frozen reference, exact resume, backends."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dirl.algo.advantages import group_advantages
from dirl.cli import main as cli_main
from dirl.algo.likelihood import ESTIMATORS
from dirl.engine.engine import Engine
from dirl.model.checkpoint import load_pretrained
from dirl.rollout import SamplingParams, SamplingSpec
from dirl.train.optim import OptimConfig, build_optimizer, build_scheduler
from dirl.model.loading import load_model_spec
from dirl.train.rl.config import RLConfig, RolloutConfig
from dirl.train.rl.loop import build_run, train_rl
from dirl.train.rl.collect import PromptSampler, gather_batch
from dirl.train.rl.config import AlgoConfig
from dirl.train.rl.update import Learner, policy_update

REPO = Path(__file__).resolve().parents[1]
REWARD = {"rl_rewards:digit_fraction": 1.0}


def _cfg(out, **kw) -> RLConfig:
    rollout = RolloutConfig(num_prompts=2, group_size=4, sampling=SamplingSpec(max_new_tokens=8),
                            **kw.pop("rollout", {}))
    algo = AlgoConfig(**kw.pop("algo", {"beta": 0.01}))
    return RLConfig(model="init:tiny", out=str(out), rewards=dict(REWARD), max_steps=kw.pop("max_steps", 2),
                    optim=OptimConfig(lr=1e-3, schedule="constant"), rollout=rollout, algo=algo, **kw)


def _weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    model, _ = load_pretrained(run_dir / name)
    return model.state_dict()


def test_cli_three_steps_change_the_policy(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert cli_main(["rl", "--config", str(REPO / "configs/tiny-rl.yaml"), f"out={out}", "max_steps=3",
                     "rollout.sampling.max_new_tokens=16", "rewards.rl_rewards:digit_fraction=1.0",
                     "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("reward", "reward_std", "rewards/rl_rewards:digit_fraction/mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "entropy", "tokens_per_forward", "timing/rollout", "timing/reward",
                "timing/train", "timing/sync"):
        assert key in lines[0], key
    start, _ = load_model_spec("init:tiny", seed=0)
    final = _weights(out)
    changed = [k for k, v in start.state_dict().items() if not torch.equal(v, final[k])]
    assert len(changed) == len(final), f"unchanged: {set(final) - set(changed)}"


def test_reference_never_changes(tiny_model):
    ref = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    snapshot = {k: v.clone() for k, v in ref.state_dict().items()}
    params = SamplingParams(max_new_tokens=8, threshold=0.05, n=4, seed=0)
    optim_cfg = OptimConfig(lr=1e-2, schedule="constant")
    optimizer = build_optimizer(tiny_model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, 10)
    for step in range(2):
        rollouts = Engine(tiny_model).generate([[5, 6, 7], [8, 9]], params)
        rewards = torch.tensor([float(len(set(r.completion_ids))) for r in rollouts])
        adv = group_advantages(rewards, 4)
        learner = Learner(tiny_model, ref, optimizer, scheduler, optim_cfg, AlgoConfig(beta=0.1),
                          SamplingSpec(max_new_tokens=8))
        metrics = policy_update(learner, rollouts, adv, torch.Generator().manual_seed(step))
        assert metrics["optimizer_steps"] == 1
    assert metrics["kl"] > 0  # the policy moved away from the reference ...
    assert all(torch.equal(v, snapshot[k]) for k, v in ref.state_dict().items())  # ... which stayed put


def test_resume_is_exact(tmp_path):
    straight = train_rl(_cfg(tmp_path / "a", max_steps=4), progress=False)
    half = _cfg(tmp_path / "b", max_steps=2)
    train_rl(half, progress=False)
    resumed = train_rl(_cfg(tmp_path / "b", max_steps=4), resume=str(tmp_path / "b"), progress=False)
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(straight), read(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert (x["reward"], x["loss"], x["kl"]) == (y["reward"], y["loss"], y["kl"])
    wa, wb = _weights(straight), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_reload_backend_matches_native(tmp_path):
    native = train_rl(_cfg(tmp_path / "native"), progress=False)
    reload = train_rl(_cfg(tmp_path / "reload", rollout={"backend": "checkpoint"}), progress=False)
    wa, wb = _weights(native), _weights(reload)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    m = [json.loads(x) for x in (reload / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["timing/sync"] > 0


def test_every_estimator_runs_a_step(tmp_path):
    for name in ESTIMATORS:
        run = train_rl(_cfg(tmp_path / name, max_steps=1, algo={"estimator": name, "num_minibatches": 2}),
                       progress=False)
        metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        assert metrics["optimizer_steps"] == 2, name
        assert metrics["grad_norm"] > 0, name


def test_dynamic_sampling_keeps_exactly_the_informative_groups(tmp_path):
    """A reward that is constant on prompts with an even answer: dynamic sampling must drop
    exactly those groups, refill from the next prompts, and report the first round's share."""
    cfg = _cfg(tmp_path / "ds", max_steps=1, algo={"dynamic_sampling": True, "max_refill_rounds": 3})
    cfg.rewards = {"rl_rewards:informative_unless_even": 1.0}
    cfg.rollout.num_prompts = 4
    run = build_run(cfg)
    even = [int(row["answer"]) % 2 == 0 for row in run.collector.rows]
    first_round = PromptSampler(len(run.collector.rows), cfg.seed).take(4)
    batch, metrics = gather_batch(run.collector, step=0)
    drawn = PromptSampler(len(run.collector.rows), cfg.seed).take(run.collector.sampler.cursor)  # every prompt of every round
    informative = [i for i in drawn if not even[i]]
    assert any(even[i] for i in first_round) and len(drawn) > 4, "the seed must exercise a refill"
    assert metrics["frac_reward_zero_std"] == sum(even[i] for i in first_round) / 4
    assert len(informative) <= 4 and len(batch.rollouts) == 4 * len(informative)
    assert [r.prompt_ids for r in batch.rollouts[::4]] == [run.collector.prompt_ids[i] for i in informative]
    assert batch.positions == list(range(4 * len(informative)))
    assert torch.equal(batch.global_rewards(), torch.tensor([0, 1 / 3, 2 / 3, 1.0] * len(informative)))
    without = _cfg(tmp_path / "plain", max_steps=1)
    without.rewards, without.rollout.num_prompts = dict(cfg.rewards), 4
    plain, _ = gather_batch(build_run(without).collector, step=0)
    assert len(plain.rollouts) == 16  # without dynamic sampling every group stays


@pytest.mark.parametrize("estimator,agg", [("trace", "token_mean"), ("trace", "seq_mean_token_mean"),
                                           ("coupled", "constant"), ("trace_mc", "token_mean")])
def test_micro_batches_give_the_update_of_one_batch(tiny_model, estimator, agg):
    """K micro-batches by token budget == one batch: same gradient (fp32 <= 1e-6), same metrics."""
    params = SamplingParams(max_new_tokens=12, threshold=0.05, n=3, seed=0)
    rollouts = Engine(tiny_model).generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], params)
    adv = group_advantages(torch.tensor([float(len(set(r.completion_ids))) for r in rollouts]), 3)
    ref = copy.deepcopy(tiny_model).eval().requires_grad_(False)
    results = []
    for budget in (0, 40, 1):  # one micro-batch; a few rows each; one row each
        model = copy.deepcopy(tiny_model)
        optimizer = _GradRecorder(model.parameters())
        algo = AlgoConfig(estimator=estimator, agg=agg, beta=0.1, micro_batch_tokens=budget, num_minibatches=2)
        learner = Learner(model, ref, optimizer, None, OptimConfig(schedule="constant", grad_clip=0.0), algo,
                          SamplingSpec(max_new_tokens=12))
        metrics = policy_update(learner, rollouts, adv, torch.Generator().manual_seed(0))
        results.append((metrics, optimizer.grads))
    (one, grads_one), *others = results
    assert len(grads_one) == 2 * len(list(tiny_model.parameters()))  # two optimizer steps
    scale = max(1.0, max(float(g.abs().max()) for g in grads_one))  # trace_mc weighs tokens by stratum sizes
    for metrics, grads in others:
        assert max(float((a - b).abs().max()) for a, b in zip(grads_one, grads)) <= 1e-6 * scale
        for key in ("loss", "kl", "entropy", "ratio_mean"):
            assert metrics[key] == pytest.approx(one[key], abs=1e-6), key
    assert max(float(g.abs().max()) for g in grads_one) > 0


class _GradRecorder(torch.optim.SGD):
    """An optimizer that records the gradients it is stepped with and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads = []

    def step(self, closure=None):
        self.grads += [p.grad.clone() for group in self.param_groups for p in group["params"]]


def test_full_ft_reference_is_a_bf16_copy_under_bf16_mixed(tmp_path):
    """bf16-mixed: the reference is a bf16 copy (2 B / param), sharing no tensor with the fp32 policy,
    and it scores as the policy does under the same autocast (same bf16 matmul inputs)."""
    from dirl.train import precision
    from dirl.train.rl.loop import train_step
    cfg = _cfg(tmp_path / "run", compute=precision.ComputeConfig(precision="bf16-mixed"), device="cpu")
    run = build_run(cfg)
    ref, policy = run.learner.ref_model, run.learner.model
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert not {p.data_ptr() for p in ref.parameters()} & {p.data_ptr() for p in policy.parameters()}
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert ref_bytes == 2 * sum(p.numel() for p in policy.parameters())
    kl = train_step(run, 0)["kl"]  # scored before the first update: the reference is the policy
    assert 0 <= kl < 1e-3


def test_a_run_without_reward_variance_warns_once_and_plots(tmp_path, capsys):
    """A constant reward: every advantage is 0; after NO_VARIANCE_STEPS steps the run says so, once."""
    from dirl.train.models import RunInputs
    from dirl.train.rl.loop import NO_VARIANCE_STEPS
    cfg = _cfg(tmp_path / "run", max_steps=NO_VARIANCE_STEPS + 1, progress=False)
    run_dir = train_rl(cfg, inputs=RunInputs(reward_funcs={lambda completions, **kw: [1.0] * len(completions): 1.0}))
    err = capsys.readouterr().err
    assert err.count("no group had reward variance for 3 consecutive steps") == 1
    assert (run_dir / "curves.png").stat().st_size > 0
