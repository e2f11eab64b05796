"""Peak memory of SFT and RL at the real vocabulary, old path vs new path (``python -m benchmarks.memory``).

A narrow model (the ``tiny`` preset: d 64, 2 layers) with SDAR-8B's vocabulary
(V = 151,936), so the LM head dominates exactly as it does at 8B. Every
configuration runs in a fresh subprocess (``OMP_NUM_THREADS=1``) so its max RSS
(``resource.getrusage``) is its own; ``step_mb`` is that peak minus the RSS just
before the step (Python + torch + model + optimizer: the part the step does not
cause), and the ratios compare ``step_mb``. On CUDA the same numbers are
``torch.cuda.max_memory_allocated``.

* ``head``  -- the LM head + log-softmax + backward alone at N scored positions;
  old = the unchunked (N, V) logits (``head_chunk_size=0``, the pre-change ops).
* ``sft``   -- one SFT step (NELBO forward + backward + AdamW) on one packed row of
  L tokens with complementary masks (so ~L scored positions).
* ``rl``    -- one DiPO update (exact trace estimator, beta 0) of R rollouts x L
  response tokens, 1 token committed per step (4 copies per block of 4: a trace
  row is ~5 L tokens); old = one micro-batch and the unchunked head, new = micro-
  batches of ``--budget`` packed tokens and the chunked head.

The old path is run only at sizes that stay under ~4 GB (the machine is shared):
N, L <= 2k for head and SFT, 8 x {64, 128} for RL. At larger sizes its memory is
extrapolated linearly from the two largest measured sizes (the head's memory is
linear in N) and marked ``extrapolated``.

Prints ``sft_head_mem_ratio=`` (N = 4,096), ``rl_step_mem_ratio=`` (8 x 512),
``rl_rollouts_mem_spread=`` (new path, 8 / 16 / 32 rollouts at a fixed budget),
``sft_rows_peak_mb=`` (the process's peak RSS of an SFT step on 4 packed rows of 2,048),
``sft_mem_exponent=`` / ``rl_mem_exponent=`` (log-log slope of step memory from
L = 1k to 4k, resp. 256 to 1024 response tokens), and the 8B memory plan.

    python -m benchmarks.memory [--quick] [--budget 4096]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

VOCAB = 151_936
MASK_ID, EOS_ID, PAD_ID = 151_669, 151_645, 151_643
BLOCK = 4


# ---------------------------------------------------------------- children (one configuration each)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _narrow_model(chunk: int, checkpointing: bool = False):
    import torch

    from dirl.model.families import get_family
    from dirl.runtime import return_freed_memory
    return_freed_memory()  # as CPU training does (dirl.train.setup)
    sdar = get_family("sdar")
    cfg = sdar.config_cls.for_init(sdar.presets["tiny"], vocab_size=VOCAB, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
                                   pad_token_id=PAD_ID, block_size=BLOCK, torch_dtype="float32",
                                   max_position_embeddings=32_768)
    torch.manual_seed(0)
    model = sdar.model_cls(cfg)
    model.init_weights(0)
    model.head_chunk_size, model.activation_checkpointing = chunk, checkpointing
    return model


def _child_head(n: int, chunk: int) -> None:
    import torch

    from dirl.model.lm_head import token_logprobs
    model = _narrow_model(chunk)
    hidden = torch.randn(n, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(0, MASK_ID, (n,))
    before = _rss_mb()
    logp = token_logprobs(hidden, model.lm_head.weight, targets, chunk_size=chunk)
    (-logp.mean()).backward()
    _report(before)


def _child_sft(length: int, chunk: int, checkpointing: bool, rows: int = 1) -> None:
    import torch

    from dirl.algo.nelbo import TokenBatch, draw_noise, sft_nelbo
    model = _narrow_model(chunk, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    prompt = 16
    ids = torch.randint(0, MASK_ID, (rows, length))
    pos = torch.arange(length)[None].expand(rows, -1)
    docs = torch.zeros_like(ids)
    response = pos >= prompt
    samples = torch.zeros_like(ids)
    noise = draw_noise(response, samples, torch.Generator().manual_seed(0), complementary=True)
    _warm_optimizer(model, optimizer)
    before = _rss_mb()
    loss, _ = sft_nelbo(model, TokenBatch(ids, pos, docs, response, samples), noise, MASK_ID)
    loss.backward()
    optimizer.step()
    _report(before)


def _warm_optimizer(model, optimizer) -> None:
    """Allocate the AdamW moments before measuring (they are state, not the step's)."""
    for p in model.parameters():
        p.grad = p.detach() * 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synthetic_rollouts(num: int, length: int, prompt_len: int = 16, seed: int = 0):
    """``num`` rollouts of ``length`` tokens, one token committed per step (left to right in a block)."""
    import torch

    from dirl.rollout import Rollout
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(num):
        tokens = torch.randint(0, MASK_ID, (length,), generator=gen).tolist()
        prompt = torch.randint(0, MASK_ID, (prompt_len,), generator=gen).tolist()
        out.append(Rollout(prompt, tokens, list(range(length)), [-1.0] * length, length, "length", length,
                           prompt_index=s // 8, sample_index=s))
    return out


def _child_rl(num: int, length: int, chunk: int, budget: int) -> None:
    import torch

    from dirl.rollout import SamplingSpec
    from dirl.train.optim import OptimConfig
    from dirl.train.rl.config import AlgoConfig
    from dirl.train.rl.update import Learner, policy_update
    model = _narrow_model(chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rollouts = synthetic_rollouts(num, length)
    adv = torch.linspace(-1, 1, num)
    _warm_optimizer(model, optimizer)
    before = _rss_mb()
    learner = Learner(model, None, optimizer, None, OptimConfig(lr=1e-6), AlgoConfig(micro_batch_tokens=budget),
                      SamplingSpec(max_new_tokens=length))
    policy_update(learner, rollouts, adv, torch.Generator().manual_seed(0))
    _report(before)


def _report(before_mb: float) -> None:
    peak = _peak_mb()
    print(json.dumps({"peak_mb": round(peak, 1), "before_mb": round(before_mb, 1),
                      "step_mb": round(peak - before_mb, 1)}))


# ---------------------------------------------------------------- parent


def run_child(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extrapolate(points: dict[int, float], x: int) -> float:
    """Linear through the two largest measured sizes."""
    (x0, y0), (x1, y1) = sorted(points.items())[-2:]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def exponent(mem: dict[int, float]) -> float:
    (x0, y0), (x1, y1) = sorted(mem.items())[0], sorted(mem.items())[-1]
    return math.log(y1 / y0) / math.log(x1 / x0)


def _old_new(kind: str, new_sizes: list[int], old_sizes: list[int], old_args, new_args) -> dict:
    """step_mb of the new path at ``new_sizes`` and of the old one at ``old_sizes`` (the rest
    extrapolated linearly from the two largest old sizes)."""
    rows = {size: {"new": run_child(kind, *new_args(size))} for size in new_sizes}
    old = {size: run_child(kind, *old_args(size)) for size in old_sizes}
    for size in sorted(set(new_sizes) | set(old_sizes)):
        new_txt = f"{rows[size]['new']['step_mb']:8.1f} (peak {rows[size]['new']['peak_mb']:7.1f})" \
            if size in rows else "       -"
        old_txt = f"{old[size]['step_mb']:9.1f} (peak {old[size]['peak_mb']:7.1f})" if size in old else "        -"
        print(f"{kind:5s} {size:6d}  old step_mb {old_txt}  new step_mb {new_txt}", flush=True)
    measured = {size: r["step_mb"] for size, r in old.items()}
    for size in new_sizes:
        rows[size]["old"] = old.get(size) or {"step_mb": extrapolate(measured, size), "extrapolated": True}
    return rows


def _ratio_line(name: str, rows: dict, size: int, label: str) -> str:
    old, new = rows[size]["old"], rows[size]["new"]
    note = " (old extrapolated from smaller sizes)" if old.get("extrapolated") else ""
    return f"{name}={old['step_mb'] / new['step_mb']:.2f} at {label}{note}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--budget", type=int, default=4096, help="RL micro-batch budget (packed tokens)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"head": _child_head, "sft": _child_sft, "rl": _child_rl}[kind](
            *[int(v) if v.lstrip("-").isdigit() else v == "True" for v in rest])
        return 0
    from dirl.model.lm_head import DEFAULT_CHUNK_SIZE as chunk
    scale = 4 if args.quick else 1
    lengths = [1024 // scale, 2048 // scale, 4096 // scale]
    rl_lengths = [256 // scale, 512 // scale, 1024 // scale]
    # Old paths only up to ~4 GB (the machine is shared): the rest is extrapolated linearly.
    head = _old_new("head", lengths, lengths[:2], lambda n: (n, 0), lambda n: (n, chunk))
    sft = _old_new("sft", lengths, lengths[:2], lambda n: (n, 0, False), lambda n: (n, chunk, True))
    rl = _old_new("rl", rl_lengths, [64 // scale, 128 // scale], lambda n: (8, n, 0, 0),
                  lambda n: (8, n, chunk, args.budget))
    spread_len = rl_lengths[0]
    spread = {num: run_child("rl", num, spread_len, chunk, args.budget)["step_mb"] for num in (8, 16, 32)}
    print(_ratio_line("sft_head_mem_ratio", head, lengths[-1], f"N={lengths[-1]}"))
    print(_ratio_line("sft_step_mem_ratio", sft, lengths[-1], f"L={lengths[-1]}"))
    print(_ratio_line("rl_step_mem_ratio", rl, rl_lengths[1], f"8x{rl_lengths[1]}"))
    print(f"rl_rollouts_mem_spread={max(spread.values()) / min(spread.values()) - 1:.3f} "
          f"(step_mb at 8/16/32 rollouts x {spread_len}, budget {args.budget}: "
          f"{', '.join(f'{v:.0f}' for v in spread.values())})")
    print(f"sft_mem_exponent={exponent({n: r['new']['step_mb'] for n, r in sft.items()}):.2f}")
    print(f"rl_mem_exponent={exponent({n: r['new']['step_mb'] for n, r in rl.items()}):.2f}")
    rows = run_child("sft", lengths[1], chunk, True, 4)  # the issue-31 goal: 4 x 2,048 at <= 1.0 GB peak
    print(f"sft_rows_peak_mb={rows['peak_mb']:.0f} (4 rows x {lengths[1]}, peak RSS of the process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
