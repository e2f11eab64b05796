"""Bias and variance of every estimator's policy gradient against the exact one (``python -m benchmarks.estimator_bias``).

Setup: the shipped demo SFT checkpoint (``dirl/assets/demo-sft``, the model ``dirl demo``
starts RL from) and one fixed batch of rollouts (seeded): demo-task train prompts decoded
as the demo's RL rollouts (temperature 0.6, dynamic unmasking, 36 new tokens), the task's
reward, group z-score advantages, keeping the first ``--groups`` groups whose rewards are
not all equal (a group of equal rewards has zero advantage: no gradient).

The loss every estimator is differentiated through is the DiPO surrogate
(:func:`dirl.algo.losses.dipo_loss`) at ratio 1 (``logp_old = logp_new.detach()``, the
first PPO iteration), beta = 0, with the fixed advantages and the estimator's importance
weights, normalised by the batch's completion-token count N (``agg=constant`` with
constant N / S, S rollouts):

    g_hat = grad_theta  -(1/N) sum_{scored i} w_i A_{s(i)} logp_theta(i)

``trace`` scores every token at the state the sampler committed it in, so its g_hat is the
exact gradient g* (and equals the training step's ``token_mean`` gradient). ``--agg
token_mean`` runs the training step's normaliser: the rollouts' completion tokens, which
is N again (before that fix it was each draw's own scored-token count, which scaled the
sampling estimators up ~T/k).

Per estimator (the registry's, ``trace_mc`` once per ``mc_sampling`` mode), M draws of g_hat over all parameters (one draw for the deterministic ones, found
by comparing two plans drawn with different seeds), and:

* relative bias ||mean g_hat - g*|| / ||g*||; for an unbiased estimator it is not 0 but
  about the noise floor sqrt(var / M) (printed beside it);
* bias z: a split-half test of "E g_hat = g*": the direction d of (mean of the first M/2
  draws - g*), then the t-statistic of d . (g_hat_i - g*) over the other M/2 draws. The
  halves are independent, so an unbiased estimator gives |z| < 3 with probability ~0.997;
  a biased one grows like sqrt(M);
* cosine(mean g_hat, g*);
* relative per-draw variance E||g_hat - E g_hat||^2 / ||g*||^2.

Standard errors: delete-one-batch jackknife over ``--batches`` contiguous batches of draws
(each statistic recomputed without one batch), which handles the nonlinear statistics
(norms, cosines). Prints ``stat[row]=value`` lines and a Markdown table; CPU seconds per
draw (``time.process_time``, one thread) in the last column.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from dirl.algo.advantages import group_advantages, informative_groups
from dirl.algo.likelihood import ESTIMATORS, MC_SAMPLING, EstimatorArgs, EstimatorOptions, plan_estimator, score_plan
from dirl.algo.losses import LossConfig, ScoredTokens, dipo_loss

STATS = ("rel_bias", "cosine", "rel_var")


def variants(shrink: int, mc_steps: int) -> dict[str, dict]:
    """Row label -> estimator name and options: every registered estimator, ``trace_mc`` once
    per ``mc_sampling`` mode (``trace_mc[entropy]`` ...)."""
    rows = {}
    for name in ESTIMATORS:
        options = {"shrink": shrink, "mc_steps": mc_steps}
        if name == "trace_mc":
            rows.update({f"{name}[{mode}]": {"name": name, **options, "mc_sampling": mode} for mode in MC_SAMPLING})
        else:
            rows[name] = {"name": name, **options}
    return rows


@dataclasses.dataclass
class FixedBatch:
    """The rollouts every draw scores, their advantages and the distribution they were sampled from."""

    rollouts: list                    # R rollouts, grouped by prompt
    adv: torch.Tensor                 # (R,) group z-scores of the rewards
    policy: object                    # the demo's SamplingSpec (a PolicyDist: what score_plan reads)


def fixed_batch(model, tokenizer, num_groups: int, group_size: int, seed: int) -> FixedBatch:
    """Demo-task rollouts of the first ``num_groups`` informative groups (prompts in chunks of 8)."""
    from dirl.data import build_prompt_ids, get_task
    from dirl.engine.engine import Engine
    from dirl.rewards import compute_rewards
    from dirl.demo import DemoConfig

    demo = DemoConfig()
    task = get_task(demo.task, **demo.task_params)
    spec = demo.rl.rollout.sampling
    params = spec.params(tokenizer.stop_ids(), n=group_size)
    rollouts, rewards, chunk = [], [], 8
    for start in range(0, 64 * chunk, chunk):
        rows = task.generate("train", start + chunk, seed=seed)[start:]
        batch = Engine(model).generate(build_prompt_ids(tokenizer, rows, task.prompt_template), params,
                                       [seed * 100003 + start + i for i in range(len(rows))])
        columns = {key: [row[key] for row in rows for _ in range(group_size)] for key in rows[0]}
        texts = [tokenizer.decode(r.completion_ids) for r in batch]
        reward = torch.tensor(compute_rewards({task.reward: 1.0}, texts, columns).total, dtype=torch.float32)
        for g in informative_groups(reward, group_size).nonzero().flatten().tolist()[:num_groups - len(rewards)]:
            rollouts += batch[g * group_size:(g + 1) * group_size]
            rewards.append(reward[g * group_size:(g + 1) * group_size])
        if len(rewards) == num_groups:
            return FixedBatch(rollouts, group_advantages(torch.cat(rewards), group_size), spec)
    raise RuntimeError(f"fewer than {num_groups} informative groups in {64 * chunk} prompts")


def estimator_args(model, rollouts, options: dict, gen: torch.Generator) -> EstimatorArgs:
    cfg = model.config
    chosen = {k: v for k, v in options.items() if k != "name"}
    return EstimatorArgs(rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id, gen=gen,
                         options=EstimatorOptions(**chosen))


def surrogate_grad(model, plan, batch: FixedBatch, agg: str) -> torch.Tensor:
    """The flat gradient (P,) of the module docstring's loss on ``plan``."""
    num_seqs = batch.adv.numel()
    model.zero_grad(set_to_none=True)
    logp = score_plan(model, plan, batch.policy)  # (N,)
    seq_index = plan.pack.seq_index
    lengths = torch.tensor([r.num_tokens for r in batch.rollouts])  # as the training step passes them
    tokens = ScoredTokens(logp, logp.detach(), batch.adv[seq_index], seq_index, num_seqs, weight=plan.weight,
                          seq_lengths=lengths)
    num_tokens = int(lengths.sum())
    loss, _ = dipo_loss(tokens, LossConfig(beta=0.0, agg=agg), constant=num_tokens / num_seqs)
    loss.backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()]).double()


class DrawStats:
    """Streaming moments of M draws in K contiguous batches, plus the split-half bias test."""

    def __init__(self, g_star: torch.Tensor, num_draws: int, num_batches: int):
        self.g_star, self.num_draws, self.num_batches = g_star, num_draws, num_batches
        self.sums = torch.zeros(num_batches, g_star.numel(), dtype=torch.float64)  # (K, P)
        self.sq_norms = torch.zeros(num_batches, dtype=torch.float64)              # (K,)
        self.count = 0
        self.direction: torch.Tensor | None = None
        self.projections: list[float] = []

    def add(self, grad: torch.Tensor) -> None:
        half = self.num_draws // 2
        if self.count == half and half:  # first half done: fix the direction of its bias
            offset = self.sums.sum(0) / half - self.g_star
            self.direction = offset / offset.norm().clamp_min(1e-300)
        if self.direction is not None:
            self.projections.append(float(self.direction @ (grad - self.g_star)))
        batch = self.count * self.num_batches // self.num_draws
        self.sums[batch] += grad
        self.sq_norms[batch] += grad @ grad
        self.count += 1

    def _stats(self, total: torch.Tensor, sq_norm: float, num: int) -> dict[str, float]:
        mean = total / num
        ref = self.g_star.norm()
        var = (sq_norm - num * float(mean @ mean)) / max(num - 1, 1)
        cosine = float(mean @ self.g_star / (mean.norm() * ref).clamp_min(1e-300))
        return {"rel_bias": float((mean - self.g_star).norm() / ref), "cosine": cosine,
                "rel_var": max(var, 0.0) / float(ref) ** 2}

    def summary(self) -> dict[str, float]:
        """Statistics, their jackknife SEs (``*_se``), the noise floor and the bias z."""
        total, sq = self.sums.sum(0), float(self.sq_norms.sum())
        out = self._stats(total, sq, self.num_draws)
        k, per = self.num_batches, self.num_draws // self.num_batches
        if self.num_draws > 1:
            leave_out = [self._stats(total - self.sums[b], sq - float(self.sq_norms[b]), self.num_draws - per)
                         for b in range(k)]
            for key in STATS:
                values = torch.tensor([row[key] for row in leave_out], dtype=torch.float64)
                out[f"{key}_se"] = float(((k - 1) / k * (values - values.mean()).pow(2).sum()).sqrt())
        else:
            out.update({f"{key}_se": 0.0 for key in STATS})
        out["noise_floor"] = math.sqrt(out["rel_var"] / self.num_draws)
        proj = torch.tensor(self.projections, dtype=torch.float64)
        # nan: too few draws for a t-statistic (and none for a deterministic estimator)
        out["bias_z"] = float(proj.mean() / (proj.std() / math.sqrt(len(proj)))) if len(proj) >= 10 and proj.std() > 0 \
            else math.nan
        return out


def _same_plan(a, b) -> bool:
    def same(x, y) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return all(same(getattr(a.pack, k), getattr(b.pack, k)) for k in ("input_ids", "score_index", "target_ids")) \
        and same(a.weight, b.weight)


def measure(model, batch: FixedBatch, options: dict, g_star: torch.Tensor, cfg) -> dict:
    """M draws (1 if the plan does not depend on the generator) of one row's gradient."""
    rollouts = batch.rollouts
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = [plan_estimator(options["name"], estimator_args(model, rollouts, options, torch.Generator().manual_seed(s)))
             for s in (1, 2)]
    random_plan = not _same_plan(*probe)
    num_draws = cfg.draws if random_plan else 1
    stats = DrawStats(g_star, num_draws, cfg.batches if random_plan else 1)
    start = time.process_time()
    for _ in range(num_draws):
        plan = plan_estimator(options["name"], estimator_args(model, rollouts, options, gen))
        stats.add(surrogate_grad(model, plan, batch, cfg.agg))
    seconds = (time.process_time() - start) / num_draws
    return {**stats.summary(), "draws": num_draws, "cpu_s_per_draw": seconds}


def _ratio(results: dict, num: str, den: str) -> tuple[float, float]:
    """rel_var ratio of two rows and its SE (delta method; the rows' draws are independent)."""
    a, b = results[num], results[den]
    ratio = a["rel_var"] / b["rel_var"]
    return ratio, ratio * math.hypot(a["rel_var_se"] / a["rel_var"], b["rel_var_se"] / b["rel_var"])


def report(results: dict) -> None:
    print("| estimator | draws | rel. bias ± SE | noise floor √(var/M) | bias z | cosine ± SE "
          "| rel. variance ± SE | CPU s/draw |")
    print("|---" * 8 + "|")
    for label, r in results.items():
        print(f"| `{label}` | {r['draws']} | {r['rel_bias']:.4f} ± {r['rel_bias_se']:.4f} | {r['noise_floor']:.4f} "
              f"| {r['bias_z']:+.2f} | {r['cosine']:.4f} ± {r['cosine_se']:.4f} "
              f"| {r['rel_var']:.3f} ± {r['rel_var_se']:.3f} | {r['cpu_s_per_draw']:.3f} |")
    for label, r in results.items():
        for key in (*STATS, *(f"{s}_se" for s in STATS), "noise_floor", "bias_z", "draws"):
            print(f"{key}[{label}]={r[key]:.6g}")
    mc_rows = [label for label in results if label.startswith("trace_mc[")]
    if "trace_mc[uniform]" in results:
        for label in mc_rows:
            if label != "trace_mc[uniform]" and results["trace_mc[uniform]"]["rel_var"] > 0:
                ratio, se = _ratio(results, label, "trace_mc[uniform]")
                print(f"var_ratio[{label}/trace_mc[uniform]]={ratio:.4f} se={se:.4f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300, help="M draws per random estimator")
    parser.add_argument("--batches", type=int, default=10, help="jackknife batches of draws")
    parser.add_argument("--groups", type=int, default=4, help="informative prompt groups in the batch")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (the demo's G)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shrink", type=int, default=2)
    parser.add_argument("--mc-steps", type=int, default=2)
    parser.add_argument("--agg", default="constant", choices=("constant", "token_mean"),
                        help="constant: divide by the batch's token count; token_mean: by each plan's (as training)")
    parser.add_argument("--estimators", default="", help="comma-separated row labels (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tiny batch and 4 draws (checks the plumbing)")
    cfg = parser.parse_args(argv)
    if cfg.quick:
        cfg.draws, cfg.batches, cfg.groups, cfg.group_size = 4, 2, 1, 4
    if cfg.draws < 2 * cfg.batches or cfg.batches < 2:
        parser.error("need --batches >= 2 and --draws >= 2 * --batches")
    from dirl.demo import SHIPPED_SFT
    from dirl.model.loading import load_model_spec

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_spec(str(SHIPPED_SFT), seed=cfg.seed)
    batch = fixed_batch(model, tokenizer, cfg.groups, cfg.group_size, cfg.seed)
    rollouts = batch.rollouts
    rows = variants(cfg.shrink, cfg.mc_steps)
    if cfg.estimators:
        rows = {label: rows[label] for label in cfg.estimators.split(",")}
    exact = plan_estimator("trace", estimator_args(model, rollouts, {"name": "trace"}, torch.Generator()))
    g_star = surrogate_grad(model, exact, batch, cfg.agg)
    print(f"# {len(rollouts)} rollouts ({cfg.groups} groups of {cfg.group_size}), "
          f"{sum(r.num_tokens for r in rollouts)} completion tokens, {g_star.numel()} parameters, "
          f"||g*|| = {float(g_star.norm()):.4g}, agg={cfg.agg}, M={cfg.draws}, jackknife over {cfg.batches} batches")
    start = time.process_time()
    results = {label: measure(model, batch, options, g_star, cfg) for label, options in rows.items()}
    report(results)
    print(f"# {time.process_time() - start:.0f} CPU s")
    return results


if __name__ == "__main__":
    main()
