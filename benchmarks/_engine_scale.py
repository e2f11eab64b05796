"""Engine at scale (issue 19), the measurements behind ``python -m benchmarks.engine``'s last lines.

* :func:`long_generation` -- per-step cost over a long generation (first vs last
  tokens), that ratio over its floor set by attention's multiply-adds
  (:func:`long_gen_flop_floor`), and the peak memory of that generation against the
  cache's theoretical size; run in a child process so its peak RSS is its own.
* :func:`engine_vs_ar` -- tokens/s of the engine (dynamic decoding) against
  transformers' ``Qwen3ForCausalLM.generate`` with its KV cache on the same weights
  (SDAR uses Qwen3's parameter names, so the state dict loads as-is).
* :func:`batch_forward_ratio` -- model calls for a batch against the mean calls for
  each of its prompts alone.

Model calls are counted and timed with forward pre-hooks, so the numbers need
nothing from the engine beyond its public ``generate``. Times are CPU time of this
process (``time.process_time``; one intra-op thread): on a machine shared with
other jobs, wall time mostly measures their load, which drifts over a run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dirl.engine.engine import Engine
from dirl.rollout import SamplingParams


class CallClock:
    """Counts a model's calls and stamps the start of each (a forward pre-hook)."""

    def __init__(self, model):
        self.stamps: list[float] = []
        self._handle = model.register_forward_pre_hook(lambda module, args: self.stamps.append(time.process_time()))

    def reset(self) -> None:
        self.stamps.clear()

    @property
    def calls(self) -> int:
        return len(self.stamps)

    def close(self) -> None:
        self._handle.remove()


def qwen3_from(model):
    """transformers' Qwen3ForCausalLM on ``model``'s weights (strict load), SDPA attention."""
    import transformers

    cfg = model.config
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                  rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=max(cfg.max_position_embeddings, 8192),
                  tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
                  use_sliding_window=False, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
                  bos_token_id=cfg.bos_token_id)
    try:  # transformers >= 5 groups RoPE settings
        hf_cfg = transformers.Qwen3Config(**kwargs, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": cfg.rope_theta})
    except TypeError:
        hf_cfg = transformers.Qwen3Config(**kwargs, rope_theta=cfg.rope_theta)
    hf_cfg._attn_implementation = "sdpa"
    param = next(model.parameters())
    hf = transformers.Qwen3ForCausalLM(hf_cfg).to(param.dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def ar_generate(hf, prompts: list[list[int]], new_tokens: int) -> None:
    """Greedy AR decoding of exactly ``new_tokens`` per prompt (left-padded batch, KV cache on)."""
    width = max(len(p) for p in prompts)
    pad = hf.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, use_cache=True, pad_token_id=pad, eos_token_id=None)


def engine_vs_ar(model, prompts: list[list[int]], new_tokens: int, batch_sizes=(1, 8), repeats: int = 2,
                 compile: bool = False) -> dict:
    """Tokens/s of the engine (dynamic, tau 0.9, greedy) / tokens/s of AR generate, per batch size.

    Both decode exactly ``new_tokens`` per prompt (no stop token), so the ratio of
    tokens/s is the ratio of wall times. Batch 1 decodes the prompts one at a time.
    The contenders alternate ``repeats`` times and each keeps its best time: on a shared
    machine the minimum is the least disturbed run, and alternating exposes all to the
    same load. ``compile``: the engine with ``compile=True`` runs alongside (``*_compiled``
    keys); its warm-up, which compiles every graph the runs need, is timed apart.
    """
    hf = qwen3_from(model)
    engines = {"": Engine(model)} | ({"_compiled": Engine(model, compile=True)} if compile else {})
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, unmasking="dynamic", threshold=0.9)
    engines[""].generate(prompts[:1], params), ar_generate(hf, prompts[:1], 4)  # warm-up
    out: dict = {}
    if compile:
        start = time.process_time()
        for batch in batch_sizes:
            engines["_compiled"].generate(prompts[:batch], params)
        out["compile_seconds"] = round(time.process_time() - start, 1)
    for batch in batch_sizes:
        groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
        best = dict.fromkeys([*engines, "ar"], float("inf"))
        for _ in range(repeats):
            for name, engine in engines.items():
                start = time.process_time()
                rollouts = [r for g in groups for r in engine.generate(g, params)]
                best[name] = min(best[name], time.process_time() - start)
            start = time.process_time()
            for g in groups:
                ar_generate(hf, g, new_tokens)
            best["ar"] = min(best["ar"], time.process_time() - start)
        num_tokens = sum(r.num_tokens for r in rollouts)
        line = {f"speedup{name}": round(best["ar"] / best[name], 2) for name in engines}
        line |= {f"engine{name}_tokens_per_s": round(num_tokens / best[name], 1) for name in engines}
        out[f"b{batch}"] = dict(line, ar_tokens_per_s=round(len(prompts) * new_tokens / best["ar"], 1),
                                engine_tokens_per_forward=round(sum(len(r.token_ids) for r in rollouts)
                                                                / sum(r.num_forwards for r in rollouts), 3))
    return out


def batch_forward_ratio(model, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Model calls (prefill included) to decode ``prompts`` together / mean calls for each alone."""
    engine, clock = Engine(model), CallClock(model)
    rollouts = engine.generate(prompts, params)
    together = clock.calls
    alone = []
    for p in prompts:
        clock.reset()
        engine.generate([p], params)
        alone.append(clock.calls)
    clock.close()
    per_row = [r.num_forwards for r in rollouts]
    return dict(ratio=round(together / (sum(alone) / len(alone)), 3), batch_calls=together,
                alone_calls_mean=round(sum(alone) / len(alone), 1), row_forwards_min=min(per_row),
                row_forwards_max=max(per_row),
                tokens_per_forward=round(sum(len(r.token_ids) for r in rollouts) / sum(per_row), 3))


# -- long generation (child process) ------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def multiply_adds_per_query(cfg, num_keys: float) -> float:
    """Multiply-adds of one query position through the layers when it attends to ``num_keys`` keys.

    Per layer: the q/k/v/o projections and the SwiGLU MLP (the same at every position), plus
    q.k and the weighted sum of v over the keys (2 H D per key: what grows with the position).
    The LM head is left out: it runs on masked positions only, the same number in every
    window, so leaving it out raises the floor a little (V = 100 here: 0.3% of the layers)."""
    hidden, heads, kv_heads, dim = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dense = 2 * hidden * heads * dim + 2 * hidden * kv_heads * dim + 3 * hidden * cfg.intermediate_size
    return cfg.num_hidden_layers * (dense + 2 * heads * dim * num_keys)


def long_gen_flop_floor(cfg, prompt_len: int, new_tokens: int, window: int) -> float:
    """The long-generation step ratio if time followed multiply-adds: the cost per token of
    the last ``window`` tokens over the first (multiply-adds are linear in the keys, so a
    window's mean is its cost at its mean position)."""
    first = multiply_adds_per_query(cfg, prompt_len + window / 2)
    last = multiply_adds_per_query(cfg, prompt_len + new_tokens - window / 2)
    return last / first


def long_generation_child(model, batch: int, prompt_len: int, new_tokens: int, window: int) -> dict:
    """Static decoding, 2 tokens per forward, equal block-aligned prompts: every forward is one step
    of every row, so forward i commits tokens [2i, 2i + 2) of each row and time per token over a
    window of tokens is the mean forward interval over the matching forwards."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, unmasking="static",
                            steps_per_block=max(1, cfg.block_size // 2))
    engine = Engine(model)
    engine.generate(prompts, SamplingParams(max_new_tokens=2 * cfg.block_size, temperature=0.0))  # warm-up
    clock = CallClock(model)
    baseline = _rss_bytes()
    start = time.process_time()
    rollouts = engine.generate(prompts, params)
    end = time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stamps = clock.stamps[1:] + [end]  # decode forwards (the first call is the prefill)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    per_forward = rollouts[0].num_forwards and len(rollouts[0].token_ids) / rollouts[0].num_forwards
    num = max(1, int(window / per_forward))
    first, last = sum(steps[:num]) / num, sum(steps[-num:]) / num
    positions = sum(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    kv_bytes_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * \
        next(model.parameters()).element_size()
    floor = long_gen_flop_floor(cfg, prompt_len, new_tokens, window)
    return dict(long_gen_step_ratio=round(last / first, 3), flop_floor=round(floor, 3),
                long_gen_step_ratio_over_flop_floor=round(last / first / floor, 3), first_ms_per_token=round(1e3 * first / per_forward / batch, 3),
                last_ms_per_token=round(1e3 * last / per_forward / batch, 3), model_calls=clock.calls,
                seconds=round(end - start, 1), tokens_per_forward=round(per_forward, 3),
                peak_extra_mb=round((peak - baseline) / 2**20, 1),
                cache_theoretical_mb=round(positions * kv_bytes_per_token / 2**20, 1),
                peak_vs_cache=round((peak - baseline) / (positions * kv_bytes_per_token), 3))


def long_generation(module: str, args: list[str]) -> dict:
    """Run :func:`long_generation_child` in a fresh interpreter (``python -m module --long-gen-child``), started
    in the folder holding the ``benchmarks`` package so it imports wherever this one was run from."""
    done = subprocess.run([sys.executable, "-m", module, "--long-gen-child", *args], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])
