"""Engine throughput at RL scale (issue 29): continuous vs chunked batching on a heavy-tailed workload.

The workload: ``prompts`` random prompts (lengths uniform in [8, 24]) x ``n`` samples,
decoded by a random model whose rows stop at heavy-tailed lengths. A random model
never picks a stop token on purpose, so :func:`heavy_tailed` wraps its forward: the
stop token's probability at absolute position p is the hazard ``alpha / (p + c)``
(its logit is set so, against the other tokens' log-sum-exp). The survival of a row
is then about ``((p0 + c) / (p + c)) ** alpha``: a Pareto tail (alpha = 1.2, c = 16:
median ~30 generated tokens, ~7 % reach the 256-token cap), the shape of RL
responses (most short, a few at the cap).

Per engine and ``max_batch_rows`` R it reports:

* ``batch_occupancy``: mean rows per model call / R (every call counts, prefills too);
* ``calls_vs_ideal``: model calls / (row-forwards / R), where row-forwards is the
  rollouts' summed ``num_forwards`` (the denoising work, the same for every schedule);
* ``tokens_per_s``: generated tokens per CPU second of this process;
* ``calls_vs_ideal_floor``: the longest row's forwards / the ideal calls (at least 1): no
  schedule of these rows does better;
* ``*_longest_first``: occupancy and calls vs ideal with the rows fed longest first
  (an oracle that knows the lengths): the part of the gap the tail's order causes;
  ``*_long_prompt_first``: longest prompt first, a rule that knows only the prompts;
* ``kv_peak_vs_live``: the KV cache's peak bytes over the theoretical cache of the most
  rows live at once (:func:`kv_peak_vs_live`; time-shared: every row, each holds a cache row).

A full-attention model (LLaDA, Dream) decodes its whole response whatever it says, so the same
lengths become forward counts: :func:`eos_tail` makes a random model write left to right with the
same stop hazard and fill its tail with the stop token, decoded by the ``dynamic`` rule.
"""

from __future__ import annotations

import contextlib
import time

import torch

from dirl.engine.engine import Engine
from dirl.engine.kv_cache import KVCache
from dirl.rollout import SamplingParams
from dirl.runtime import prompt_seeds

ALPHA, OFFSET = 1.2, 16.0  # stop hazard alpha / (position + OFFSET)


def heavy_tailed(model, stop_id: int, alpha: float = ALPHA, offset: float = OFFSET) -> list[int]:
    """Patch ``model.forward`` so the stop token's probability at position p is ``alpha / (p + offset)``.

    Returns a list that gets the row count of every model call appended (the call counter)."""
    inner, mask_id, rows = model.forward, model.arch.mask_token_id, []

    def forward(input_ids, position_ids, meta, *args, readout=None, **kwargs):
        rows.append(input_ids.shape[0])
        out = inner(input_ids, position_ids, meta, *args, readout=readout, **kwargs) if readout is not None \
            else inner(input_ids, position_ids, meta, *args, **kwargs)
        if out.logits is None or out.logits.numel() == 0:
            return out
        logits = out.logits.reshape(-1, out.logits.shape[-1])  # (N, V)
        pos = position_ids.reshape(-1)
        if readout is not None and readout.index is not None:
            pos = pos[readout.index]
        hazard = (alpha / (pos.to(logits.dtype) + offset)).clamp(max=0.5)  # (N,)
        others = logits.clone()
        others[:, [stop_id, mask_id]] = float("-inf")
        logits[:, stop_id] = others.logsumexp(-1) + torch.log(hazard / (1 - hazard))
        return out

    model.forward = forward
    return rows


def eos_tail(model, stop_id: int, alpha: float = ALPHA, offset: float = OFFSET, sure: float = 30.0) -> list[int]:
    """Patch a full-attention model's forward into the same heavy-tailed writer, left to right.

    A full-attention row decodes its whole response, so what varies is its forward count under the
    ``dynamic`` rule. The patched model is sure of one token at each row's leftmost masked position
    (the frontier): the stop token with the hazard ``alpha / (p + offset)`` of :func:`heavy_tailed`,
    else a content token; past a committed stop token it is sure of the stop token (a trained LLaDA or
    Dream fills its tail with EOS); elsewhere it is uniform. At threshold 0.9 a row then commits its
    answer one token per forward, then the rest of the block and each later block in one forward: the
    block workload's lengths, if the vocabulary is large enough that 1 / V stays below the hazard at
    the cap (V = 512 at cap 256). Returns the call counter."""
    inner, mask_id, shift, rows = model.forward, model.arch.mask_token_id, model.arch.logit_shift, []

    def forward(input_ids, position_ids, meta, *args, readout=None, **kwargs):
        rows.append(input_ids.shape[0])
        out = inner(input_ids, position_ids, meta, *args, readout=readout, **kwargs)
        logits, width = out.logits.reshape(-1, out.logits.shape[-1]), input_ids.shape[1]  # (N, V)
        at = readout.index + shift  # (N,) the scored tokens' flat columns
        row, col = at // width, at % width
        cols = torch.arange(width, device=input_ids.device)
        first = lambda hit: torch.where(hit, cols, width).min(-1).values  # noqa: E731  (R,) first hit's column
        front, stop = (col == first(input_ids == mask_id)[row]), col > first(input_ids == stop_id)[row]
        pos = position_ids.reshape(-1)[at]
        hazard = (alpha / (pos.to(logits.dtype) + offset)).clamp(max=0.5)
        content = 4 + pos % (logits.shape[-1] - 6)  # a token that is neither special, stop nor [MASK]
        logits[~front & ~stop] = 0.0  # unsure elsewhere (1 / V): a sampled stop at the frontier is the most confident
        front = front.nonzero().squeeze(-1)
        logits[front, content[front]] = sure
        logits[front, stop_id] = sure + torch.log(hazard / (1 - hazard))[front]
        logits[stop.nonzero().squeeze(-1), stop_id] = 2 * sure
        return out

    model.forward = forward
    return rows


def workload(vocab: int, prompts: int, seed: int) -> list[list[int]]:
    """Prompt lengths uniform in [8, 24], ids below ``vocab`` (skipping the first 4 special ids)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (prompts,), generator=gen).tolist()
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


def cpu_clock() -> float:
    return time.process_time()


def measure(model, calls: list[int], prompts, params: SamplingParams, rows: int, clock=cpu_clock,
            **engine_options) -> dict:
    """One generate call at ``max_batch_rows = rows``: occupancy, calls vs ideal, tokens/s (``clock``:
    CPU seconds of this process by default; the GPU script passes a synchronising wall clock)."""
    engine = Engine(model, max_batch_rows=rows, **engine_options)
    calls.clear()
    with capture_caches() as caches:
        start = clock()
        rollouts = engine.generate(prompts, params)
        seconds = clock() - start
    row_forwards = sum(r.num_forwards for r in rollouts)
    # rows holding a cache row at once: the batch, or every row when time-shared (no budget here)
    live_rows = len(rollouts) if engine_options.get("batching") == "shared" else max(calls)
    floor = max(1.0, max(r.num_forwards for r in rollouts) / (row_forwards / rows))  # the longest row alone
    return {"calls_vs_ideal_floor": round(floor, 3),"batch_occupancy": round(sum(calls) / len(calls) / rows, 3),
            "calls_vs_ideal": round(len(calls) / (row_forwards / rows), 3),
            "model_calls": len(calls), "row_forwards": row_forwards,
            "tokens_per_s": round(sum(r.num_tokens for r in rollouts) / seconds, 1),
            "tokens": sum(r.num_tokens for r in rollouts), "_rollouts": rollouts} | \
        ({"kv_peak_vs_live": round(kv_peak_vs_live(model, caches, live_rows, prompts, params), 3)} if caches else {})


@contextlib.contextmanager
def capture_caches():
    """The KV caches the engine makes inside the block (a list, filled as they are made)."""
    caches: list[KVCache] = []
    original = KVCache.for_model
    KVCache.for_model = classmethod(lambda cls, *args: caches.append(original(*args)) or caches[-1])
    try:
        yield caches
    finally:
        KVCache.for_model = original


def kv_peak_vs_live(model, caches, live_rows: int, prompts, params: SamplingParams) -> float:
    """The caches' peak bytes (a reshape's transient layer included) over the theoretical cache of
    the most rows live at once, each row sized for what it may reach (longest prompt +
    ``max_new_tokens`` + 2 blocks: the engine's rectangular cache)."""
    arch, param = model.arch, next(model.parameters())
    per_slot = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * param.element_size()
    slots = max(len(p) for p in prompts) + params.max_new_tokens + 2 * arch.block_size
    peak = max((getattr(c, "peak_bytes", 0) for c in caches), default=0)  # 0: an engine without the record
    return peak / (live_rows * slots * per_slot)


def reordered(model, calls: list[int], prompts, params: SamplingParams, rows: int, order, forwards: list[int],
              reference: list) -> dict[str, float | bool]:
    """The same rows fed in another order (``order(row) -> sort key``, a stable sort). Rollouts do
    not depend on the order (checked), so only the schedule changes."""
    from dirl.engine.scheduler import ListFeed  # here: the harness also measures engines without it

    engine = Engine(model, max_batch_rows=rows)
    ordered = sorted(engine.rows(prompts, prompt_seeds(params.seed, len(prompts)), params), key=order)
    calls.clear()
    feed = ListFeed(ordered)
    engine.decode(feed, params)
    return {"identical": [(r.token_ids, r.steps) for r in feed.results] == reference,
            "batch_occupancy": round(sum(calls) / len(calls) / rows, 3),
            "calls_vs_ideal": round(len(calls) / (sum(forwards) / rows), 3)}


def orders(forwards: list[int]) -> dict[str, object]:
    """Feed orders beside FIFO: ``longest_first``, an oracle that knows each row's forward count (from
    a previous run): what FIFO loses to the tail; ``long_prompt_first``, a rule that knows only the
    prompts (longest prompt first, FIFO among equals)."""
    return {"longest_first": lambda row: -forwards[row.owner], "long_prompt_first": lambda row: -len(row.prompt)}


def _params(model, n: int, max_new_tokens: int, seed: int) -> tuple[list[int], SamplingParams]:
    """The wrapped model's call counter and the workload's sampling: one token per forward until the
    stop (block-causal: ``sequential``; full attention: ``dynamic`` at 0.9, blocks of 32, see :func:`eos_tail`)."""
    arch = model.arch
    stop = [arch.eos_token_id]
    if arch.attention == "bidirectional":
        return eos_tail(model, arch.eos_token_id), SamplingParams(
            max_new_tokens=max_new_tokens, temperature=1.0, unmasking="dynamic", threshold=0.9, block_length=32,
            n=n, seed=seed, stop_ids=stop)
    return heavy_tailed(model, arch.eos_token_id), SamplingParams(
        max_new_tokens=max_new_tokens, temperature=1.0, unmasking="sequential", n=n, seed=seed, stop_ids=stop)


def run(model, modes: dict[str, dict], rows_list=(16, 64), prompts: int = 64, n: int = 4,
        max_new_tokens: int = 256, seed: int = 0, clock=cpu_clock, prefix: str = "",
        reorder: bool = True) -> dict[str, float | int | str]:
    """Every mode (name -> Engine options) at every R, on one heavy-tailed workload; keys get ``prefix``.
    ``reorder``: also the :func:`orders` lines at every R (with a ``continuous`` mode)."""
    arch = model.arch  # prompt ids: past the char tokenizer's specials, below SDAR's (mask 151669)
    calls, params = _params(model, n, max_new_tokens, seed)
    prompt_ids = workload(arch.mask_token_id if arch.mask_token_id > 4 else arch.vocab_size, prompts, seed)
    out: dict[str, float | int | str] = {f"{prefix}throughput_workload": f"{prompts}x{n} heavy-tailed (Pareto 1.2), "
                                                                         f"cap {max_new_tokens}"}
    reference, forwards = None, None
    for rows in rows_list:
        for name, options in modes.items():
            line = measure(model, calls, prompt_ids, params, rows, clock, **options)
            rollouts = line.pop("_rollouts")
            got = [(r.token_ids, r.steps) for r in rollouts]
            reference, forwards = reference or got, forwards or [r.num_forwards for r in rollouts]
            out[f"{prefix}throughput_identical_{name}_r{rows}"] = got == reference
            for key, value in line.items():
                out[f"{prefix}{key}_{name}_r{rows}"] = value
        for order_name, order in (orders(forwards).items() if reorder and "continuous" in modes else ()):
            for key, value in reordered(model, calls, prompt_ids, params, rows, order, forwards, reference).items():
                out[f"{prefix}" + ("throughput_" if key == "identical" else "") + f"{key}_{order_name}_r{rows}"] = value
    lengths = sorted(len(r) for r, _ in reference) if arch.attention != "bidirectional" else \
        sorted(next((i + 1 for i, t in enumerate(r) if t in params.stop_ids), len(r)) for r, _ in reference)
    out[f"{prefix}throughput_gen_tokens_p50_p90_max"] = f"{lengths[len(lengths) // 2]}/" \
                                                        f"{lengths[int(len(lengths) * .9)]}/{lengths[-1]}"
    del model.forward
    return out


def rl_rollout_phase(model, tokenizer, prompts: list[list[int]], spec, group_size: int = 8,
                     max_batch_rows: int = 32, repeats: int = 2) -> dict[str, float]:
    """One RL step's rollout phase (``num_prompts`` prompts x ``group_size``, the RL loop's
    sampling and stop ids) under each schedule: CPU seconds (best of ``repeats``) and model calls."""
    params = spec.params(tokenizer.stop_ids(), n=group_size)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    out: dict[str, float] = {}
    try:
        for name in ("chunked", "continuous", "shared"):
            engine = Engine(model, max_batch_rows=max_batch_rows, batching=name)
            best = float("inf")
            for _ in range(repeats):
                calls.clear()
                start = time.process_time()
                rollouts = engine.generate(prompts, params)
                best = min(best, time.process_time() - start)
            out[f"rl_rollout_s_{name}"] = round(best, 3)
            out[f"rl_rollout_calls_{name}"] = len(calls)
            out[f"rl_rollout_occupancy_{name}"] = round(sum(calls) / len(calls) / max_batch_rows, 3)
    finally:
        handle.remove()
    out["rl_rollout_speedup"] = round(out["rl_rollout_s_chunked"] / out["rl_rollout_s_continuous"], 2)
    out["rl_rollout_speedup_shared"] = round(out["rl_rollout_s_chunked"] / out["rl_rollout_s_shared"], 2)
    lengths = sorted(r.num_tokens for r in rollouts)
    out["rl_rollout_tokens_p50_max"] = f"{lengths[len(lengths) // 2]}/{lengths[-1]}"
    return out
