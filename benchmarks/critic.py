"""CPU time of an RL step with and without TraceRL's value model (``python -m benchmarks.critic``).

The demo's RL setting (``configs/demo.yaml``: the shipped SFT checkpoint, 16 prompts x 8
samples, the ``trace`` estimator), run in one process for ``--steps`` steps with
``rl.algo.critic=none`` and then ``value``; CPU time (``time.process_time``) per step,
the first step of each dropped (warm-up). Prints ``critic_step_ratio=...``: the cost
of a critic step over a plain one, which sets how many steps each gets at equal wall
time (``python -m benchmarks.estimators --estimators trace,trace+value`` measures the accuracy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dirl import config as config_lib
from dirl.demo import DemoConfig, rl_config, sft_stage, write_data
from dirl.train.rl.loop import build_run, train_step

REPO = Path(__file__).resolve().parents[1]


def step_times(critic: str, steps: int, out: Path, overrides: list[str]) -> list[float]:
    cfg = config_lib.load(DemoConfig, REPO / "configs/demo.yaml",
                          [f"out={out / critic}", f"rl.algo.critic={critic}", "progress=false", *overrides])
    data = write_data(cfg, Path(cfg.out) / "data")
    rl = rl_config(cfg, sft_stage(cfg, data, Path(cfg.out)), data, Path(cfg.out))
    rl.eval.every = 0
    run = build_run(rl)
    times = []
    for step in range(steps):
        start = time.process_time()
        train_step(run, step)
        times.append(time.process_time() - start)
    run.collector.backend.close()
    return times[1:] if len(times) > 1 else times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="RL steps per setting (the first is dropped)")
    parser.add_argument("--quick", action="store_true", help="2 steps of 4 prompts (checks the plumbing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, overrides = (2, ["rl.rollout.num_prompts=4"]) if args.quick else (args.steps, [])
    with tempfile.TemporaryDirectory() as tmp:
        mean = {}
        for critic in ("none", "value"):
            times = step_times(critic, steps, Path(tmp), overrides)
            mean[critic] = sum(times) / len(times)
            print(f"critic={critic}: CPU s per step " + " ".join(f"{t:.2f}" for t in times))
    print(f"critic_step_ratio={mean['value'] / mean['none']:.3f}")


if __name__ == "__main__":
    main()
