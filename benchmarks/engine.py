"""Engine benchmark: the KV-cached rollout engine against the no-cache reference, in one run.

Both decoders get the same prompts and the same sampling parameters. The speed
comparison uses a forced commit rule (``static``: a fixed number of tokens per
forward), so both do exactly the same number of forwards and produce the same
tokens (checked: ``outputs_identical``). Then the cached engine measures
decoding parallelism -- committed tokens per forward -- for dynamic unmasking
(tau = 0.9, and a lower tau) against static.

A randomly initialised model is nearly uniform over the vocabulary (confidence
about 1/V), so dynamic unmasking at tau = 0.9 commits ~1 token per forward; the
low-threshold line shows the parallel path working. Pass ``--model DIR`` to
measure a trained checkpoint instead.

    python -m benchmarks.engine [--quick]

Issue 19's lines come after (:mod:`benchmarks._engine_scale`): ``long_gen_step_ratio``
(time per token over the last vs the first ``--long-window`` tokens of a
``--long-tokens`` generation at batch ``--long-batch``, with its peak memory
against the cache's theoretical size), ``engine_vs_ar_speedup_b1`` / ``_b8``
(tokens/s of dynamic decoding vs transformers' AR ``generate`` with a KV cache on
the same weights: the shipped demo checkpoint, and a random ``small`` model with
SDAR's real vocabulary of 151,936) and ``batch_forward_ratio`` (model calls for 8
prompts together vs each alone, dynamic decoding on the demo checkpoint).

Issue 29's lines close the run (:mod:`benchmarks._engine_throughput`): continuous vs
chunked batching on 64 prompts x 4 with heavy-tailed lengths at ``max_batch_rows`` 16
and 64 (``batch_occupancy``, ``calls_vs_ideal``, ``tokens_per_s``, both schedules in one
run), the same for the full-attention decoder (``fullattn_*``: a random tiny LLaDA, the lengths as
forward counts), an RL-scale line with rows >> batch (``rlscale_*``: 16 prompts x 32 at 96 rows,
sdar-8b-rl's shape), and the RL rollout phase (the demo checkpoint, 16 prompts x 8, 32 rows) under each.

Prints ``key=value`` lines; the headline is ``engine_speedup_vs_nocache``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks import _engine_scale as scale
from benchmarks import _engine_throughput as throughput
from dirl.demo import SHIPPED_SFT
from dirl.engine.engine import Engine
from dirl.rollout import Rollout, SamplingParams
from dirl.model.factory import InitConfig, init_model
from dirl.model.tokenizer import char_tokenizer


def make_prompts(count: int, min_len: int, max_len: int, vocab: tuple[int, int], seed: int) -> list[list[int]]:
    """Random token prompts of mixed lengths (some multiples of B, some not)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(vocab[0], vocab[1], (n,), generator=gen).tolist() for n in lengths]


def timed_generate(engine: Engine, prompts, params: SamplingParams) -> tuple[list[Rollout], float]:
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    return rollouts, time.perf_counter() - start


def tokens_per_forward(rollouts: list[Rollout]) -> float:
    """Committed positions per model forward (decoding parallelism)."""
    return sum(len(r.token_ids) for r in rollouts) / max(1, sum(r.num_forwards for r in rollouts))


def load_model(args):
    """A random ``args.preset`` model on the char tokenizer, or a checkpoint directory."""
    if args.model:
        from dirl.model.checkpoint import load_pretrained

        model, _ = load_pretrained(args.model)
    else:
        model = init_model(InitConfig(preset=args.preset, block_size=args.block_size, seed=args.seed),
                           char_tokenizer())
    return model.eval()


def run_engine_benchmark(args) -> dict[str, float | bool | int | str]:
    """Measure everything; returns the numbers printed by :func:`main`."""
    model = load_model(args)
    cfg = model.config
    first = 4 if cfg.vocab_size > 4 else 0  # skip the char tokenizer's special ids in random prompts
    prompts = make_prompts(args.batch, args.min_prompt, args.max_prompt, (first, cfg.vocab_size), args.seed)
    speed = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, unmasking="static",
                           steps_per_block=args.steps_per_block or max(1, cfg.block_size // 2), seed=args.seed)
    cached, nocache = Engine(model, use_cache=True), Engine(model, use_cache=False)
    warm = SamplingParams(max_new_tokens=2 * cfg.block_size, temperature=0.0)
    cached.generate(prompts[:2], warm), nocache.generate(prompts[:2], warm)
    fast, t_cached = timed_generate(cached, prompts, speed)
    slow, t_nocache = timed_generate(nocache, prompts, speed)
    num_tokens = sum(r.num_tokens for r in fast)
    out = {
        "model": args.model or f"{args.preset} (random init)",
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch": args.batch, "new_tokens": args.new_tokens, "block_size": cfg.block_size,
        "steps_per_block": speed.steps_per_block, "threads": torch.get_num_threads(),
        "forwards_per_sequence": fast[0].num_forwards,
        "outputs_identical": all(a.token_ids == b.token_ids and a.steps == b.steps for a, b in zip(fast, slow)),
        "engine_seconds": round(t_cached, 3), "nocache_seconds": round(t_nocache, 3),
        "engine_tokens_per_s": round(num_tokens / t_cached, 1),
        "nocache_tokens_per_s": round(num_tokens / t_nocache, 1),
        "engine_speedup_vs_nocache": round(t_nocache / t_cached, 2),
    }
    # A random model's confidences are ~1/V: the low threshold sits just above that.
    low = args.low_threshold or (round(1.5 / cfg.vocab_size, 4) if not args.model else 0.5)
    for name, threshold in (("dynamic", 0.9), (f"dynamic_tau{low:g}", low)):
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, unmasking="dynamic",
                                threshold=threshold, seed=args.seed)
        out[f"tokens_per_forward_{name}"] = round(tokens_per_forward(cached.generate(prompts, params)), 3)
    out["tokens_per_forward_static"] = round(tokens_per_forward(fast), 3)  # the speed run above
    return out


DEMO_CHECKPOINT = SHIPPED_SFT
REAL_VOCAB = 151_936  # SDAR-8B-Chat's tokenizer (/work/shared/sdar-8b-chat)


def demo_prompts(tokenizer, count: int) -> list[list[int]]:
    """Held-out prompts of the demo task, as the demo's RL sees them."""
    from dirl.data import get_task
    from dirl.data.templates import render_prompt
    from dirl.demo import DemoConfig

    task = get_task(DemoConfig().task, **DemoConfig().task_params)
    return [tokenizer.encode(render_prompt("plain", row)) for row in task.generate("test", count)]


def real_vocab_model(args):
    """A random ``small`` model with SDAR's real vocabulary size and special ids."""
    from dirl.model.families import get_family

    sdar = get_family("sdar")
    cfg = sdar.config_cls.for_init(sdar.presets[args.preset], vocab_size=REAL_VOCAB, mask_token_id=151669,
                                   eos_token_id=151643, pad_token_id=151643, block_size=args.block_size,
                                   torch_dtype="float32")
    model = sdar.model_cls(cfg)
    model.init_weights(args.seed)
    return model.eval()


def run_scale_benchmark(args) -> dict[str, float | int | str]:
    """Issue 19's lines: long generation, engine vs AR, batch forward ratio."""
    from dirl.model.checkpoint import load_pretrained

    out: dict[str, float | int | str] = {}
    child = ["--preset", args.preset, "--block-size", str(args.block_size), "--threads", str(args.threads),
             "--long-batch", str(args.long_batch), "--long-tokens", str(args.long_tokens),
             "--long-window", str(args.long_window), "--long-prompt", str(args.long_prompt), "--seed", str(args.seed)]
    # The long generation runs in a fresh interpreter, so its peak RSS is its own (quick: in-process).
    if args.skip_long:
        long_gen = {}
    elif args.quick:
        long_gen = scale.long_generation_child(load_model(args), args.long_batch, args.long_prompt,
                                               args.long_tokens, args.long_window)
    else:
        long_gen = scale.long_generation("benchmarks.engine", child)
    for key, value in long_gen.items():
        out[key if key.startswith("long_gen_step_ratio") else f"long_gen_{key}"] = value
    demo, tokenizer = load_pretrained(str(DEMO_CHECKPOINT))
    demo = demo.eval()
    prompts = demo_prompts(tokenizer, args.ar_prompts)
    params = SamplingParams(max_new_tokens=args.ar_tokens, temperature=0.0, unmasking="dynamic", threshold=0.9)
    for key, value in scale.batch_forward_ratio(demo, prompts[:8], params).items():
        out["batch_forward_ratio" if key == "ratio" else f"batch_forward_{key}"] = value
    models = [("", demo)] + ([] if args.quick else [("_real_vocab", real_vocab_model(args))])
    for suffix, model in models:
        if suffix:  # random prompts over the real vocabulary (ids of the byte-level range)
            gen = torch.Generator().manual_seed(args.seed)
            prompts = [torch.randint(1000, 50000, (len(p),), generator=gen).tolist() for p in prompts]
        # torch.compile on the demo model only: the real-vocabulary runs are the LM head's, not the step's.
        lines = scale.engine_vs_ar(model, prompts, args.ar_tokens, repeats=args.repeats,
                                   compile=not (suffix or args.no_compile))
        if "compile_seconds" in lines:
            out["engine_compile_seconds"] = lines.pop("compile_seconds")
        for batch, line in lines.items():
            for key, value in line.items():  # speedup -> engine_vs_ar_speedup_b1, speedup_compiled -> ..._b1_compiled
                name = f"engine_vs_ar_{key.replace('speedup', f'speedup_{batch}')}" if key.startswith("speedup") \
                    else f"{key}_{batch}"
                out[name + suffix] = value
    return out


def fullattn_model(seed: int, vocab: int = 512):
    """A random ``tiny`` LLaDA (2 layers, d 64) over ``vocab`` ids: [MASK] last, EOS 1, padding 0."""
    from dirl.model.families import get_family

    fam = get_family("llada")
    cfg = fam.config_cls(**{**fam.presets["tiny"], "vocab_size": vocab, "embedding_size": vocab,
                            "mask_token_id": vocab - 1, "eos_token_id": 1, "pad_token_id": 0})
    model = fam.model_cls(cfg)
    model.init_weights(seed)
    return model.eval()


def run_throughput_benchmark(args) -> dict[str, float | int | str]:
    """Issue 29's lines: continuous vs chunked batching on a heavy-tailed workload, and the RL
    rollout phase (the demo checkpoint, 16 prompts x 8, 32 rows) under each schedule."""
    from dirl.demo import DemoConfig
    from dirl.model.checkpoint import load_pretrained

    model = init_model(InitConfig(preset="tiny", block_size=args.block_size, seed=args.seed), char_tokenizer()).eval()
    rows = [int(r) for r in args.throughput_rows.split(",")]
    modes = {"continuous": {}, "shared": {"batching": "shared"}, "chunked": {"batching": "chunked"}}
    out = throughput.run(model, modes, rows, args.throughput_prompts, args.throughput_n, args.throughput_cap,
                         args.seed)
    # The cache's peak against the live rows' on a deeper model (a reshape's transient is one layer of L).
    deep = init_model(InitConfig(preset="tiny", block_size=args.block_size, seed=args.seed,
                                 model={"num_hidden_layers": 8}), char_tokenizer()).eval()
    line = throughput.run(deep, {"continuous": {}}, rows[:1], args.throughput_prompts, args.throughput_n,
                          args.throughput_cap, args.seed, reorder=False)
    out[f"kv_peak_vs_live_8_layers_r{rows[0]}"] = line[f"kv_peak_vs_live_continuous_r{rows[0]}"]
    # The full-attention decoder (a tiny random LLaDA) on the same lengths: forwards over whole sequences.
    out.update(throughput.run(fullattn_model(args.seed), modes, rows, args.throughput_prompts, args.throughput_n,
                              args.throughput_cap, args.seed, prefix="fullattn_"))
    # RL scale: rows >> batch (sdar-8b-rl: 16 prompts x 32 samples, 96 rows).
    scale_rows = (args.scale_rows,)
    out.update(throughput.run(model, modes, scale_rows, args.scale_prompts, args.scale_n, args.throughput_cap,
                              args.seed, prefix="rlscale_"))
    demo, tokenizer = load_pretrained(str(DEMO_CHECKPOINT))
    rl = DemoConfig().rl.rollout
    prompts = demo_prompts(tokenizer, rl.num_prompts)
    out.update(throughput.rl_rollout_phase(demo.eval(), tokenizer, prompts, rl.sampling, rl.group_size,
                                           args.rl_rows, repeats=1 if args.quick else 2))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (tiny preset, 4 prompts, 32 tokens)")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead of a random model")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--steps-per-block", type=int, default=0,
                        help="static steps per block in the speed comparison (default: B/2, two tokens per forward)")
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=48)
    parser.add_argument("--low-threshold", type=float, default=0.0,
                        help="the second dynamic threshold (default: 1.5/V for a random model, 0.5 for --model)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch default). 1 by default: on a shared 2-core "
                             "machine OpenMP barriers stall small matmuls (measured 12x slower with 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-batch", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=4096, help="length of the long generation")
    parser.add_argument("--long-window", type=int, default=512, help="tokens compared at its start and end")
    parser.add_argument("--long-prompt", type=int, default=32)
    parser.add_argument("--ar-tokens", type=int, default=64, help="tokens per prompt in the engine-vs-AR runs")
    parser.add_argument("--ar-prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="engine-vs-AR runs: best of this many")
    parser.add_argument("--no-compile", action="store_true",
                        help="engine-vs-AR without the torch.compile'd engine (its compile takes about a minute)")
    parser.add_argument("--skip-scale", action="store_true", help="only the cached-vs-reference lines")
    parser.add_argument("--skip-reference", action="store_true", help="only issue 19's lines")
    parser.add_argument("--skip-long", action="store_true", help="without the long generation")
    parser.add_argument("--throughput-prompts", type=int, default=64)
    parser.add_argument("--throughput-n", type=int, default=4)
    parser.add_argument("--throughput-rows", default="16,64", help="max_batch_rows values, comma-separated")
    parser.add_argument("--throughput-cap", type=int, default=256, help="max_new_tokens of the throughput workload")
    parser.add_argument("--scale-prompts", type=int, default=16, help="RL-scale line: prompts (sdar-8b-rl's 16)")
    parser.add_argument("--scale-n", type=int, default=32, help="RL-scale line: samples per prompt")
    parser.add_argument("--scale-rows", type=int, default=96, help="RL-scale line: max_batch_rows")
    parser.add_argument("--rl-rows", type=int, default=32, help="max_batch_rows of the RL rollout-phase line")
    parser.add_argument("--skip-throughput", action="store_true", help="without issue 29's lines")
    parser.add_argument("--only-throughput", action="store_true", help="only issue 29's lines")
    parser.add_argument("--long-gen-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.new_tokens, args.max_prompt = "tiny", 4, 32, 24
        args.long_batch, args.long_tokens, args.long_window, args.ar_tokens = 2, 64, 16, 8
        args.ar_prompts, args.repeats, args.no_compile = 2, 1, True
        args.throughput_prompts, args.throughput_rows, args.throughput_cap = 8, "4,8", 32
        args.scale_prompts, args.scale_n, args.scale_rows = 4, 8, 6
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.long_gen_child:
        model = load_model(args)
        print(json.dumps(scale.long_generation_child(model, args.long_batch, args.long_prompt, args.long_tokens,
                                                     args.long_window)))
        return 0
    if args.only_throughput:
        args.skip_reference = args.skip_scale = True
    results = {} if args.skip_reference else run_engine_benchmark(args)
    if not args.skip_scale:
        results.update(run_scale_benchmark(args))
    if not args.skip_throughput:
        results.update(run_throughput_benchmark(args))
    for key, value in results.items():
        print(f"{key}={value}")
    identical = all(v for k, v in results.items() if k == "outputs_identical" or "throughput_identical" in k)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
