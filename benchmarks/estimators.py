"""Held-out accuracy of every RL estimator after the same wall time (``python -m benchmarks.estimators``).

Each (seed, variant) pair runs a demo pipeline (``--config``, default ``configs/demo.yaml``: the
shipped SFT checkpoint, then RL with that estimator; ``configs/demo-dream.yaml`` is the
full-attention one) as its own ``dirl demo`` process with
``rl_wall_s`` = ``--wall`` (counted on ``--clock``: the run's CPU seconds by default, so a
busy machine slows a run down without shortening its budget): RL runs in chunks of
``--chunk`` steps (default the config's ``rl_chunk``, else its ``rl.eval.every``) until the
budget is spent, so each variant gets the same seconds (plus at most one chunk) and the
steps it takes in them depend on its cost per step. ``--parallel`` processes share the
cores (``OMP_NUM_THREADS`` = cores / parallel each), the same way for every variant.

Variants: one per ``--estimators`` name -- ``<estimator>+<critic>`` runs that estimator with
a critic, e.g. ``trace+value`` with TraceRL's value model (``rl.algo.critic=value``) --, plus
each ``--variant NAME:KEY=VALUE,KEY=VALUE`` (any ``dirl demo`` overrides, e.g. ``--variant
mc_entropy:estimator=trace_mc,rl.algo.mc_sampling=entropy``; the estimator is the demo's
unless the overrides set one). ``--eval-limit`` sets the held-out prompts
(the demo's 256 give a standard error of ~0.03 per run; 512+ halve the variance).

Prints one ``estimator_acc[<name>]=...`` line per variant (mean over seeds), its 95%
t-interval over seeds (``estimator_acc_ci95[<name>]``, the half-width), the same for the
paired differences of ``--pairs`` (default ``trace:trace_shrink``: per seed, A's accuracy
minus B's on the same data and prompts; ``diff[A-B]`` and ``diff_ci95[A-B]``), and a
Markdown table for BENCHMARKS.md. ``--reuse`` keeps runs whose ``summary.json`` already
exists (a long run interrupted can be resumed). The BENCHMARKS.md table was made with
``--wall 300 --seeds 0,1``: 12 runs, ~33 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dirl.algo.likelihood import ESTIMATORS

REPO = Path(__file__).resolve().parents[1]
# t_{0.975, df} for df = 1..30; beyond, the Cornish-Fisher expansion (error < 1e-4).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval over the values); inf half-width for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n)


def parse_variants(estimators: str, extra: list[str]) -> dict[str, list[str]]:
    """Variant name -> its ``dirl demo`` overrides: one per estimator, then the ``--variant`` ones."""
    variants = {}
    for name in filter(None, estimators.split(",")):
        estimator, plus, critic = name.partition("+")
        variants[name] = [f"estimator={estimator}", *([f"rl.algo.critic={critic}"] if plus else [])]
    for spec in extra:
        name, sep, overrides = spec.partition(":")
        if not sep or not name or name in variants:
            raise SystemExit(f"--variant {spec!r}: expected a new NAME:KEY=VALUE[,KEY=VALUE...]")
        variants[name] = [item for item in overrides.split(",") if item]
        if not all("=" in item for item in variants[name]):
            raise SystemExit(f"--variant {spec!r}: every override is KEY=VALUE")
    return variants


def run_one(out: Path, overrides: list[str], seed: int, wall: float, threads: int, extra: list[str],
            config: str = "configs/demo.yaml") -> dict:
    """One ``dirl demo`` process; returns its summary.json (raises with its stderr on failure)."""
    cmd = [sys.executable, "-m", "dirl.cli", "demo", "--config", str(REPO / config),
           f"out={out}", f"seed={seed}", f"rl_wall_s={wall}", "rl.max_steps=100000", "progress=false",
           *extra, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def run_all(args, variants: dict[str, list[str]], seeds: list[int], extra: list[str]) -> dict:
    """(variant, seed) -> summary, ``--parallel`` at a time (``--reuse``: finished runs kept)."""
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    wall = 5.0 if args.quick else args.wall
    results, futures = {}, {}
    with ThreadPoolExecutor(args.parallel) as pool:
        for seed in seeds:
            for name, overrides in variants.items():
                out = Path(args.out) / f"{name}-s{seed}"
                if args.reuse and (out / "summary.json").exists():
                    results[(name, seed)] = json.loads((out / "summary.json").read_text())
                else:
                    futures[(name, seed)] = pool.submit(run_one, out, overrides, seed, wall, threads, extra, args.config)
        results.update({job: future.result() for job, future in futures.items()})
    print(f"# {len(results)} runs ({len(futures)} new), --wall {wall:g} s each, {args.parallel} at a time "
          f"with {threads} thread(s)")
    return results


def report(results: dict, names: list[str], seeds: list[int], pairs: list[tuple[str, str]]) -> None:
    """The Markdown table, then the ``key[name]=value`` lines."""
    eval_prompts = {r.get("eval_prompts") for r in results.values()}
    print(f"# held-out prompts per run: {'/'.join(str(n) for n in sorted(eval_prompts, key=str))}")
    print("| variant | RL steps | RL s | " + " | ".join(f"acc seed {s}" for s in seeds)
          + " | mean acc ± 95% CI | mean gain |")
    print("|---" * (5 + len(seeds)) + "|")
    acc = {name: [results[(name, s)]["rl_acc"] for s in seeds] for name in names}
    for name in names:
        runs = [results[(name, seed)] for seed in seeds]
        mean, half = mean_ci95(acc[name])
        gain = sum(r["gain"] for r in runs) / len(runs)
        steps = "/".join(str(r["rl_steps"]) for r in runs)
        rl_s = "/".join(f"{r['stages_s']['rl']:.0f}" for r in runs)
        print(f"| {name} | {steps} | {rl_s} | " + " | ".join(f"{a:.3f}" for a in acc[name])
              + f" | {mean:.3f} ± {half:.3f} | {gain:+.3f} |")
    for a, b in pairs:
        mean, half = mean_ci95([x - y for x, y in zip(acc[a], acc[b])])
        verdict = "resolved" if abs(mean) > half else "not resolved (the interval holds 0)"
        print(f"# paired {a} - {b} over {len(seeds)} seeds: {mean:+.4f} ± {half:.4f} (95% t): {verdict}")
    for name in names:
        mean, half = mean_ci95(acc[name])
        print(f"estimator_acc[{name}]={mean:.4f}")
        print(f"estimator_acc_ci95[{name}]={half:.4f}")
    for a, b in pairs:
        mean, half = mean_ci95([x - y for x, y in zip(acc[a], acc[b])])
        print(f"diff[{a}-{b}]={mean:.4f}")
        print(f"diff_ci95[{a}-{b}]={half:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="the demo recipe (relative to the repo)")
    parser.add_argument("--chunk", type=int, default=0, help="RL steps between budget checks (0 = the config's)")
    parser.add_argument("--wall", type=float, default=300.0, help="RL seconds per run")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (>= 5 for the intervals)")
    parser.add_argument("--parallel", type=int, default=2, help="demo processes at once")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what --wall counts: each run's CPU seconds (equal compute even while other jobs "
                             "share the cores) or wall seconds")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help="names; <name>+value adds the critic")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="an extra variant: dirl demo overrides (repeatable)")
    parser.add_argument("--pairs", default="trace:trace_shrink", help="A:B,... paired differences to report")
    parser.add_argument("--eval-limit", type=int, default=0, help="held-out prompts (0 = the demo's 256)")
    parser.add_argument("--out", default="runs/bench-estimators")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose summary.json exists")
    parser.add_argument("--quick", action="store_true", help="a few seconds each (checks the plumbing)")
    args = parser.parse_args(argv)
    variants = parse_variants(args.estimators, args.variant)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",") if p]
    pairs = [(a, b) for a, b in pairs if a in variants and b in variants]
    extra = ["eval_limit=32", "rl.eval.every=2", "rl.rollout.num_prompts=4"] if args.quick else []
    extra.append(f"rl_clock={args.clock}")
    if args.chunk:
        extra.append(f"rl_chunk={args.chunk}")
    if args.eval_limit:
        extra.append(f"eval_limit={args.eval_limit}")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    results = run_all(args, variants, seeds, extra)
    print(f"# {time.perf_counter() - start:.0f} s in all")
    report(results, list(variants), seeds, pairs)


if __name__ == "__main__":
    main()
