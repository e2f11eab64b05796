"""``dirl rl``: DiPO reinforcement learning (DiRL, Zhu et al. 2025) and its neighbours.

One step (DESIGN §7, §8):
  1. sample P prompts (a seeded permutation with a saved cursor: exact resume);
  2. the rollout backend draws G responses each -- by default the engine running
     on the trainer's own parameters, so the last update is already visible;
  3. rewards (registry), group advantages, optional dynamic sampling;
  4. the policy update (:mod:`dirl.train.rl_update`) with the chosen estimator;
  5. sync weights to the backend (free for ``native``), log, evaluate, checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dirl.algo.advantages import group_advantages, informative_groups
from dirl.algo.likelihood import PolicyDist
from dirl.backends import make_backend
from dirl.data import get_task, load_prompt_rows
from dirl.engine.engine import SamplingParams
from dirl.rewards import compute_rewards
from dirl.train.common import (MetricsLogger, OptimConfig, build_optimizer, build_scheduler, format_metrics,
                               set_seed)
from dirl.eval.evaluate import build_prompts
from dirl.model.checkpoint import save_pretrained
from dirl.train.models import load_model_spec
from dirl.train.rl_update import AlgoConfig, policy_update
from dirl.train.state import load_checkpoint, save_checkpoint


@dataclass
class RolloutConfig:
    backend: str = "native"           # native | checkpoint (the reload loop, for measurement) | http
    url: str = ""                     # http: base URL of `dirl serve`
    api_key_env: str = "DIRL_API_KEY"
    num_prompts: int = 8              # P prompts per step
    group_size: int = 8               # G samples per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    unmasking: str = "dynamic"
    threshold: float = 0.9
    steps_per_block: int = 4
    max_batch_rows: int = 256


@dataclass
class RLConfig:
    model: str = "init:tiny"          # checkpoint dir (or init:<preset> for a random model)
    out: str = "runs/rl"
    data: str = "task:arithmetic"     # prompt source: task:<name>[:split], .jsonl, .parquet, datasets dir
    prompt_template: str = ""         # default: the task's template, else dirl_math
    rewards: dict[str, float] = field(default_factory=dict)  # default: the task's reward, else {"math": 1}
    max_steps: int = 20
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    attn_impl: str = "sdpa"
    log_every: int = 1
    save_every: int = 0               # 0 = only at the end
    eval_every: int = 0               # 0 = never; else held-out accuracy on eval_data
    eval_data: str = ""               # default: the task's test split
    eval_limit: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", grad_clip=1.0))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)


class PromptSampler:
    """Epochs of seeded permutations over the rows; the cursor is saved for exact resume."""

    def __init__(self, num_rows: int, seed: int, cursor: int = 0):
        self.num_rows, self.seed, self.cursor = num_rows, seed, cursor

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.cursor, self.num_rows)
            perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(perm[offset]))
            self.cursor += 1
        return out


def _task_defaults(cfg: RLConfig) -> tuple[str, dict[str, float], str]:
    task = get_task(cfg.data.split(":")[1]) if cfg.data.startswith("task:") else None
    template = cfg.prompt_template or (task.prompt_template if task else "dirl_math")
    rewards = dict(cfg.rewards) or ({task.reward: 1.0} if task else {"math": 1.0})
    eval_data = cfg.eval_data or (f"task:{task.name}:test" if task else "")
    return template, rewards, eval_data


def _sampling(cfg: RLConfig, stop_ids: list[int]) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k,
                          top_p=r.top_p, unmasking=r.unmasking, threshold=r.threshold,
                          steps_per_block=r.steps_per_block, stop_ids=stop_ids, n=r.group_size)


def collect(backend, tokenizer, rows, prompt_ids, indices, cfg: RLConfig, rewards, step: int):
    """Roll out G samples for each prompt index and score them. -> (rollouts, reward tensor, metrics)."""
    params = _sampling(cfg, tokenizer.stop_ids())
    seeds = [cfg.seed * 1_000_003 + step * 9973 + i for i in indices]
    t0 = time.perf_counter()
    rollouts = backend.generate([prompt_ids[i] for i in indices], params, seeds)
    t1 = time.perf_counter()
    texts = [tokenizer.decode(r.completion_ids) for r in rollouts]
    group = cfg.rollout.group_size
    columns = {key: [rows[i][key] for i in indices for _ in range(group)] for key in rows[indices[0]]}
    result = compute_rewards(rewards, texts, columns)
    metrics = {"timing/rollout": t1 - t0, "timing/reward": time.perf_counter() - t1, **result.metrics}
    return rollouts, torch.tensor(result.total, dtype=torch.float32), metrics


def gather_batch(backend, tokenizer, rows, prompt_ids, sampler, cfg: RLConfig, rewards, step):
    """Steps 1-3: prompts, rollouts, rewards; with dynamic sampling, refill uninformative groups."""
    group, wanted = cfg.rollout.group_size, cfg.rollout.num_prompts
    rollouts, reward_list, metrics = [], [], {}
    rounds = 1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)
    first_zero_std = None
    for _ in range(rounds):
        need = wanted - len(rollouts) // group
        new_rollouts, new_rewards, m = collect(backend, tokenizer, rows, prompt_ids, sampler.take(need),
                                               cfg, rewards, step)
        keep = informative_groups(new_rewards, group)
        if first_zero_std is None:
            first_zero_std = float((~keep).float().mean())
            metrics.update(m)
        else:
            for key in ("timing/rollout", "timing/reward"):
                metrics[key] += m[key]
        if not cfg.algo.dynamic_sampling:
            keep = torch.ones_like(keep)
        for g in keep.nonzero().squeeze(-1).tolist():
            rollouts += new_rollouts[g * group:(g + 1) * group]
            reward_list.append(new_rewards[g * group:(g + 1) * group])
        if len(rollouts) // group >= wanted:
            break
    rewards_t = torch.cat(reward_list) if reward_list else torch.zeros(0)
    metrics["frac_reward_zero_std"] = first_zero_std
    return rollouts, rewards_t, metrics


def _rollout_metrics(rollouts, rewards_t) -> dict:
    tokens = sum(r.num_tokens for r in rollouts)
    forwards = sum(r.num_forwards for r in rollouts)
    return {"reward": float(rewards_t.mean()) if rewards_t.numel() else 0.0,
            "reward_std": float(rewards_t.std(unbiased=False)) if rewards_t.numel() else 0.0,
            "completions/mean_length": tokens / max(len(rollouts), 1),
            "completions/clipped_ratio": sum(r.finish_reason == "length" for r in rollouts) / max(len(rollouts), 1),
            "tokens_per_forward": sum(len(r.token_ids) for r in rollouts) / max(forwards, 1)}


def _held_out_eval(model, tokenizer, eval_rows, cfg: RLConfig, template: str, rewards) -> dict:
    from dirl.eval.evaluate import EvalConfig, evaluate

    r = cfg.rollout
    eval_cfg = EvalConfig(model="<live>", data=cfg.eval_data or "<rows>", reward=",".join(rewards),
                          prompt_template=template, k=1, temperature=0.0, max_new_tokens=r.max_new_tokens,
                          unmasking=r.unmasking, threshold=r.threshold, steps_per_block=r.steps_per_block,
                          seed=cfg.seed)
    summary, _ = evaluate(model, tokenizer, eval_rows, eval_cfg, progress=False)
    return {"eval/accuracy": summary["accuracy"], "eval/mean_reward": summary["mean_reward"]}


def train_rl(cfg: RLConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Run DiPO (or another estimator) for ``cfg.max_steps`` steps; return the run directory."""
    # 1. Set-up: policy, frozen reference, optimizer, data, backend.
    set_seed(cfg.seed)
    run_dir = Path(cfg.out)
    model, tokenizer = load_model_spec(cfg.model, cfg.device, cfg.dtype, seed=cfg.seed)
    model.attn_impl = cfg.attn_impl
    ref_model = None
    if cfg.algo.beta > 0:  # the frozen reference is the starting policy, never updated
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps * cfg.algo.num_iterations
                                * cfg.algo.num_minibatches)
    template, rewards, eval_data = _task_defaults(cfg)
    rows = load_prompt_rows(cfg.data, seed=cfg.seed)
    prompt_ids = build_prompts(tokenizer, rows, template, chat=None)
    eval_rows = load_prompt_rows(eval_data, limit=cfg.eval_limit, seed=cfg.seed + 1) if (
        cfg.eval_every and eval_data) else []
    start_step, cursor = 0, 0
    if resume:
        state = load_checkpoint(resume, model, optimizer, scheduler)
        start_step, cursor = state["step"], state["extra"]["prompt_cursor"]
    sampler = PromptSampler(len(rows), cfg.seed, cursor)
    backend = make_backend(cfg.rollout.backend, model, tokenizer, url=cfg.rollout.url,
                           api_key_env=cfg.rollout.api_key_env, max_batch_rows=cfg.rollout.max_batch_rows)
    logger = MetricsLogger(run_dir, resume_step=start_step if resume else None)
    dist = PolicyDist(cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p)
    bar = tqdm(range(start_step, cfg.max_steps), desc="rl", disable=not progress, initial=start_step,
               total=cfg.max_steps)
    for step in bar:
        # 2. Rollouts and rewards (the backend already holds the latest weights).
        model.eval()
        rollouts, rewards_t, metrics = gather_batch(backend, tokenizer, rows, prompt_ids, sampler, cfg,
                                                    rewards, step)
        metrics.update(_rollout_metrics(rollouts, rewards_t))
        # 3. Advantages and the policy update.
        t0 = time.perf_counter()
        model.train()
        if rollouts:
            adv = group_advantages(rewards_t, cfg.rollout.group_size, cfg.algo.adv_mode)
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            metrics.update(policy_update(model, ref_model, rollouts, adv, cfg.algo, dist, optimizer, scheduler,
                                         cfg.optim, gen, cfg.rollout.max_new_tokens))
        metrics["timing/train"] = time.perf_counter() - t0
        # 4. Weight sync: free for the native backend, a real save + reload for `checkpoint`.
        t0 = time.perf_counter()
        backend.sync_weights()
        metrics["timing/sync"] = time.perf_counter() - t0
        metrics["lr"] = scheduler.get_last_lr()[0]
        # 5. Held-out eval, logging, checkpoints.
        done = step + 1
        if cfg.eval_every and eval_rows and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            metrics.update(_held_out_eval(model, tokenizer, eval_rows, cfg, template, rewards))
        logger.log(done, metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}")
        if cfg.log_every and done % cfg.log_every == 0:
            tqdm.write(f"step {done}: " + format_metrics({k: metrics[k] for k in _CONSOLE_KEYS if k in metrics}))
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, scheduler,
                            {"prompt_cursor": sampler.cursor}, cfg)
    save_pretrained(model, tokenizer, run_dir / "final")
    backend.close()
    logger.close()
    return run_dir


_CONSOLE_KEYS = ("reward", "reward_std", "kl", "loss", "entropy", "grad_norm", "completions/mean_length",
                 "tokens_per_forward", "eval/accuracy", "timing/rollout", "timing/train")
