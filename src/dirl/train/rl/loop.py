"""``dirl rl``: DiPO reinforcement learning (DiRL, Zhu et al. 2025) and its neighbours.

Set-up (:func:`build_run`, through the shared :func:`dirl.train.setup.setup`), then per step
(DESIGN §7, §8):
  1. sample P prompts (a seeded permutation with a saved cursor: exact resume);
  2. the rollout backend draws G responses each -- by default the engine running
     on the trainer's own parameters, so the last update is already visible;
  3. rewards (registry), group advantages, optional dynamic sampling;
  4. the policy update (:mod:`dirl.train.rl.update`) with the chosen estimator, and the
     value model's (:mod:`dirl.train.rl.critic`, ``algo.critic=value``);
  5. sync weights to the backend (free for ``native``), evaluate, log, checkpoint.

Steps 1-3 live in :mod:`dirl.train.rl.collect` (they read a
:class:`~dirl.train.rl.collect.Collector`), step 4 in :mod:`dirl.train.rl.update` (a
:class:`~dirl.train.rl.update.Learner`); each gets what it reads, never the whole run.

Data parallel (``torchrun``, :mod:`dirl.train.dist`): ``rollout.num_prompts`` is
global; how prompts are shared out is in :mod:`dirl.train.rl.collect`. The update
normalises by global counts (:mod:`dirl.train.rl.update`), metrics are reduced over
the ranks, and rank 0 alone logs and writes. Under
FSDP2 the rollout, the no-grad scoring and the eval run on weights gathered
once per phase (:func:`dirl.train.dist.full_params`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dirl import config as config_lib
from dirl.algo.advantages import group_advantages
from dirl.backends import make_backend
from dirl.backends.http import probe_server
from dirl.data import PromptIds, load_prompt_rows
from dirl.errors import UserError
from dirl.eval.heldout import EvalSpec, evaluate_rows, held_out_metrics
from dirl.rollout import check_sampling
from dirl.runtime import derived_seed, update_seed
from dirl.train import dist as dist_lib
from dirl.train import precision
from dirl.train.models import RunInputs, reference_model, set_block_size
from dirl.train.moe import reset_utilisation, utilisation_metrics
from dirl.train.optim import build_optimizer, build_scheduler
from dirl.train.rl.collect import Collector, PromptSampler, gather_batch, rollout_metrics
from dirl.train.rl.config import RLConfig, held_out_spec, parse_block_schedule, task_defaults
from dirl.train.rl.critic import Critic, build_critic
from dirl.train.rl.update import Learner, policy_update
from dirl.train.setup import Setup, run_scope, setup
from dirl.train.state import Trainable, load_checkpoint, resolve_resume, save_checkpoint, save_model_dir
from dirl.train.plots import plot_run
from dirl.train.tracking import MetricsLogger, format_metrics


def _check_block_sizes(cfg: RLConfig, model) -> None:
    """Every block size the run will use, checked against the model and the sampling settings
    before anything is decoded; the model keeps its own."""
    config = dist_lib.unwrap(model).config
    if config.arch.attention == "bidirectional":  # no block in the model: block_length is a sampling setting
        if cfg.block_size or cfg.block_size_schedule:
            raise UserError("block_size / block_size_schedule: a full-attention model has no block; "
                            "set rollout.sampling.block_length")
        check_sampling(cfg.rollout.sampling, config.arch, "rollout.sampling", config.arch.max_position_embeddings,
                       longest_prompt=1)
        return
    base, schedule = config.arch.block_size, parse_block_schedule(cfg.block_size_schedule)
    keyed = [("block_size_schedule", size) for _, size in schedule]
    if not schedule or schedule[0][0] > 0:  # the steps before the schedule's first entry
        keyed.insert(0, ("block_size", cfg.block_size))
    for key, size in keyed:
        set_block_size(model, size, cfg.lora, key)
        try:
            check_sampling(cfg.rollout.sampling, config.arch, "rollout.sampling",
                           config.arch.max_position_embeddings, longest_prompt=1)
        except UserError as err:
            raise UserError(f"{err} (with {key}={size})" if size else str(err)) from None
        config.block_size = base


@dataclass
class HeldOut:
    """Step 5's held-out eval: its rows and how they are decoded and scored."""

    rows: list[dict]
    spec: EvalSpec


@dataclass
class RLRun:
    """The parts of a run, each handed only to the step that reads it."""

    cfg: RLConfig
    run_dir: Path
    learner: Learner                  # step 4: policy (DDP / FSDP2 under torchrun), reference, optimizer, schedule
    collector: Collector              # steps 1-3: prompts, backend, rewards
    held_out: HeldOut                 # step 5
    critic: Critic | None = None      # step 4, algo.critic=value: the value model and its optimizer
    start_step: int = 0


def _build_learner(cfg: RLConfig, made: Setup) -> Learner:
    """Frozen reference (beta > 0), the wrapped policy, optimizer and schedule."""
    model, device = made.model, made.device
    mp_policy = precision.fsdp_policy(cfg.compute, device)
    ref_model = None
    if cfg.algo.beta > 0:  # the frozen reference is the starting policy, never updated
        ref_model = reference_model(model, cfg.lora, cfg.dist.strategy, device, mp_policy=mp_policy,
                                    dtype=precision.compute_dtype(cfg.compute, device))
    model = dist_lib.wrap(model, cfg.dist.strategy, device, mp_policy=mp_policy)
    optimizer = build_optimizer(dist_lib.unwrap(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps * cfg.algo.num_iterations
                                * cfg.algo.num_minibatches)
    return Learner(model, ref_model, optimizer, scheduler, cfg.optim, cfg.algo, cfg.rollout.sampling)


def build_run(cfg: RLConfig, resume: str | None = None, inputs: RunInputs | None = None) -> RLRun:
    """Set-up: policy, frozen reference, optimizer, data, backend; restored from ``resume``.

    ``inputs``: a Python caller's model object, rows and reward callables (``dirl.DiPOTrainer``);
    the held-out eval scores with the config's named rewards (or the task's)."""
    inputs = inputs or RunInputs()

    def prepare(device):  # bad names and data fail before the model loads
        if dist_lib.world_size() > 1 and cfg.rollout.backend != "native":
            raise ValueError(f"rollout.backend={cfg.rollout.backend!r}: only native runs under torchrun")
        if cfg.rollout.backend == "http":  # reachable, and it takes the key: before the model loads
            probe_server(cfg.rollout.http)
        template, rewards, eval_data = task_defaults(cfg)
        rows = load_prompt_rows(cfg.data if inputs.train_rows is None else inputs.train_rows, seed=cfg.seed)
        eval_rows = load_prompt_rows(eval_data, limit=cfg.eval.limit, seed=derived_seed(cfg.seed, "held_out")) if (
            cfg.eval.every and eval_data) else []
        return template, rewards, rows, eval_rows

    made = setup(cfg, inputs, prepare, backend=cfg.rollout.backend)
    template, rewards, rows, eval_rows = made.prepared
    learner, tokenizer = _build_learner(cfg, made), made.tokenizer
    _check_block_sizes(cfg, learner.model)
    critic = build_critic(dist_lib.unwrap(learner.model), cfg.algo, cfg.optim, cfg.lora.r)
    start_step, cursor = 0, 0
    if resume:
        state = load_checkpoint(resume, learner.model, learner.optimizer, learner.scheduler)
        start_step, cursor = state["step"], state["extra"]["prompt_cursor"]
        if critic is not None:
            critic.load_state_dict(state["extra"].get("critic"))
    set_block_size(learner.model, cfg.block_size_at(start_step), cfg.lora)  # before a backend copies the model
    runtime = {"decode_dtype": precision.compute_dtype(cfg.compute, made.device)} if (
        cfg.rollout.backend == "native") else {}
    backend = make_backend(cfg.rollout.backend, dist_lib.unwrap(learner.model), tokenizer,
                           cfg.rollout.backend_options(), **runtime)
    collector = Collector(cfg.rollout, cfg.algo, cfg.seed, tokenizer, backend, rows,
                          PromptIds(tokenizer, rows, template),  # tokenized as the sampler draws them
                          template, inputs.reward_funcs or rewards, PromptSampler(len(rows), cfg.seed, cursor),
                          first_step=start_step, context=dist_lib.unwrap(learner.model).arch.max_position_embeddings)
    run_dir = resolve_resume(resume).parent.parent if resume else Path(cfg.out)
    return RLRun(cfg, run_dir, learner, collector, HeldOut(eval_rows, held_out_spec(cfg)), critic, start_step)


def train_step(run: RLRun, step: int) -> dict:
    """Steps 1-5 of one RL step (every rank); returns the step's metrics (global)."""
    cfg, model, backend = run.cfg, run.learner.model, run.collector.backend
    if cfg.block_size_at(step) != cfg.block_size_at(step - 1):  # the schedule's next block size
        set_block_size(model, cfg.block_size_at(step))
        backend.sync_weights()  # the checkpoint backend reloads with it
    # 1-3. Prompts, rollouts, rewards (the backend already holds the latest weights).
    model.eval()
    if cfg.moe.log_utilisation:
        reset_utilisation(dist_lib.unwrap(model))  # count this step's rollouts only
    with dist_lib.full_params(model):
        batch, metrics = gather_batch(run.collector, step)
    if cfg.moe.log_utilisation:
        metrics.update(utilisation_metrics(dist_lib.unwrap(model)))
    all_rewards = batch.global_rewards()
    metrics.update(rollout_metrics(batch.rollouts, all_rewards))
    # 3-4. Advantages, the policy update (and the value model's).
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
    # 5. Weight sync: free for the native backend, a real save + reload for `checkpoint`.
    t0 = time.perf_counter()
    backend.sync_weights()
    metrics["timing/sync"] = time.perf_counter() - t0
    metrics["learning_rate"] = run.learner.scheduler.get_last_lr()[0]
    # 5. Held-out eval: rank 0, on the full weights.
    done = step + 1
    if cfg.eval.every and run.held_out.rows and (done % cfg.eval.every == 0 or done == cfg.max_steps):
        with dist_lib.full_params(model):
            if dist_lib.is_main():
                summary, _ = evaluate_rows(dist_lib.unwrap(model), run.collector.tokenizer, run.held_out.rows,
                                           run.held_out.spec)
                metrics.update(held_out_metrics(summary))
    return metrics


def train_rl(cfg: RLConfig, resume: str | None = None, progress: bool | None = None,
             inputs: RunInputs | None = None) -> Path:
    """Run DiPO (or another estimator) up to ``cfg.max_steps`` steps (``stop_at_step`` ends this
    invocation early); return the run directory. ``progress`` None: ``cfg.progress``.

    Under torchrun every rank calls it; rank 0 logs and writes. ``inputs``: what a Python
    caller gives besides the config (``dirl.DiPOTrainer``)."""
    with run_scope(cfg, resume):
        # The run lives only inside _train_rl, so nothing holds the group at teardown.
        return _train_rl(cfg, resume, cfg.progress if progress is None else progress, inputs or RunInputs())


def _train_rl(cfg: RLConfig, resume: str | None, progress: bool, inputs: RunInputs) -> Path:
    run = build_run(cfg, resume, inputs)
    learner, tokenizer, main = run.learner, run.collector.tokenizer, dist_lib.is_main()
    logger = MetricsLogger(run.run_dir, enabled=main, resume_step=run.start_step if resume else None,
                           report_to=cfg.report_to, config=config_lib.to_dict(cfg))
    last_step = cfg.last_step()
    bar = tqdm(range(run.start_step, last_step), desc="rl", disable=not (progress and main),
               initial=run.start_step, total=cfg.max_steps)
    streak, warned = 0, False  # consecutive steps in which no group had reward variance
    for step in bar:
        metrics = train_step(run, step)
        done = step + 1
        streak = streak + 1 if metrics.get("frac_reward_zero_std", 0.0) >= 1.0 else 0
        if main and streak >= NO_VARIANCE_STEPS and not warned:  # once per run
            tqdm.write(no_variance_warning(streak, metrics), file=sys.stderr)
            warned = True
        if main:
            logger.log(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}")
            if cfg.log_every and done % cfg.log_every == 0:
                tqdm.write(f"step {done}: " + format_metrics({k: metrics[k] for k in _CONSOLE_KEYS
                                                              if k in metrics}))
            inputs.callbacks.on_step_end(done, metrics)
        if (cfg.save_every and done % cfg.save_every == 0) or done == last_step:
            trainable = Trainable(learner.model, tokenizer, learner.optimizer, learner.scheduler)
            extra = {"prompt_cursor": run.collector.sampler.cursor,
                     **({"critic": run.critic.state_dict()} if run.critic else {})}
            path = save_checkpoint(run.run_dir, done, trainable, extra, cfg, keep_last=cfg.keep_last)
            if main:
                inputs.callbacks.on_save(done, path)
    if last_step >= cfg.max_steps:
        save_model_dir(learner.model, tokenizer, run.run_dir / "final")
    bar.close()
    run.collector.backend.close()
    logger.close()
    if main:
        plot_run(run.run_dir, "rl")
    return run.run_dir


NO_VARIANCE_STEPS = 3  # consecutive steps without reward variance before the (one) warning


def no_variance_warning(steps: int, metrics: dict) -> str:
    """Why the policy is not moving: every group's rewards were equal, so every advantage is 0."""
    clipped = metrics.get("completions/clipped_ratio", 0.0)
    hint = (f"{clipped:.0%} of the completions hit rollout.sampling.max_new_tokens: raise it"
            if clipped > 0.5 else "raise rollout.sampling.temperature or rollout.group_size, or check the reward")
    return (f"dirl rl: warning: no group had reward variance for {steps} consecutive steps (frac_reward_zero_std=1, "
            f"reward={metrics.get('reward', 0.0):.3g}): every advantage is 0 and the policy does not move; {hint}")


_CONSOLE_KEYS = ("reward", "reward_std", "kl", "loss", "entropy", "grad_norm", "completions/mean_length",
                 "tokens_per_forward", "eval/accuracy", "timing/rollout", "timing/train")
