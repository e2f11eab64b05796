"""SFT training throughput: tokens/s of the real training step (NELBO forward +
backward + AdamW), measured side by side in one run.

    python -m benchmarks.sft [--steps 6] [--warmup 2] [--presets tiny,small]

CPU: the SDPA path for each preset, unpacked vs packed (ratio printed).
GPU (when CUDA is available): also FlexAttention vs SDPA on the small preset,
bf16 autocast, with MFU against the device's dense bf16 peak.

tokens/s counts real (non-padding) prompt+response tokens of the batch; the
step itself processes ``(copies + 1) x`` that many positions (the ``[x_t ; x_0]``
layout). Prints ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dirl import config as config_lib
from dirl.train.sft.config import SFTConfig
from dirl.train.sft.loop import build_run, train_step

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _config(preset: str, pack: bool, device: str, attn_impl: str, out: str) -> SFTConfig:
    return config_lib.load(SFTConfig, None, [
        f"model=init:{preset}", "data.source=task:arithmetic", "data.limit=512", "data.max_length=128",
        f"pack={str(pack).lower()}", "batch_size=16", "complementary_masks=true", f"device={device}",
        f"attn_impl={attn_impl}", "progress=false", f"out={out}", "max_steps=1000"])


def measure(preset: str, pack: bool, device: str = "cpu", attn_impl: str = "sdpa", steps: int = 6,
            warmup: int = 2) -> dict:
    """tokens/s and processed positions/s of ``steps`` timed steps after ``warmup`` steps."""
    with tempfile.TemporaryDirectory() as out:
        run = build_run(_config(preset, pack, device, attn_impl, out))
        for _ in range(warmup):
            train_step(run)
        sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
        sync()
        start, tokens, positions = time.perf_counter(), 0, 0
        for _ in range(steps):
            metrics = train_step(run)
            tokens += metrics["num_tokens"]
            positions += metrics["num_positions"]
        sync()
        elapsed = time.perf_counter() - start
        num_params = sum(p.numel() for p in run.model.parameters())
        return {"tokens_per_s": tokens / elapsed, "positions_per_s": positions / elapsed,
                "num_params": num_params, "steps_per_s": steps / elapsed}


def cpu_section(presets: list[str], steps: int, warmup: int) -> None:
    for preset in presets:
        unpacked = measure(preset, False, steps=steps, warmup=warmup)
        packed = measure(preset, True, steps=steps, warmup=warmup)
        print(f"sft_cpu_{preset}_sdpa_unpacked_tokens_per_s={unpacked['tokens_per_s']:.0f}")
        print(f"sft_cpu_{preset}_sdpa_packed_tokens_per_s={packed['tokens_per_s']:.0f}")
        print(f"sft_cpu_{preset}_packed_over_unpacked={packed['tokens_per_s'] / unpacked['tokens_per_s']:.2f}")


def gpu_section(steps: int, warmup: int) -> None:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    results = {}
    for impl in ("sdpa", "flex"):
        # flex compiles per shape: extra warm-up steps absorb the compile.
        results[impl] = measure("small", True, device="cuda", attn_impl=impl, steps=steps * 4,
                                warmup=warmup + (3 if impl == "flex" else 0))
        print(f"sft_gpu_small_{impl}_packed_tokens_per_s={results[impl]['tokens_per_s']:.0f}")
        if peak:
            # 6 N FLOPs per processed position (forward + backward), attention excluded.
            flops = 6 * results[impl]["num_params"] * results[impl]["positions_per_s"]
            print(f"sft_gpu_small_{impl}_mfu={flops / peak:.4f}")
    print(f"sft_gpu_small_flex_over_sdpa={results['flex']['tokens_per_s'] / results['sdpa']['tokens_per_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch_threads={torch.get_num_threads()}")
    cpu_section(args.presets.split(","), args.steps, args.warmup)
    if torch.cuda.is_available():
        gpu_section(args.steps, args.warmup)


if __name__ == "__main__":
    main()
