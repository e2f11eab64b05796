"""The code sandbox's cost: overhead per program and throughput (``python -m benchmarks.sandbox [--quick]``).

Per isolation tier available here (bwrap, unshare, rlimits):

* ``bare_python_ms`` -- median wall time of ``python3 -I -c pass`` started with subprocess, no
  sandbox: the floor every tier pays.
* ``overhead_ms`` -- median wall time of one sandboxed run of ``pass`` (one interpreter), runs
  one after another; minus ``bare_python_ms`` it is what the sandbox adds per program.
* ``check_ms`` -- median wall time of one ``run_check`` (sandbox + harness + program process)
  on a two-line function, one after another.
* ``humaneval_per_s`` -- HumanEval's canonical solutions through the ``code`` reward path
  (``run_check`` on the sandbox's pool, ``workers`` = the core count): programs per second,
  and how many passed (must be all).

Prints ``name=value`` lines. ``--quick``: 5 timing runs and the first 32 problems.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from dirl.rewards.code_harness import run_check
from dirl.rewards.sandbox import Sandbox, SandboxConfig

HUMANEVAL = Path(os.environ.get("DIRL_SHARED", Path(__file__).resolve().parents[2] / "shared"),
                 "data", "humaneval.jsonl")


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_tier(isolation: str, repeats: int, rows: list[dict]) -> None:
    sandbox = Sandbox(SandboxConfig(isolation=isolation))
    try:
        _ = sandbox.isolation
    except RuntimeError as error:
        print(f"{isolation}_skipped={error}")
        return
    print(f"{isolation}_overhead_ms={_median_ms(lambda: sandbox.run('pass'), repeats):.1f}")
    check = ("def f(x):\n    return x + 1\n", "def check(c):\n    assert c(1) == 2\n", "f")
    print(f"{isolation}_check_ms={_median_ms(lambda: run_check(sandbox, *check), repeats):.1f}")
    if rows:
        start = time.perf_counter()
        verdicts = sandbox.map(lambda r: run_check(sandbox, r["question"] + r["answer"], r["test"],
                                                   r["entry_point"], setup=r["question"]), rows)
        seconds = time.perf_counter() - start
        print(f"{isolation}_humaneval_passed={sum(v.passed for v in verdicts)}/{len(rows)}")
        print(f"{isolation}_humaneval_per_s={len(rows) / seconds:.1f} (workers={sandbox.workers})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiers", default="bwrap,unshare,rlimits")
    args = parser.parse_args()
    rows = [json.loads(line) for line in HUMANEVAL.read_text().splitlines()] if HUMANEVAL.exists() else []
    rows = rows[:32] if args.quick else rows
    print(f"cores={os.cpu_count()} load_1min={os.getloadavg()[0]:.1f}")
    python = Sandbox().python
    bare = _median_ms(lambda: subprocess.run([python, "-I", "-c", "pass"], check=True), 5 if args.quick else 30)
    print(f"bare_python_ms={bare:.1f}")
    for tier in args.tiers.split(","):
        bench_tier(tier, 5 if args.quick else 30, rows)


if __name__ == "__main__":
    main()
