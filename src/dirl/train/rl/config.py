"""``dirl rl``'s configuration, in one place: the shared :class:`~dirl.train.config.TrainerConfig`
plus the prompts and rewards, the rollouts (:class:`RolloutConfig`, each backend's own typed
options) and the policy update (:class:`AlgoConfig`); and the run's task-derived defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from dirl.algo.advantages import ADVANTAGE_MODES
from dirl.algo.critic import CRITICS, ValueConfig
from dirl.algo.likelihood import ESTIMATORS, MC_SAMPLING, EstimatorOptions
from dirl.algo.losses import AGGREGATIONS, LossConfig
from dirl.backends.base import BACKENDS
from dirl.backends.options import CheckpointOptions, HttpOptions, NativeOptions, unused_options
from dirl.data import task_of
from dirl.errors import (FINITE_NON_NEGATIVE, NON_NEGATIVE, OPEN_UNIT_INTERVAL, POSITIVE, FieldError, check_fields,
                         one_of)
from dirl.eval.heldout import EvalSpec, greedy
from dirl.rewards import format_reward_spec, get_reward
from dirl.rollout import SamplingSpec
from dirl.train import hf_names
from dirl.train.config import TrainerConfig, trainer_defaults
from dirl.train.hf_names import accept_hf_names
from dirl.train.optim import OptimConfig


def _rollout_sampling() -> SamplingSpec:
    return SamplingSpec(max_new_tokens=32, temperature=1.0)


# The KL weight: above 1000 the policy cannot move (2**64 trained nothing, exit 0).
KL_WEIGHT = (lambda v: 0 <= v <= 1000, "a finite number in [0, 1000]")
MAX_ROLLOUTS_PER_STEP = 1 << 20  # num_prompts x group_size: 10**9 would be one engine call of 10**9 rows

@dataclass
class RolloutConfig:
    """Where and how the rollouts of a step are drawn. Only the chosen backend's section may be
    set: an option of another backend is an error naming it (it would have no effect)."""

    backend: str = "native"           # native | checkpoint (the reload loop, for measurement) | http
    num_prompts: int = 8              # P prompts per step (over all ranks)
    group_size: int = 8               # G samples per prompt
    sampling: SamplingSpec = field(default_factory=_rollout_sampling)  # also the update's PolicyDist
    native: NativeOptions = field(default_factory=NativeOptions)              # compile, max_batch_rows
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)  # + workdir
    http: HttpOptions = field(default_factory=HttpOptions)                    # url, api_key_env, timeout ...

    def __post_init__(self) -> None:
        check_fields(self, {"backend": one_of(*BACKENDS), "num_prompts": POSITIVE, "group_size": POSITIVE})
        if self.num_prompts * self.group_size > MAX_ROLLOUTS_PER_STEP:
            raise FieldError("group_size", f"x num_prompts = {self.num_prompts * self.group_size:,} rollouts per step; "
                             f"at most {MAX_ROLLOUTS_PER_STEP:,}")
        unused = unused_options(self.backend, {"native": self.native, "checkpoint": self.checkpoint,
                                               "http": self.http})
        if unused:
            raise FieldError(unused[0], f"is set, but rollout.backend={self.backend} does not use it "
                             f"(only rollout.{self.backend}.* applies)")

    def backend_options(self):
        """The chosen backend's options."""
        return getattr(self, self.backend)


@dataclass
class AlgoConfig(LossConfig, EstimatorOptions):
    """The estimator, advantages, dynamic sampling and PPO schedule, plus the loss's settings
    (clip_low, clip_high, beta, agg: :class:`~dirl.algo.losses.LossConfig`) and the estimators'
    (shrink, mc_steps, mc_sampling, mc_floor: :class:`~dirl.algo.likelihood.EstimatorOptions`)."""

    estimator: str = "trace"          # trace | trace_shrink | trace_mc | random_mask | coupled | mean_field
    adv_mode: str = "zscore"          # zscore | mean | loo
    dynamic_sampling: bool = False    # drop groups with equal rewards and refill from more prompts
    max_refill_rounds: int = 3
    num_iterations: int = 1           # PPO epochs per rollout batch
    num_minibatches: int = 1          # optimizer steps per epoch
    micro_batch_tokens: int = 8192    # packed tokens scored per forward/backward (0 = the whole mini-batch)
    critic: str = "none"              # none | value: TraceRL's value model, GAE advantages (dirl.train.rl.critic)
    value: ValueConfig = field(default_factory=ValueConfig)  # the value model's lr, clip, gamma, lam, outcome

    def __post_init__(self) -> None:
        check_fields(self, {
            "estimator": one_of(*ESTIMATORS), "adv_mode": one_of(*ADVANTAGE_MODES), "agg": one_of(*AGGREGATIONS),
            "critic": one_of(*CRITICS),
            "shrink": POSITIVE, "mc_steps": POSITIVE, "mc_sampling": one_of(*MC_SAMPLING),
            "mc_floor": OPEN_UNIT_INTERVAL, "max_refill_rounds": NON_NEGATIVE,
            "clip_low": FINITE_NON_NEGATIVE, "clip_high": FINITE_NON_NEGATIVE, "beta": KL_WEIGHT,
            "num_iterations": POSITIVE, "num_minibatches": POSITIVE})


@accept_hf_names(hf_names.RL, hf_names.RL_REFUSED)
@dataclass
@trainer_defaults(out="runs/rl", max_steps=20, log_every=1, save_every=0,
                  optim=OptimConfig(lr=1e-5, schedule="constant", grad_clip=1.0))
class RLConfig(TrainerConfig):
    moved_keys: ClassVar[dict[str, str]] = {
        **TrainerConfig.moved_keys, "rollout.url": "rollout.http.url", "rollout.api_key_env": "rollout.http.api_key_env",
        "rollout.max_batch_rows": "rollout.native.max_batch_rows", "rollout.compile": "rollout.native.compile"}

    block_size_schedule: str = ""     # "0:4,100:8": B 4 from step 0, B 8 from step 100 (before: block_size)
    data: str = "task:arithmetic"     # prompt source: task:<name>[:split], .jsonl, .parquet, datasets dir
    prompt_template: str = ""         # default: the task's template, else dirl_math
    rewards: dict[str, float] = field(default_factory=dict)  # default: the task's reward, else {"math": 1}
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, weight in self.rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise FieldError(f"rewards.{name}", f"must be a finite number, got {weight!r}")
        if self.optim.grad_accum != 1:
            raise FieldError("optim.grad_accum", f"is {self.optim.grad_accum}, but RL accumulates gradients over "
                             "micro-batches of algo.micro_batch_tokens packed tokens (one optimizer step per "
                             "mini-batch, algo.num_minibatches per epoch); leave it at 1")
        parse_block_schedule(self.block_size_schedule)  # a bad schedule fails at load, naming the key
        if self.rollout.backend == "http" and (self.block_size or self.block_size_schedule):
            raise FieldError("block_size", "cannot change with rollout.backend=http: the server decodes with its "
                             "checkpoint's block size (serve a checkpoint saved with the new one)")

    def block_size_at(self, step: int) -> int | None:
        """The block size of (0-based) ``step``: the schedule's latest entry, else ``block_size``."""
        sizes = [size for start, size in parse_block_schedule(self.block_size_schedule) if start <= step]
        return sizes[-1] if sizes else self.block_size


def parse_block_schedule(text: str) -> list[tuple[int, int]]:
    """``"0:4,100:8"`` -> ``[(0, 4), (100, 8)]``: (first step, block size), steps increasing.

    TraceRL's curriculum grows the block size step by step; an entry holds until the next."""
    try:
        pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = [()]
    starts = [p[0] for p in pairs if len(p) == 2]
    if len(starts) < len(pairs) or any(p[0] < 0 or p[1] < 1 for p in pairs) or starts != sorted(set(starts)):
        raise FieldError("block_size_schedule", f"must look like '0:4,100:8' (step:block_size, steps >= 0 and "
                         f"increasing, block sizes >= 1), got {text!r}")
    return pairs


def task_defaults(cfg: RLConfig) -> tuple[str, dict[str, float], str]:
    """Template, rewards and held-out source (the config's, else the task's, else math's); every
    reward name is resolved here, so a typo fails before anything is loaded."""
    task = task_of(cfg.data)
    template = cfg.prompt_template or (task.prompt_template if task else "dirl_math")
    rewards = dict(cfg.rewards) or ({task.reward: 1.0} if task else {"math": 1.0})
    for name in rewards:
        get_reward(name)
    eval_data = cfg.eval.data or (f"task:{task.name}:test" if task else "")
    return template, rewards, eval_data


def held_out_spec(cfg: RLConfig, batch_size: int = 32) -> EvalSpec:
    """The held-out eval of an RL run (and of the demo): greedy, else decoded as the rollouts."""
    template, rewards, _ = task_defaults(cfg)
    return EvalSpec(reward=format_reward_spec(rewards), prompt_template=template, seed=cfg.seed,
                    batch_size=batch_size, sampling=greedy(cfg.rollout.sampling))
