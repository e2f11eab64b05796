"""``dirl rl``: DiPO reinforcement learning (DiRL, Zhu et al. 2025) and its neighbours.

One step (DESIGN §7, §8):
  1. sample P prompts (a seeded permutation with a saved cursor: exact resume);
  2. the rollout backend draws G responses each -- by default the engine running
     on the trainer's own parameters, so the last update is already visible;
  3. rewards (registry), group advantages, optional dynamic sampling;
  4. the policy update (:mod:`dirl.train.rl_update`) with the chosen estimator;
  5. sync weights to the backend (free for ``native``), log, evaluate, checkpoint.

Data parallel (``torchrun``, :mod:`dirl.train.dist`): ``rollout.num_prompts`` is
global. Every rank draws the same prompt list (one cursor); prompt j of a round
is decoded by rank j % world with its own engine, its whole group of G samples
included, and the seed of a prompt depends only on its index, so a prompt gets
the same rollouts whichever rank decodes it. Rewards and advantages are per
group, hence local; dynamic sampling decides on the gathered rewards so every
rank agrees. The update normalises by global counts (:mod:`dirl.train.rl_update`),
metrics are reduced over the ranks, and rank 0 alone logs and writes. Under
FSDP2 the rollout, the no-grad scoring and the eval run on weights gathered
once per phase (:func:`dirl.train.dist.full_params`).
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
from dirl.eval.evaluate import build_prompts
from dirl.train import dist as dist_lib
from dirl.train.common import (MetricsLogger, OptimConfig, build_optimizer, build_scheduler, format_metrics,
                               resolve_device, set_seed)
from dirl.train.models import load_model_spec
from dirl.train.rl_update import AlgoConfig, policy_update
from dirl.train.state import load_checkpoint, save_checkpoint, save_model_dir


@dataclass
class RolloutConfig:
    backend: str = "native"           # native | checkpoint (the reload loop, for measurement) | http
    url: str = ""                     # http: base URL of `dirl serve`
    api_key_env: str = "DIRL_API_KEY"
    num_prompts: int = 8              # P prompts per step (over all ranks)
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
    dist: dist_lib.DistConfig = field(default_factory=dist_lib.DistConfig)  # torchrun only


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
    # A rank can get no prompt (a refill round smaller than the world): it only joins the collectives.
    rollouts = backend.generate([prompt_ids[i] for i in indices], params, seeds) if indices else []
    t1 = time.perf_counter()
    texts = [tokenizer.decode(r.completion_ids) for r in rollouts]
    group = cfg.rollout.group_size
    columns = {key: [rows[i][key] for i in indices for _ in range(group)] for key in rows[indices[0] if indices else 0]}
    result = compute_rewards(rewards, texts, columns)
    metrics = {"timing/rollout": t1 - t0, "timing/reward": time.perf_counter() - t1, **result.metrics}
    return rollouts, torch.tensor(result.total, dtype=torch.float32), metrics


def _global_round(local_rewards: torch.Tensor, mine: list[int], count: int, group: int) -> torch.Tensor:
    """A round's rewards of all ``count`` prompts in prompt order, from every rank's share."""
    if dist_lib.world_size() == 1:
        return local_rewards
    out = torch.zeros(count, group)
    for positions, values in dist_lib.all_gather_object((mine, local_rewards.view(-1, group).tolist())):
        for position, row in zip(positions, values):
            out[position] = torch.tensor(row)
    return out.view(-1)


def _global_round_metrics(metrics: dict, count: int) -> dict:
    """One round's metrics over the ranks: the slowest rank's timings, summed error counts, other
    values (means over completions) weighted by each rank's ``count`` rollouts. Exact, except a
    reward mean when the reward is not applicable (None) to some completions."""
    if dist_lib.world_size() == 1:
        return metrics
    keys = list(metrics)  # the same order on every rank (same code path)
    # A rank without rollouts adds nothing (its means are NaN: over no completions).
    weighted = [0.0 if not count else metrics[k] if k.endswith("/errors") else metrics[k] * count for k in keys]
    summed = dist_lib.all_reduce_sum(weighted + [count])
    maxed = dist_lib.all_reduce_max([metrics[k] for k in keys])
    out = {}
    for i, key in enumerate(keys):
        if key.startswith("timing/"):
            out[key] = maxed[i]
        elif key.endswith("/errors"):
            out[key] = summed[i]
        else:
            out[key] = summed[i] / max(summed[-1], 1)
    return out


@dataclass
class RolloutBatch:
    """This rank's kept rollouts (whole groups) and where they sit in the global batch."""

    rollouts: list = field(default_factory=list)
    rewards: list = field(default_factory=list)          # per local group, (G,) each
    positions: list[int] = field(default_factory=list)   # global index of each local rollout
    all_rewards: list = field(default_factory=list)      # per kept group of every rank, in global order

    def local_rewards(self) -> torch.Tensor:
        return torch.cat(self.rewards) if self.rewards else torch.zeros(0)

    def global_rewards(self) -> torch.Tensor:
        return torch.cat(self.all_rewards) if self.all_rewards else torch.zeros(0)


def gather_batch(backend, tokenizer, rows, prompt_ids, sampler, cfg: RLConfig, rewards, step):
    """Steps 1-3: prompts, rollouts, rewards; with dynamic sampling, refill uninformative groups.

    -> (RolloutBatch, metrics). Kept groups are numbered in prompt order over all ranks."""
    group, wanted = cfg.rollout.group_size, cfg.rollout.num_prompts
    batch, metrics, kept = RolloutBatch(), {}, 0
    rounds = 1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)
    first_zero_std = None
    for _ in range(rounds):
        indices = sampler.take(wanted - kept)  # the same global list on every rank
        mine = dist_lib.shard_positions(len(indices))
        new_rollouts, new_rewards, m = collect(backend, tokenizer, rows, prompt_ids, [indices[j] for j in mine],
                                               cfg, rewards, step)
        m = _global_round_metrics(m, len(new_rollouts))
        round_rewards = _global_round(new_rewards, mine, len(indices), group)
        keep = informative_groups(round_rewards, group)
        if first_zero_std is None:
            first_zero_std = float((~keep).float().mean())
            metrics.update(m)
        else:
            for key in ("timing/rollout", "timing/reward"):
                metrics[key] += m[key]
        if not cfg.algo.dynamic_sampling:
            keep = torch.ones_like(keep)
        ordinal = (torch.cumsum(keep.long(), 0) - 1 + kept).tolist()  # global number of each kept group
        for k, j in enumerate(mine):
            if keep[j]:
                batch.rollouts += new_rollouts[k * group:(k + 1) * group]
                batch.rewards.append(new_rewards[k * group:(k + 1) * group])
                batch.positions += range(ordinal[j] * group, (ordinal[j] + 1) * group)
        batch.all_rewards += [round_rewards[g * group:(g + 1) * group] for g in keep.nonzero().squeeze(-1).tolist()]
        kept += int(keep.sum())
        if kept >= wanted:
            break
    metrics["frac_reward_zero_std"] = first_zero_std
    return batch, metrics


def _rollout_metrics(rollouts, rewards_t) -> dict:
    """``rollouts``: this rank's; ``rewards_t``: every kept rollout's reward (all ranks)."""
    sums = [sum(r.num_tokens for r in rollouts), sum(r.num_forwards for r in rollouts), len(rollouts),
            sum(r.finish_reason == "length" for r in rollouts)]
    tokens, forwards, count, clipped = dist_lib.all_reduce_sum(sums)
    return {"reward": float(rewards_t.mean()) if rewards_t.numel() else 0.0,
            "reward_std": float(rewards_t.std(unbiased=False)) if rewards_t.numel() else 0.0,
            "completions/mean_length": tokens / max(count, 1),
            "completions/clipped_ratio": clipped / max(count, 1),
            # as in `dirl eval`: completion tokens (not the positions after a stop) per forward
            "tokens_per_forward": tokens / max(forwards, 1)}


def greedy_eval(model, tokenizer, rows, cfg: RLConfig, template: str, rewards, progress: bool = False,
                batch_size: int = 32) -> dict:
    """Greedy decoding of held-out ``rows`` with the rollouts' unmasking settings; the
    summary of ``dirl eval`` (accuracy, tokens_per_forward, ...)."""
    from dirl.eval.evaluate import EvalConfig, evaluate

    r = cfg.rollout
    eval_cfg = EvalConfig(model="<live>", data=cfg.eval_data or "<rows>", reward=",".join(rewards),
                          prompt_template=template, k=1, temperature=0.0, max_new_tokens=r.max_new_tokens,
                          unmasking=r.unmasking, threshold=r.threshold, steps_per_block=r.steps_per_block,
                          seed=cfg.seed, batch_size=batch_size)
    summary, _ = evaluate(model, tokenizer, rows, eval_cfg, progress=progress)
    return summary


def _held_out_eval(model, tokenizer, eval_rows, cfg: RLConfig, template: str, rewards) -> dict:
    summary = greedy_eval(model, tokenizer, eval_rows, cfg, template, rewards)
    return {"eval/accuracy": summary["accuracy"], "eval/mean_reward": summary["mean_reward"]}


@dataclass
class RLRun:
    """Everything the RL loop uses, built by :func:`build_rl_run`."""

    cfg: RLConfig
    run_dir: Path
    model: torch.nn.Module            # as trained (DDP / FSDP2 under torchrun)
    ref_model: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: list
    prompt_ids: list
    eval_rows: list
    template: str
    rewards: dict
    sampler: PromptSampler
    backend: object
    policy_dist: PolicyDist
    start_step: int = 0


def build_rl_run(cfg: RLConfig, resume: str | None = None) -> RLRun:
    """1. Set-up: policy, frozen reference, optimizer, data, backend; restored from ``resume``."""
    set_seed(cfg.seed)
    device = dist_lib.local_device(resolve_device(cfg.device))
    dist_lib.init_from_env(cfg.dist, device)
    if dist_lib.world_size() > 1 and cfg.rollout.backend != "native":
        raise ValueError(f"rollout.backend={cfg.rollout.backend!r}: only native runs under torchrun")
    model, tokenizer = load_model_spec(cfg.model, device, cfg.dtype, seed=cfg.seed)
    model.attn_impl = cfg.attn_impl
    ref_model = None
    if cfg.algo.beta > 0:  # the frozen reference is the starting policy, never updated
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        ref_model = dist_lib.wrap(ref_model, cfg.dist.strategy, device, trainable=False)
    model = dist_lib.wrap(model, cfg.dist.strategy, device)
    optimizer = build_optimizer(dist_lib.unwrap(model), cfg.optim)
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
    backend = make_backend(cfg.rollout.backend, dist_lib.unwrap(model), tokenizer, url=cfg.rollout.url,
                           api_key_env=cfg.rollout.api_key_env, max_batch_rows=cfg.rollout.max_batch_rows)
    return RLRun(cfg, Path(cfg.out), model, ref_model, tokenizer, optimizer, scheduler, rows, prompt_ids,
                 eval_rows, template, rewards, PromptSampler(len(rows), cfg.seed, cursor), backend,
                 PolicyDist(cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p), start_step)


def rl_step(run: RLRun, step: int) -> dict:
    """Steps 2-5 of one RL step (every rank); returns the step's metrics (global)."""
    cfg, model = run.cfg, run.model
    # 2. Rollouts and rewards (the backend already holds the latest weights).
    model.eval()
    with dist_lib.full_params(model):
        batch, metrics = gather_batch(run.backend, run.tokenizer, run.rows, run.prompt_ids, run.sampler, cfg,
                                      run.rewards, step)
    all_rewards = batch.global_rewards()
    metrics.update(_rollout_metrics(batch.rollouts, all_rewards))
    # 3. Advantages and the policy update.
    t0 = time.perf_counter()
    model.train()
    if all_rewards.numel():
        local = batch.local_rewards()
        adv = group_advantages(local, cfg.rollout.group_size, cfg.algo.adv_mode) if local.numel() else local
        # Rank 0 draws what a single process draws; other ranks their own stream (random estimators).
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step + 1_000_003 * dist_lib.rank())
        metrics.update(policy_update(model, run.ref_model, batch.rollouts, adv, cfg.algo, run.policy_dist,
                                     run.optimizer, run.scheduler, cfg.optim, gen, cfg.rollout.max_new_tokens,
                                     positions=batch.positions, total=all_rewards.numel()))
    metrics["timing/train"] = time.perf_counter() - t0
    # 4. Weight sync: free for the native backend, a real save + reload for `checkpoint`.
    t0 = time.perf_counter()
    run.backend.sync_weights()
    metrics["timing/sync"] = time.perf_counter() - t0
    metrics["lr"] = run.scheduler.get_last_lr()[0]
    # 5. Held-out eval: rank 0, on the full weights.
    done = step + 1
    if cfg.eval_every and run.eval_rows and (done % cfg.eval_every == 0 or done == cfg.max_steps):
        with dist_lib.full_params(model):
            if dist_lib.is_main():
                metrics.update(_held_out_eval(dist_lib.unwrap(model), run.tokenizer, run.eval_rows, cfg,
                                              run.template, run.rewards))
    return metrics


def train_rl(cfg: RLConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Run DiPO (or another estimator) for ``cfg.max_steps`` steps; return the run directory.

    Under torchrun every rank calls it; rank 0 logs and writes."""
    with dist_lib.process_group(cfg.dist, resolve_device(cfg.device)):
        # The run lives only inside _train_rl, so nothing holds the group at teardown.
        return _train_rl(cfg, resume, progress)


def _train_rl(cfg: RLConfig, resume: str | None, progress: bool) -> Path:
    run = build_rl_run(cfg, resume)
    main = dist_lib.is_main()
    logger = MetricsLogger(run.run_dir, enabled=main, resume_step=run.start_step if resume else None)
    bar = tqdm(range(run.start_step, cfg.max_steps), desc="rl", disable=not (progress and main),
               initial=run.start_step, total=cfg.max_steps)
    for step in bar:
        metrics = rl_step(run, step)
        done = step + 1
        if main:
            logger.log(done, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}")
            if cfg.log_every and done % cfg.log_every == 0:
                tqdm.write(f"step {done}: " + format_metrics({k: metrics[k] for k in _CONSOLE_KEYS
                                                              if k in metrics}))
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
            save_checkpoint(run.run_dir, done, run.model, run.tokenizer, run.optimizer, run.scheduler,
                            {"prompt_cursor": run.sampler.cursor}, cfg)
    save_model_dir(run.model, run.tokenizer, run.run_dir / "final")
    bar.close()
    run.backend.close()
    logger.close()
    return run.run_dir


_CONSOLE_KEYS = ("reward", "reward_std", "kl", "loss", "entropy", "grad_norm", "completions/mean_length",
                 "tokens_per_forward", "eval/accuracy", "timing/rollout", "timing/train")
