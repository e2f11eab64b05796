"""Held-out accuracy of every RL estimator after the same wall time (``dirl bench estimators``).

Each (seed, estimator) pair runs the demo pipeline (``configs/demo.yaml``: the shipped
SFT checkpoint, then RL with that estimator) as its own ``dirl demo`` process with
``rl_wall_s`` = ``--wall``: RL runs in chunks of ``rl.eval_every`` steps until the budget
is spent, so each estimator gets the same seconds (plus at most one chunk) and the
steps it takes in them depend on its cost per step. ``--parallel`` processes share the
cores (``OMP_NUM_THREADS`` = cores / parallel each), the same way for every estimator.

A name ``<estimator>+value`` runs that estimator with TraceRL's value model
(``rl.algo.critic=value``), e.g. ``--estimators trace,trace+value`` for the critic's gain
at equal wall time.

Prints one ``estimator_acc[<name>]=...`` line per estimator (mean over seeds) and a
Markdown table (steps, RL seconds, accuracy per seed) for BENCHMARKS.md. The defaults
(300 s, seeds 0 and 1, 2 at a time) made the table there: 12 runs, ~33 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dirl.algo.likelihood import ESTIMATORS

REPO = Path(__file__).resolve().parents[1]


def run_one(out: Path, estimator: str, seed: int, wall: float, threads: int, extra: list[str]) -> dict:
    """One ``dirl demo`` process; returns its summary.json (raises with its stderr on failure)."""
    estimator, plus, critic = estimator.partition("+")
    extra = [*extra, f"rl.algo.critic={critic}"] if plus else extra
    cmd = [sys.executable, "-m", "dirl.cli", "demo", "--config", str(REPO / "configs/demo.yaml"),
           f"out={out}", f"seed={seed}", f"estimator={estimator}", f"rl_wall_s={wall}",
           "rl.max_steps=100000", "progress=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{estimator} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wall", type=float, default=300.0, help="RL seconds per estimator")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--parallel", type=int, default=2, help="demo processes at once")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help="names; <name>+value adds the critic")
    parser.add_argument("--out", default="runs/bench-estimators")
    parser.add_argument("--quick", action="store_true", help="a few seconds each (checks the plumbing)")
    args = parser.parse_args()
    extra = ["eval_limit=32", "rl.eval_every=2", "rl.rollout.num_prompts=4"] if args.quick else []
    wall = 5.0 if args.quick else args.wall
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.estimators.split(",")
    jobs = [(name, seed) for seed in seeds for name in names]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {job: pool.submit(run_one, Path(args.out) / f"{job[0]}-s{job[1]}", *job, wall, threads, extra)
                   for job in jobs}
        results = {job: future.result() for job, future in futures.items()}
    print(f"# {len(jobs)} runs, --wall {wall:g} s each, {args.parallel} at a time with {threads} thread(s), "
          f"{time.perf_counter() - start:.0f} s in all")
    print("| estimator | RL steps | RL s | " + " | ".join(f"acc seed {s}" for s in seeds) + " | mean acc | mean gain |")
    print("|---" * (5 + len(seeds)) + "|")
    for name in names:
        runs = [results[(name, seed)] for seed in seeds]
        acc = sum(r["rl_acc"] for r in runs) / len(runs)
        gain = sum(r["gain"] for r in runs) / len(runs)
        steps = "/".join(str(r["rl_steps"]) for r in runs)
        rl_s = "/".join(f"{r['stages_s']['rl']:.0f}" for r in runs)
        print(f"| {name} | {steps} | {rl_s} | " + " | ".join(f"{r['rl_acc']:.3f}" for r in runs)
              + f" | {acc:.3f} | {gain:+.3f} |")
    for name in names:
        acc = sum(results[(name, seed)]["rl_acc"] for seed in seeds) / len(seeds)
        print(f"estimator_acc[{name}]={acc:.4f}")


if __name__ == "__main__":
    main()
