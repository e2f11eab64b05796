"""Peak memory of SFT and RL at the real vocabulary, old path vs new path (``dirl bench memory``).

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

Old-path sizes above ``--old-max`` scored tokens are not run (they need > 4 GB);
their memory is extrapolated linearly from the two largest measured sizes (the
head's memory is linear in N) and marked ``extrapolated``.

Prints ``sft_head_mem_ratio=`` (N = 4,096), ``rl_step_mem_ratio=`` (8 x 512),
``rl_rollouts_mem_spread=`` (new path, 8 / 16 / 32 rollouts at a fixed budget),
``sft_mem_exponent=`` / ``rl_mem_exponent=`` (log-log slope of step memory from
L = 1k to 4k, resp. 256 to 1024 response tokens), and the 8B memory plan.

    dirl bench memory [--quick] [--old-max 2048] [--budget 4096]
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

    from dirl.model.config import preset_config
    from dirl.model.transformer import SDARForCausalLM
    cfg = preset_config("tiny", vocab_size=VOCAB, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
                        pad_token_id=PAD_ID, bos_token_id=EOS_ID, block_size=BLOCK,
                        max_position_embeddings=32_768)
    torch.manual_seed(0)
    model = SDARForCausalLM(cfg)
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


def _child_sft(length: int, chunk: int, checkpointing: bool) -> None:
    import torch

    from dirl.algo.nelbo import draw_noise, sft_nelbo
    model = _narrow_model(chunk, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    prompt = 16
    ids = torch.randint(0, MASK_ID, (1, length))
    pos = torch.arange(length)[None]
    docs = torch.zeros_like(ids)
    response = pos >= prompt
    samples = torch.zeros_like(ids)
    noise = draw_noise(response, samples, torch.Generator().manual_seed(0), complementary=True)
    _warm_optimizer(model, optimizer)
    before = _rss_mb()
    loss, _ = sft_nelbo(model, ids, pos, docs, response, samples, noise, MASK_ID)
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

    from dirl.engine.engine import Rollout
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

    from dirl.algo.likelihood import PolicyDist
    from dirl.train.common import OptimConfig
    from dirl.train.rl_update import AlgoConfig, policy_update
    model = _narrow_model(chunk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rollouts = synthetic_rollouts(num, length)
    adv = torch.linspace(-1, 1, num)
    _warm_optimizer(model, optimizer)
    before = _rss_mb()
    policy_update(model, None, rollouts, adv, AlgoConfig(micro_batch_tokens=budget), PolicyDist(), optimizer,
                  None, OptimConfig(lr=1e-6), torch.Generator().manual_seed(0), length)
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


def _old_new(kind: str, sizes: list[int], old_max: int, old_args, new_args, scored) -> dict:
    rows = {}
    old_measured: dict[int, float] = {}
    for size in sizes:
        new = run_child(kind, *new_args(size))
        old = None
        if scored(size) <= old_max:
            old = run_child(kind, *old_args(size))
            old_measured[size] = old["step_mb"]
        rows[size] = {"new": new, "old": old}
        old_txt = f"{old['step_mb']:9.1f}" if old else "        -"
        print(f"{kind:5s} {size:6d}  old step_mb {old_txt}  new step_mb {new['step_mb']:8.1f}  "
              f"new peak_mb {new['peak_mb']:8.1f}", flush=True)
    for size in sizes:
        if rows[size]["old"] is None:
            rows[size]["old"] = {"step_mb": extrapolate(old_measured, size), "extrapolated": True}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--old-max", type=int, default=2048, help="largest old-path size run (scored tokens)")
    parser.add_argument("--budget", type=int, default=4096, help="RL micro-batch budget (packed tokens)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"head": _child_head, "sft": _child_sft, "rl": _child_rl}[kind](
            *[int(v) if v.lstrip("-").isdigit() else v == "True" for v in rest])
        return 0
    from dirl.model.lm_head import DEFAULT_CHUNK_SIZE as chunk
    head_sizes = [256, 512] if args.quick else [1024, 2048, 4096]
    sft_sizes = [256, 512] if args.quick else [1024, 2048, 4096]
    rl_sizes = [64, 128] if args.quick else [256, 512, 1024]
    head = _old_new("head", head_sizes, args.old_max, lambda n: (n, 0), lambda n: (n, chunk), lambda n: n)
    sft = _old_new("sft", sft_sizes, args.old_max, lambda n: (n, 0, False), lambda n: (n, chunk, True),
                   lambda n: n)
    rl = _old_new("rl", rl_sizes, args.old_max, lambda n: (8, n, 0, 0), lambda n: (8, n, chunk, args.budget),
                  lambda n: 8 * n)
    spread_len = rl_sizes[1]
    spread = {num: run_child("rl", num, spread_len, chunk, args.budget)["step_mb"] for num in (8, 16, 32)}
    n_head, n_rl = head_sizes[-1], rl_sizes[1]
    print(f"sft_head_mem_ratio={head[n_head]['old']['step_mb'] / head[n_head]['new']['step_mb']:.2f}"
          f"{' (old extrapolated)' if head[n_head]['old'].get('extrapolated') else ''} at N={n_head}")
    print(f"sft_step_mem_ratio={sft[sft_sizes[-1]]['old']['step_mb'] / sft[sft_sizes[-1]]['new']['step_mb']:.2f}"
          f"{' (old extrapolated)' if sft[sft_sizes[-1]]['old'].get('extrapolated') else ''} at L={sft_sizes[-1]}")
    print(f"rl_step_mem_ratio={rl[n_rl]['old']['step_mb'] / rl[n_rl]['new']['step_mb']:.2f}"
          f"{' (old extrapolated)' if rl[n_rl]['old'].get('extrapolated') else ''} at 8x{n_rl}")
    print(f"rl_rollouts_mem_spread={max(spread.values()) / min(spread.values()) - 1:.3f} "
          f"(step_mb at 8/16/32 rollouts x {spread_len}: {', '.join(f'{v:.0f}' for v in spread.values())})")
    print(f"sft_mem_exponent={exponent({n: r['new']['step_mb'] for n, r in sft.items()}):.2f}")
    print(f"rl_mem_exponent={exponent({n: r['new']['step_mb'] for n, r in rl.items()}):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
