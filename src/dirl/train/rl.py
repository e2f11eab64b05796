"""``dirl rl``: DiPO reinforcement learning (DiRL, Zhu et al. 2025) and its neighbours.

One step (DESIGN §7, §8):
  1. sample P prompts (a seeded permutation with a saved cursor: exact resume);
  2. the rollout backend draws G responses each -- by default the engine running
     on the trainer's own parameters, so the last update is already visible;
  3. rewards (registry), group advantages, optional dynamic sampling;
  4. the policy update (:mod:`dirl.train.rl_update`) with the chosen estimator;
  5. sync weights to the backend (free for ``native``), log, evaluate, checkpoint.

Steps 1-3 live in :mod:`dirl.train.rl_rollouts`, step 4 in :mod:`dirl.train.rl_update`;
each takes the run (or its :class:`~dirl.train.rl_update.Learner`), not its fields.

Data parallel (``torchrun``, :mod:`dirl.train.dist`): ``rollout.num_prompts`` is
global; how prompts are shared out is in :mod:`dirl.train.rl_rollouts`. The update
normalises by global counts (:mod:`dirl.train.rl_update`), metrics are reduced over
the ranks, and rank 0 alone logs and writes. Under
FSDP2 the rollout, the no-grad scoring and the eval run on weights gathered
once per phase (:func:`dirl.train.dist.full_params`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dirl import config as config_lib
from dirl.algo.advantages import group_advantages
from dirl.backends import make_backend
from dirl.backends.base import BACKENDS
from dirl.backends.evaluate import EvalSpec, evaluate_rows, greedy, held_out_metrics
from dirl.data import PromptIds, load_prompt_rows, task_of
from dirl.errors import NON_NEGATIVE, POSITIVE, FieldError, UserError, check_fields, one_of
from dirl.model.lora import LoraConfig
from dirl.rewards import format_reward_spec, get_reward
from dirl.rollout import EngineOptions, SamplingSpec, check_sampling
from dirl.runtime import derived_seed, resolve_device, update_seed
from dirl.train import dist as dist_lib
from dirl.train.common import MetricsLogger, OptimConfig, build_optimizer, build_scheduler, format_metrics, set_seed
from dirl.train import precision
from dirl.train.models import RunInputs, check_lora, reference_model, resolve_model, set_block_size
from dirl.train.precision import ComputeConfig
from dirl.train.rl_critic import Critic, build_critic
from dirl.train.rl_rollouts import PromptSampler, gather_batch, rollout_metrics
from dirl.train.rl_update import AlgoConfig, Learner, policy_update
from dirl.train.state import (Trainable, load_checkpoint, prepare_run_dir, resolve_resume, save_checkpoint,
                              save_model_dir)
from dirl.train.tracking import check_report_to


def _rollout_sampling() -> SamplingSpec:
    return SamplingSpec(max_new_tokens=32, temperature=1.0)


@dataclass
class RolloutConfig(EngineOptions):  # + compile (native and checkpoint backends)
    backend: str = "native"           # native | checkpoint (the reload loop, for measurement) | http
    url: str = ""                     # http: base URL of `dirl serve`
    api_key_env: str = "DIRL_API_KEY"
    num_prompts: int = 8              # P prompts per step (over all ranks)
    group_size: int = 8               # G samples per prompt
    sampling: SamplingSpec = field(default_factory=_rollout_sampling)  # also the update's PolicyDist
    max_batch_rows: int = 256

    def __post_init__(self) -> None:
        check_fields(self, {"backend": one_of(*BACKENDS), "num_prompts": POSITIVE, "group_size": POSITIVE,
                            "max_batch_rows": POSITIVE})


@dataclass
class RLConfig:
    model: str = "init:tiny"          # checkpoint dir (or init:<preset> for a random model)
    block_size: int | None = None     # decode / score / save with this block size; null = the model's
    block_size_schedule: str = ""     # "0:4,100:8": B 4 from step 0, B 8 from step 100 (before: block_size)
    out: str = "runs/rl"
    data: str = "task:arithmetic"     # prompt source: task:<name>[:split], .jsonl, .parquet, datasets dir
    prompt_template: str = ""         # default: the task's template, else dirl_math
    rewards: dict[str, float] = field(default_factory=dict)  # default: the task's reward, else {"math": 1}
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + wandb
    max_steps: int = 20
    seed: int = 0
    device: str = "cpu"
    compute: ComputeConfig = field(default_factory=ComputeConfig)  # precision, checkpointing, head chunks
    attn_impl: str = "sdpa"
    log_every: int = 1
    save_every: int = 0               # 0 = only at the end
    eval_every: int = 0               # 0 = never; else held-out accuracy on eval_data
    eval_data: str = ""               # default: the task's test split
    eval_limit: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", grad_clip=1.0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    dist: dist_lib.DistConfig = field(default_factory=dist_lib.DistConfig)  # torchrun only
    lora: LoraConfig = field(default_factory=LoraConfig)  # r > 0: train adapters, reference = base
    overwrite: bool = False           # a fresh run may replace a run already in `out`

    def __post_init__(self) -> None:
        check_fields(self, {"block_size": POSITIVE, "max_steps": POSITIVE, "log_every": NON_NEGATIVE,
                            "save_every": NON_NEGATIVE, "eval_every": NON_NEGATIVE, "eval_limit": POSITIVE})
        for name, weight in self.rewards.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise FieldError(f"rewards.{name}", f"must be a finite number, got {weight!r}")
        if self.optim.grad_accum != 1:
            raise FieldError("optim.grad_accum", f"is {self.optim.grad_accum}, but RL accumulates gradients over "
                             "micro-batches of algo.micro_batch_tokens packed tokens (one optimizer step per "
                             "mini-batch, algo.num_minibatches per epoch); leave it at 1")
        check_report_to(self.report_to)
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


def _check_block_sizes(cfg: RLConfig, model) -> None:
    """Every block size the run will use, checked against the model and the sampling settings
    before anything is decoded; the model keeps its own."""
    config = dist_lib.unwrap(model).config
    base, schedule = config.block_size, parse_block_schedule(cfg.block_size_schedule)
    keyed = [("block_size_schedule", size) for _, size in schedule]
    if not schedule or schedule[0][0] > 0:  # the steps before the schedule's first entry
        keyed.insert(0, ("block_size", cfg.block_size))
    for key, size in keyed:
        set_block_size(model, size, cfg.lora, key)
        try:
            check_sampling(cfg.rollout.sampling, config.block_size, "rollout.sampling")
        except UserError as err:
            raise UserError(f"{err} (with {key}={size})" if size else str(err)) from None
        config.block_size = base


def _task_defaults(cfg: RLConfig) -> tuple[str, dict[str, float], str]:
    """Template, rewards and held-out source (the config's, else the task's, else math's); every
    reward name is resolved here, so a typo fails before anything is loaded."""
    task = task_of(cfg.data)
    template = cfg.prompt_template or (task.prompt_template if task else "dirl_math")
    rewards = dict(cfg.rewards) or ({task.reward: 1.0} if task else {"math": 1.0})
    for name in rewards:
        get_reward(name)
    eval_data = cfg.eval_data or (f"task:{task.name}:test" if task else "")
    return template, rewards, eval_data


def held_out_spec(cfg: RLConfig, batch_size: int = 32) -> EvalSpec:
    """The held-out eval of an RL run (and of the demo): greedy, else decoded as the rollouts."""
    template, rewards, _ = _task_defaults(cfg)
    return EvalSpec(reward=format_reward_spec(rewards), prompt_template=template, seed=cfg.seed,
                    batch_size=batch_size, sampling=greedy(cfg.rollout.sampling))


@dataclass
class RLRun:
    """Everything the RL loop uses, built by :func:`build_run`."""

    cfg: RLConfig
    run_dir: Path
    learner: Learner                  # policy (DDP / FSDP2 under torchrun), reference, optimizer, schedule
    tokenizer: object
    rows: list[dict]
    prompt_ids: Sequence[list[int]]   # PromptIds: row i tokenized when first drawn
    template: str                     # renders a row's question (prompt ids; a TRL reward's ``prompts``)
    rewards: dict                     # {name or callable: weight} of the rollouts' reward
    sampler: PromptSampler
    backend: object
    eval_rows: list[dict]
    eval_spec: EvalSpec
    start_step: int = 0
    critic: Critic | None = None      # algo.critic=value: the value model and its optimizer


def _build_learner(cfg: RLConfig, device: torch.device, inputs: RunInputs) -> tuple[Learner, object]:
    """Policy, frozen reference (beta > 0), optimizer and schedule. -> (learner, tokenizer)."""
    check_lora(cfg.lora, cfg.dist.strategy, cfg.rollout.backend)
    model, tokenizer = resolve_model(cfg.model, inputs, device, precision.load_dtype(cfg.compute, device, cfg.lora),
                                     cfg.seed, lora=cfg.lora)
    inputs.model, inputs.tokenizer = model, tokenizer  # the caller's handle on what is trained
    model.attn_impl = cfg.attn_impl
    precision.configure(model, cfg.compute)
    mp_policy = precision.fsdp_policy(cfg.compute, device)
    ref_model = None
    if cfg.algo.beta > 0:  # the frozen reference is the starting policy, never updated
        ref_model = reference_model(model, cfg.lora, cfg.dist.strategy, device, mp_policy=mp_policy)
    model = dist_lib.wrap(model, cfg.dist.strategy, device, mp_policy=mp_policy)
    optimizer = build_optimizer(dist_lib.unwrap(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps * cfg.algo.num_iterations
                                * cfg.algo.num_minibatches)
    return Learner(model, ref_model, optimizer, scheduler, cfg.optim, cfg.algo, cfg.rollout.sampling), tokenizer


def build_run(cfg: RLConfig, resume: str | None = None, inputs: RunInputs | None = None) -> RLRun:
    """1. Set-up: policy, frozen reference, optimizer, data, backend; restored from ``resume``.

    ``inputs``: a Python caller's model object, rows and reward callables (``dirl.DiPOTrainer``);
    the held-out eval scores with the config's named rewards (or the task's)."""
    inputs = inputs or RunInputs()
    set_seed(cfg.seed)
    device = dist_lib.local_device(resolve_device(cfg.device))
    dist_lib.init_from_env(cfg.dist, device)
    if dist_lib.world_size() > 1 and cfg.rollout.backend != "native":
        raise ValueError(f"rollout.backend={cfg.rollout.backend!r}: only native runs under torchrun")
    template, rewards, eval_data = _task_defaults(cfg)  # bad names and data fail before the model loads
    rows = load_prompt_rows(cfg.data if inputs.train_rows is None else inputs.train_rows, seed=cfg.seed)
    eval_rows = load_prompt_rows(eval_data, limit=cfg.eval_limit, seed=derived_seed(cfg.seed, "held_out")) if (
        cfg.eval_every and eval_data) else []
    learner, tokenizer = _build_learner(cfg, device, inputs)
    _check_block_sizes(cfg, learner.model)
    prompt_ids = PromptIds(tokenizer, rows, template)  # tokenized as the sampler draws them
    critic = build_critic(dist_lib.unwrap(learner.model), cfg.algo, cfg.optim, cfg.lora.r)
    start_step, cursor = 0, 0
    if resume:
        state = load_checkpoint(resume, learner.model, learner.optimizer, learner.scheduler)
        start_step, cursor = state["step"], state["extra"]["prompt_cursor"]
        if critic is not None:
            critic.load_state_dict(state["extra"].get("critic"))
    set_block_size(learner.model, cfg.block_size_at(start_step), cfg.lora)  # before a backend copies the model
    backend = make_backend(cfg.rollout.backend, dist_lib.unwrap(learner.model), tokenizer, url=cfg.rollout.url,
                           api_key_env=cfg.rollout.api_key_env, max_batch_rows=cfg.rollout.max_batch_rows,
                           compile=cfg.rollout.compile,
                           decode_dtype=precision.compute_dtype(cfg.compute, device))
    run_dir = resolve_resume(resume).parent.parent if resume else Path(cfg.out)
    return RLRun(cfg, run_dir, learner, tokenizer, rows, prompt_ids, template, inputs.reward_funcs or rewards,
                 PromptSampler(len(rows), cfg.seed, cursor), backend, eval_rows, held_out_spec(cfg), start_step,
                 critic)


def train_step(run: RLRun, step: int) -> dict:
    """Steps 2-5 of one RL step (every rank); returns the step's metrics (global)."""
    cfg, model = run.cfg, run.learner.model
    if cfg.block_size_at(step) != cfg.block_size_at(step - 1):  # the schedule's next block size
        set_block_size(model, cfg.block_size_at(step))
        run.backend.sync_weights()  # the checkpoint backend reloads with it
    # 2. Rollouts and rewards (the backend already holds the latest weights).
    model.eval()
    with dist_lib.full_params(model):
        batch, metrics = gather_batch(run, step)
    all_rewards = batch.global_rewards()
    metrics.update(rollout_metrics(batch.rollouts, all_rewards))
    # 3. Advantages and the policy update.
    t0 = time.perf_counter()
    model.train()
    if all_rewards.numel():
        local = batch.local_rewards()
        adv = group_advantages(local, cfg.rollout.group_size, cfg.algo.adv_mode) if local.numel() else local
        gen = torch.Generator().manual_seed(update_seed(cfg.seed, step, dist_lib.rank()))
        with precision.autocast(cfg.compute, next(model.parameters()).device, sharded=dist_lib.is_sharded(model)):
            value_batch = run.critic.advantages(batch.rollouts, local, adv) if run.critic else None
            metrics.update(policy_update(run.learner, batch.rollouts, adv if value_batch is None else value_batch.adv,
                                         gen, positions=batch.positions, total=all_rewards.numel()))
            if value_batch is not None:
                metrics.update(run.critic.update(value_batch))
    metrics["timing/train"] = time.perf_counter() - t0
    # 4. Weight sync: free for the native backend, a real save + reload for `checkpoint`.
    t0 = time.perf_counter()
    run.backend.sync_weights()
    metrics["timing/sync"] = time.perf_counter() - t0
    metrics["learning_rate"] = run.learner.scheduler.get_last_lr()[0]
    # 5. Held-out eval: rank 0, on the full weights.
    done = step + 1
    if cfg.eval_every and run.eval_rows and (done % cfg.eval_every == 0 or done == cfg.max_steps):
        with dist_lib.full_params(model):
            if dist_lib.is_main():
                summary, _ = evaluate_rows(dist_lib.unwrap(model), run.tokenizer, run.eval_rows, run.eval_spec)
                metrics.update(held_out_metrics(summary))
    return metrics


def train_rl(cfg: RLConfig, resume: str | None = None, progress: bool = True,
             inputs: RunInputs | None = None) -> Path:
    """Run DiPO (or another estimator) for ``cfg.max_steps`` steps; return the run directory.

    Under torchrun every rank calls it; rank 0 logs and writes. ``inputs``: what a Python
    caller gives besides the config (``dirl.DiPOTrainer``)."""
    run_dir = resolve_resume(resume).parent.parent if resume else Path(cfg.out)
    prepare_run_dir(run_dir, resumed=bool(resume), overwrite=cfg.overwrite)  # before anything is loaded
    with dist_lib.process_group(cfg.dist, resolve_device(cfg.device)):
        # The run lives only inside _train_rl, so nothing holds the group at teardown.
        return _train_rl(cfg, resume, progress, inputs or RunInputs())


def _train_rl(cfg: RLConfig, resume: str | None, progress: bool, inputs: RunInputs) -> Path:
    run = build_run(cfg, resume, inputs)
    learner, main = run.learner, dist_lib.is_main()
    logger = MetricsLogger(run.run_dir, enabled=main, resume_step=run.start_step if resume else None,
                           report_to=cfg.report_to, config=config_lib.to_dict(cfg))
    bar = tqdm(range(run.start_step, cfg.max_steps), desc="rl", disable=not (progress and main),
               initial=run.start_step, total=cfg.max_steps)
    for step in bar:
        metrics = train_step(run, step)
        done = step + 1
        if main:
            logger.log(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}")
            if cfg.log_every and done % cfg.log_every == 0:
                tqdm.write(f"step {done}: " + format_metrics({k: metrics[k] for k in _CONSOLE_KEYS
                                                              if k in metrics}))
            inputs.callbacks.on_step_end(done, metrics)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            trainable = Trainable(learner.model, run.tokenizer, learner.optimizer, learner.scheduler)
            extra = {"prompt_cursor": run.sampler.cursor, **({"critic": run.critic.state_dict()} if run.critic else {})}
            path = save_checkpoint(run.run_dir, done, trainable, extra, cfg)
            if main:
                inputs.callbacks.on_save(done, path)
    save_model_dir(learner.model, run.tokenizer, run.run_dir / "final")
    bar.close()
    run.backend.close()
    logger.close()
    return run.run_dir


_CONSOLE_KEYS = ("reward", "reward_std", "kl", "loss", "entropy", "grad_norm", "completions/mean_length",
                 "tokens_per_forward", "eval/accuracy", "timing/rollout", "timing/train")
