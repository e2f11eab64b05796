"""Cost of one RL scoring pass per estimator on a full-attention model, as ratios to exact ``trace``.

Rollouts of a random LLaDA-shaped model (``--family``, d 256, 4 layers; 8 prompts x 2 samples,
96 new tokens, low_confidence with blocks of 32 and 16 steps a block at temperature 1) are planned
by each estimator and scored once with gradients (forward + backward of the policy log-probs, the
update's cost). Every state is a whole prompt + response sequence, so cost follows the number of
states: ``<name>_states`` (per completion), ``<name>_tokens`` (packed tokens), ``<name>_seconds``
(best of 2) and ``<name>_cost_ratio`` (seconds / trace's).

    python -m benchmarks.fullattn_estimators [--quick] [--family llada|dream]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.fullattn_cache import make_model
from dirl.algo.likelihood import EstimatorArgs, EstimatorOptions, plan_estimator, score_plan
from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams

VARIANTS = {"trace": {}, "trace_shrink_4": dict(shrink=4), "trace_shrink_8": dict(shrink=8),
            "trace_mc_4_uniform": dict(mc_steps=4, mc_sampling="uniform"),
            "trace_mc_4_entropy": dict(mc_steps=4, mc_sampling="entropy"), "mean_field": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llada", choices=["llada", "dream"])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 32 new tokens")
    args = parser.parse_args()
    model = make_model(args.family)
    gen = torch.Generator().manual_seed(1)
    count, new = (4, 32) if args.quick else (8, 96)
    prompts = [torch.randint(2, 120, (int(n),), generator=gen).tolist()
               for n in torch.randint(24, 33, (count,), generator=gen)]
    params = SamplingParams(max_new_tokens=new, temperature=1.0, unmasking="low_confidence", block_length=32,
                            steps_per_block=16, n=2, seed=3)
    rollouts = Engine(model).generate(prompts, params)
    base = None
    for label, options in VARIANTS.items():
        name = label if label in ("trace", "mean_field") else "_".join(label.split("_")[:2])
        plan = plan_estimator(name, EstimatorArgs.for_model(model, rollouts, torch.Generator().manual_seed(0),
                                                            EstimatorOptions(**options)))
        states = int(sum(int(row.max()) + 1 for row in plan.pack.meta.copy)) / len(rollouts)
        times = []
        for _ in range(2):
            model.zero_grad()
            start = time.perf_counter()
            score_plan(model, plan, params).sum().backward()
            times.append(time.perf_counter() - start)
        seconds = min(times)
        base = base or seconds
        print(f"{label}_states={states:.1f}")
        print(f"{label}_tokens={int((plan.pack.meta.doc >= 0).sum())}")
        print(f"{label}_seconds={seconds:.3f}")
        print(f"{label}_cost_ratio={seconds / base:.3f}")


if __name__ == "__main__":
    main()
