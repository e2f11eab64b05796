"""Full-attention decoding: the exact decoder against Fast-dLLM's approximate prefix / dual cache.

On one random LLaDA-shaped model (``--family``, d 256, 4 layers; weights std 0.02), greedy
low_confidence decoding of 8 prompts (48-64 tokens, 128 new, blocks of 32, 8 steps a block):

* ``<mode>_seconds`` / ``<mode>_speedup``: wall time of ``Engine.generate`` (best of 2) vs ``none``;
* ``<mode>_drift_max`` / ``_mean``: |cached - recomputed| logits of the candidates at every window
  step (the recomputed ones: a full forward on the same state), max and mean over all of them;
* ``<mode>_token_agreement``: the share of response tokens equal to the exact decoder's;
* ``<mode>_ratio_*``: the DiPO importance ratio exp(trainer logp - engine logp) at the first PPO
  iteration (sampling at temperature 0.8, the ``trace`` estimator scoring the recorded states
  exactly): mean, max |log ratio|, and the share outside PPO's [0.8, 1.2] clip. ``none`` is 1.

    python -m benchmarks.fullattn_cache [--quick] [--family llada|dream]
"""

from __future__ import annotations

import argparse
import time

import torch

from dirl.algo.likelihood import EstimatorArgs, plan_estimator, score_plan
from dirl.engine import full_attention
from dirl.engine.engine import Engine
from dirl.model.families import get_family
from dirl.rollout import SamplingParams


def make_model(family: str, vocab: int = 128):
    fam = get_family(family)
    shape = {"llada": dict(d_model=256, n_layers=4, n_heads=8, mlp_hidden_size=512, vocab_size=vocab,
                           embedding_size=vocab),
             "dream": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                           intermediate_size=512, vocab_size=vocab)}[family]
    cfg = fam.config_cls(**{**fam.presets["tiny"], **shape, "mask_token_id": vocab - 1, "eos_token_id": 1,
                            "pad_token_id": 1})
    model = fam.model_cls(cfg)
    model.init_weights(0)
    return model.eval()


def drift(model, prompts, params) -> tuple[float, float]:
    """Max and mean |cached - recomputed| candidate logits over a whole decode."""
    rows = full_attention._Rows(model, [list(p) for p in prompts], list(range(len(prompts))), params)
    worst, total, count = 0.0, 0.0, 0
    with torch.no_grad():
        while rows.rows:
            if not rows.fresh:
                cand = rows.masked & rows.in_block()
                cached = full_attention._candidate_logits(model, rows, cand, params.cache)
                cache, rows.cache = rows.cache, None
                exact = full_attention._candidate_logits(model, rows, cand, "none")
                rows.cache = cache
                diff = (cached - exact).abs()
                worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
            full_attention._step(model, rows, params, params.unmasking)
            done = ~rows.masked.any(-1)
            if done.any():
                rows.keep(~done)
    return worst, total / max(1, count)


def ratios(model, prompts, params) -> dict[str, float]:
    rollouts = Engine(model).generate(prompts, params)
    plan = plan_estimator("trace", EstimatorArgs.for_model(model, rollouts, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        trainer = score_plan(model, plan, params)
    engine = torch.tensor([rollouts[s].logps[i] for s, i in zip(plan.pack.seq_index.tolist(),
                                                                 plan.pack.token_index.tolist())])
    log_ratio = trainer - engine
    ratio = log_ratio.exp()
    return {"ratio_mean": float(ratio.mean()), "ratio_max_abs_log": float(log_ratio.abs().max()),
            "ratio_outside_clip": float(((ratio < 0.8) | (ratio > 1.2)).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts, 64 new tokens")
    parser.add_argument("--family", default="llada", choices=["llada", "dream"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = make_model(args.family)
    count, new = (4, 64) if args.quick else (8, 128)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 120, (int(n),), generator=gen).tolist()
               for n in torch.randint(48, 65, (count,), generator=gen)]
    base = dict(max_new_tokens=new, unmasking="low_confidence", steps_per_block=8, block_length=32)
    exact_tokens, base_time = None, None
    for mode in ("none", "prefix", "dual"):
        params = SamplingParams(**base, temperature=0.0, cache=mode)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            out = Engine(model).generate(prompts, params)
            times.append(time.perf_counter() - start)
        seconds = min(times)
        tokens = [t for r in out for t in r.token_ids]
        exact_tokens, base_time = (tokens, seconds) if mode == "none" else (exact_tokens, base_time)
        print(f"{mode}_seconds={seconds:.3f}")
        print(f"{mode}_speedup={base_time / seconds:.2f}")
        print(f"{mode}_token_agreement={sum(a == b for a, b in zip(tokens, exact_tokens)) / len(tokens):.3f}")
        if mode != "none":
            worst, mean = drift(model, prompts, params)
            print(f"{mode}_drift_max={worst:.4g}")
            print(f"{mode}_drift_mean={mean:.4g}")
        for key, value in ratios(model, prompts, SamplingParams(**base, temperature=0.8, cache=mode)).items():
            print(f"{mode}_{key}={value:.4g}")


if __name__ == "__main__":
    main()
