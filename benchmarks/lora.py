"""LoRA vs full fine-tuning in RL: peak memory at equal settings (``python -m benchmarks.lora [--quick]``).

Each run is a fresh subprocess (``--child``) doing the same DiPO run -- same base
checkpoint, prompts, rollout settings, ``beta > 0`` so a reference is needed --
once with full fine-tuning (a frozen copy of the model as reference, gradients
and two AdamW moments for every weight) and once with LoRA (reference = the base
with the adapters off, gradients and moments for the adapters only). Each child
reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); a third
child only imports dirl and loads the model, the fixed cost both pay.

``--precision bf16-mixed`` runs both in bf16-mixed (``compute.precision``): full
fine-tuning keeps fp32 masters (and the engine a bf16 decode copy), LoRA a bf16
frozen base with fp32 adapters.

The children run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``,
:data:`MMAP_THRESHOLD`): by default glibc raises it to the largest block freed, so
the forward's multi-MB activation temporaries come from the heap and ~0.4 GB of
freed blocks stays resident in *both* runs (measured: ``mallinfo2`` free-in-heap
after the trace forward; ``malloc_trim`` hands it back). With the threshold fixed
every large tensor is its own mapping, returned on free, so the peak RSS is what the
run holds. ``--glibc-default`` measures without it.

Prints ``name=value`` lines: ``rss_lora_over_full`` (total peak RSS ratio) and
``rss_above_baseline_lora_over_full`` (the same above the import + model
baseline), the peaks, and the trainable fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MMAP_THRESHOLD = 128 * 1024  # glibc's default start value, held fixed


def model_shape(hidden: int) -> list[str]:
    """8 Qwen3-shaped layers of width ``hidden`` (heads of 64, 4 query heads per KV head, SwiGLU
    width 8/3 d): d 1024 (the default) is 90M parameters, 0.36 GB in fp32 -- big enough that the
    weights, not the ~0.5 GB of imported libraries, dominate; --quick uses the `small` preset."""
    heads = hidden // 64
    return [f"model.hidden_size={hidden}", f"model.intermediate_size={64 * round(hidden * 8 / 3 / 64)}",
            "model.num_hidden_layers=8", f"model.num_attention_heads={heads}",
            f"model.num_key_value_heads={max(1, heads // 4)}", "model.head_dim=64"]

RL_SETTINGS = ["data=task:arithmetic", "max_steps=2", "rollout.num_prompts=2", "rollout.group_size=4",
               "rollout.sampling.max_new_tokens=16", "rollout.sampling.threshold=0.5", "algo.beta=0.01",
               "log_every=0", "save_every=0", "optim.lr=1e-4"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, base: str, out: str, rank: int, precision: str) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(1)
    from dirl import config as config_lib
    from dirl.model.loading import load_model_spec
    from dirl.model.lora import num_parameters
    from dirl.train.rl.config import RLConfig
    from dirl.train.rl.loop import train_rl

    result = {"mode": mode}
    if mode == "baseline":
        model, _ = load_model_spec(base)
        result["params"] = num_parameters(model)[1]
    else:
        overrides = [*RL_SETTINGS, f"model={base}", f"out={out}", f"lora.r={rank if mode == 'lora' else 0}",
                     f"compute.precision={precision}"]
        train_rl(config_lib.load(RLConfig, None, overrides), progress=False)
        if mode == "lora":
            model, _ = load_model_spec(base, lora=config_lib.load(RLConfig, None, [f"lora.r={rank}"]).lora)
            result["trainable"], result["params"] = num_parameters(model)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _run_child(mode: str, base: Path, out: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [sys.executable, __file__, "--child", mode, "--base", str(base), "--out", str(out), "--rank", str(args.rank),
           "--precision", args.precision]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small preset instead of the d-1024 model")
    parser.add_argument("--hidden", type=int, default=1024, help="model width (8 layers)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16-mixed"),
                        help="compute.precision of both runs")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold on")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.out, args.rank, args.precision)
        return
    from dirl import config as config_lib
    from dirl.model.factory import InitConfig, init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        shape = [] if args.quick else model_shape(args.hidden)
        init_checkpoint(config_lib.load(InitConfig, None, ["preset=small", *shape]), base)
        runs = {mode: _run_child(mode, base, Path(tmp) / mode, args) for mode in ("baseline", "full", "lora")}
    floor, full, lora = (runs[m]["peak_rss_mb"] for m in ("baseline", "full", "lora"))
    print(f"model={'small' if args.quick else f'd{args.hidden}x8'} params={runs['baseline']['params']} lora_r={args.rank} "
          f"precision={args.precision} malloc={'glibc-default' if args.glibc_default else 'mmap-threshold-fixed'} "
          f"settings={' '.join(RL_SETTINGS)}")
    print(f"trainable_fraction={runs['lora']['trainable'] / runs['lora']['params']:.4f}")
    print(f"peak_rss_full_mb={full:.0f} peak_rss_lora_mb={lora:.0f} baseline_rss_mb={floor:.0f}")
    print(f"rss_lora_over_full={lora / full:.3f}")
    print(f"rss_above_baseline_lora_over_full={(lora - floor) / (full - floor):.3f}")


if __name__ == "__main__":
    main()
