"""RL benchmarks, measured side by side in one run (``python -m benchmarks.rl [--quick]``).

* ``trace_speedup_vs_expansion`` -- forward+backward of DiPO's packed trace vs
  DiRL's expansion (B full-length ``[x_t ; x_0]`` copies per response, copy j
  holding every block in its state before its j-th step) on the same rollouts,
  at 1 and 2 tokens per forward (static 4 and 2 steps per block). Both score the
  same states, so the benchmark also checks they give the same log-probs.
* ``sync_speedup`` -- making the trainer's weights visible to the engine:
  in-process (shared tensors; also an in-process state-dict copy into a separate
  engine model) vs a checkpoint save + reload.
* ``sync_fraction`` -- share of a native RL step's wall time spent on weight sync.
* ``rl_step_speedup`` -- whole RL step, native vs ``weight_sync=checkpoint``
  (a report: on small CPU models the reload is cheap; nothing is slowed down).
Prints ``name=value`` lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from dirl.algo.likelihood import EstimatorArgs, plan_estimator, score_plan
from dirl.backends import make_backend
from dirl.backends.options import CheckpointOptions
from dirl.engine.engine import Engine
from dirl.rollout import PolicyDist, SamplingParams, SamplingSpec
from dirl.model.masks import sft_meta
from dirl.model.policy import policy_logprobs
from dirl.model.forward import Readout
from dirl.model.loading import load_model_spec
from dirl.train.rl.config import RLConfig, RolloutConfig
from dirl.train.rl.loop import train_rl
from dirl.train.rl.config import AlgoConfig


def expansion_batch(rollouts, block_size: int, mask_id: int, pad_id: int):
    """DiRL's layout: per response, B rows ``[x_t^j ; x_0]`` (j = within-block step rank)."""
    rows, scores = [], []
    width = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    for s, r in enumerate(rollouts):
        seq, p = r.prompt_ids + r.token_ids, len(r.prompt_ids)
        ranks = []  # within-block rank of each generated token's step
        for i, step in enumerate(r.steps):
            block = (p + i) // block_size
            block_steps = sorted({r.steps[k] for k in range(len(r.steps)) if (p + k) // block_size == block})
            ranks.append(block_steps.index(step))
        for j in range(block_size):
            noisy = [mask_id if k >= p and ranks[k - p] >= j else t for k, t in enumerate(seq)]
            row = len(rows)
            rows.append((noisy + [pad_id] * (width - len(seq)), seq + [pad_id] * (width - len(seq)), len(seq)))
            scores += [(row * 2 * width + p + i, r.token_ids[i], s, i) for i in range(r.num_tokens) if ranks[i] == j]
    ids = torch.tensor([noisy + clean for noisy, clean, _ in rows])
    pos = torch.arange(width).expand(len(rows), width)
    docs = torch.stack([torch.where(torch.arange(width) < n, 0, -1) for _, _, n in rows])
    meta = sft_meta(pos, block_size, docs)
    cols = torch.tensor(scores).T
    return ids, torch.cat([pos, pos], 1), meta, cols


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_trace(model, prompts, max_new_tokens: int, steps_per_block: int, repeats: int) -> dict:
    cfg = model.config
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, unmasking="static",
                            steps_per_block=steps_per_block, n=1, seed=0)
    rollouts = Engine(model).generate(prompts, params)
    plan = plan_estimator("trace", EstimatorArgs(rollouts, cfg.block_size, cfg.mask_token_id, cfg.pad_token_id))
    ids, pos, meta, (index, targets, seq, tok) = expansion_batch(rollouts, cfg.block_size, cfg.mask_token_id,
                                                                 cfg.pad_token_id)

    def trace_step():
        model.zero_grad()
        score_plan(model, plan, PolicyDist()).sum().backward()

    def expansion_step():
        model.zero_grad()
        logits = model(ids, pos, meta, readout=Readout(index)).logits
        policy_logprobs(logits, mask_token_id=cfg.mask_token_id).gather(-1, targets[:, None]).sum().backward()

    with torch.no_grad():  # same states -> same log-probs (a correctness check of the baseline)
        trace_lp = score_plan(model, plan, PolicyDist())
        exp_lp = policy_logprobs(model(ids, pos, meta, readout=Readout(index)).logits,
                                 mask_token_id=cfg.mask_token_id).gather(-1, targets[:, None])
        order = {(s, t): v for s, t, v in zip(seq.tolist(), tok.tolist(), exp_lp.squeeze(-1).tolist())}
        diff = max(abs(order[(s, t)] - v) for s, t, v in zip(plan.pack.seq_index.tolist(),
                                                             plan.pack.token_index.tolist(), trace_lp.tolist()))
    t_trace, t_exp = _time(trace_step, repeats), _time(expansion_step, repeats)
    tpf = sum(len(r.token_ids) for r in rollouts) / sum(r.num_forwards for r in rollouts)
    return {"tokens_per_forward": tpf, "trace_s": t_trace, "expansion_s": t_exp, "speedup": t_exp / t_trace,
            "trace_tokens": plan.pack.input_ids.numel(), "expansion_tokens": ids.numel(), "max_logp_diff": diff}


def bench_sync(model, tokenizer, repeats: int) -> dict:
    native = make_backend("native", model, tokenizer)
    t_native = _time(native.sync_weights, repeats * 100)
    engine_copy = copy.deepcopy(model)

    def copy_sync():
        engine_copy.load_state_dict(model.state_dict())

    t_copy = _time(copy_sync, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        reload = make_backend("checkpoint", model, tokenizer, CheckpointOptions(workdir=tmp))
        t_reload = _time(reload.sync_weights, repeats)
    # Timer resolution bounds the native number; report against a 1 microsecond floor.
    return {"native_s": t_native, "copy_s": t_copy, "reload_s": t_reload,
            "speedup": t_reload / max(t_native, 1e-6), "speedup_copy": t_reload / t_copy}


def bench_rl_steps(preset: str, steps: int, workdir: Path, quick: bool) -> dict:
    out = {}
    for backend in ("native", "checkpoint"):
        cfg = RLConfig(model=f"init:{preset}", out=str(workdir / backend), data="task:arithmetic",
                       rewards={"gsm8k": 1.0}, max_steps=steps, log_every=0,
                       rollout=RolloutConfig(backend=backend, num_prompts=4 if quick else 8, group_size=4,
                                             sampling=SamplingSpec(max_new_tokens=16 if quick else 32,
                                                                   threshold=0.5)),
                       algo=AlgoConfig(beta=0.0))
        run = train_rl(cfg, progress=False)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up
        total = sum(r["timing/rollout"] + r["timing/reward"] + r["timing/train"] + r["timing/sync"] for r in rows)
        out[backend] = {"step_s": total / len(rows), "sync_s": sum(r["timing/sync"] for r in rows) / len(rows)}
    return {"rl_step_speedup": out["checkpoint"]["step_s"] / out["native"]["step_s"],
            "sync_fraction": out["native"]["sync_s"] / out["native"]["step_s"],
            "native_step_s": out["native"]["step_s"], "checkpoint_step_s": out["checkpoint"]["step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, fewer repeats")
    parser.add_argument("--preset", default=None)
    args = parser.parse_args()
    preset = args.preset or ("tiny" if args.quick else "small")
    torch.manual_seed(0)
    model, tokenizer = load_model_spec(f"init:{preset}")
    num_prompts, new_tokens, repeats = (4, 16, 2) if args.quick else (8, 64, 3)
    prompts = [tokenizer.encode(f"{a}+{a * 7 % 97}*{a % 9 + 2}=") for a in range(11, 11 + num_prompts)]
    print(f"preset={preset} prompts={num_prompts} new_tokens={new_tokens}")
    for steps_per_block in (4, 2):
        r = bench_trace(model, prompts, new_tokens, steps_per_block, repeats)
        tag = f"{r['tokens_per_forward']:.0f}tpf"
        print(f"trace_speedup_vs_expansion_{tag}={r['speedup']:.2f}")
        print(f"trace_s_{tag}={r['trace_s']:.4f} expansion_s_{tag}={r['expansion_s']:.4f} "
              f"trace_tokens_{tag}={r['trace_tokens']} expansion_tokens_{tag}={r['expansion_tokens']} "
              f"max_logp_diff_{tag}={r['max_logp_diff']:.2e}")
    s = bench_sync(model, tokenizer, repeats)
    print(f"sync_speedup={s['speedup']:.0f}")
    print(f"sync_speedup_inprocess_copy={s['speedup_copy']:.1f}")
    print(f"sync_native_s={s['native_s']:.2e} sync_copy_s={s['copy_s']:.4f} sync_reload_s={s['reload_s']:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        steps = bench_rl_steps(preset, 3 if args.quick else 4, Path(tmp), args.quick)
    print(f"sync_fraction={steps['sync_fraction']:.2e}")
    print(f"rl_step_speedup={steps['rl_step_speedup']:.3f}")
    print(f"native_step_s={steps['native_step_s']:.3f} checkpoint_step_s={steps['checkpoint_step_s']:.3f}")


if __name__ == "__main__":
    main()
