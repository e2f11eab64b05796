"""Kill-and-resume chains (issue 30): a run killed with SIGKILL at random moments and resumed
(``--resume``) until it finishes must end bit-identical to the same run done straight.

Each chain: one straight run, then the same run started fresh and killed ``--kills`` times (each
kill lands a random 0.2-2.5 s after the newest checkpoint appeared, so some land mid-save), each
time resumed from the run directory, and finally allowed to finish. The final weights
(``final/``) and the metrics of the last step are compared exactly.

    python -m benchmarks.kill_resume [--quick] [--chains 10] [--kills 2] [--seed 0]

``--quick``: one chain, one kill.

Prints one line per chain and ``chains=N identical=M kills=K``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMMON_SFT = ["model={base}", "data.source=task:arithmetic", "data.max_length=64", "batch_size=4",
              "data.limit=64", "optim.lr=1e-3", "max_steps=6", "save_every=1", "log_every=1", "--no-progress",
              "report_to=[jsonl]"]
COMMON_RL = ["model={base}", "rewards={rl_rewards:digit_fraction: 1.0}", "rollout.num_prompts=2",
             "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "optim.lr=1e-3", "max_steps=4",
             "save_every=1", "log_every=1", "--no-progress", "report_to=[jsonl]"]
CHAINS = [
    ("sft-fp32", "sft", COMMON_SFT),
    ("sft-lora", "sft", [*COMMON_SFT, "lora.r=4"]),
    ("sft-block-8", "sft", [*COMMON_SFT, "block_size=8"]),
    ("sft-keep-last", "sft", [*COMMON_SFT, "keep_last=2"]),
    ("rl-dipo", "rl", COMMON_RL),
    ("rl-lora", "rl", [*COMMON_RL, "lora.r=4"]),
    ("rl-trace-mc", "rl", [*COMMON_RL, "algo.estimator=trace_mc"]),
    ("rl-critic", "rl", [*COMMON_RL, "algo.critic=value"]),
    ("rl-block-schedule", "rl", [*COMMON_RL, "block_size_schedule=0:4,3:8"]),
    ("sft-seed-7", "sft", [*COMMON_SFT, "seed=7"]),
    ("rl-seed-7", "rl", [*COMMON_RL, "seed=7"]),
    ("sft-bf16-mixed", "sft", [*COMMON_SFT, "compute.precision=bf16-mixed"]),
]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
            "DIRL_FSYNC": "1"}


def dirl(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dirl.cli", *args]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


def newest_checkpoint(run: Path) -> str:
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    return steps[-1] if steps else ""


def killed_run(command: str, args: list[str], run: Path, kills: int, rng: random.Random) -> tuple[int, int]:
    """Start fresh, SIGKILL ``kills`` times after fresh checkpoints, resume each time; returns
    (kills done, final exit code)."""
    done = 0
    argv = [command, *args, f"out={run}"]
    while True:
        proc = subprocess.Popen(dirl(argv), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done < kills:
            seen = newest_checkpoint(run)
            while proc.poll() is None and newest_checkpoint(run) == seen:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.2, 2.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                done += 1
                argv = [command, "--resume", str(run), "--no-progress"]
                continue
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            print(err[-2000:], file=sys.stderr)
        return done, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.chains, args.kills = 1, 1
    rng = random.Random(args.seed)
    identical = total_kills = 0
    with tempfile.TemporaryDirectory(prefix="dirl-kill-") as tmp:
        base = Path(tmp) / "base"  # a checkpoint directory: LoRA needs one
        subprocess.run(dirl(["init", "--out", str(base)]), env=env(), check=True, stdout=subprocess.DEVNULL)
        for name, command, common in CHAINS[: args.chains]:
            common = [a.replace("{base}", str(base)) for a in common]
            straight, chained = Path(tmp) / f"{name}-straight", Path(tmp) / f"{name}-killed"
            subprocess.run(dirl([command, *common, f"out={straight}"]), env=env(), check=True,
                           stdout=subprocess.DEVNULL)
            kills, code = killed_run(command, common, chained, args.kills, rng)
            total_kills += kills
            same = code == 0 and all(torch.equal(a, b) for a, b in
                                     zip(weights(straight).values(), weights(chained).values()))
            same = same and weights(straight).keys() == weights(chained).keys()
            last = [(straight / "metrics.jsonl").read_text().splitlines()[-1],
                    (chained / "metrics.jsonl").read_text().splitlines()[-1]] if code == 0 else ["", "?"]
            identical += same
            print(f"{name}: kills={kills} exit={code} weights_identical={same} "
                  f"last_metrics_equal={_strip_timing(last[0]) == _strip_timing(last[1])}", flush=True)
    print(f"chains={min(args.chains, len(CHAINS))} identical={identical} kills={total_kills}")
    return 0


def _strip_timing(line: str) -> dict:
    import json

    if not line:
        return {}
    row = json.loads(line)
    return {k: v for k, v in row.items() if "timing" not in k and "per_s" not in k and k != "time"}


if __name__ == "__main__":
    sys.exit(main())
