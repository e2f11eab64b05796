"""The prepared GPU check (``python -m benchmarks.gpu``): a ~1B random SDAR in bf16-mixed on one GPU.

Prints ``name=value`` lines, side by side in one run:

* ``sft_{flex,sdpa}_{ckpt,nockpt}_step_s`` / ``..._peak_gb`` -- one SFT step (NELBO forward +
  backward + AdamW on fp32 masters under bf16 autocast) on one packed row of ``--length``
  tokens with complementary masks (3 x length positions), after one warm-up step;
* ``rl_{flex,sdpa}_step_s`` / ``..._peak_gb`` -- one DiPO update of 8 synthetic rollouts x
  ``--rl-length`` tokens (exact trace, micro-batches of ``--budget`` tokens, checkpointed);
* ``engine_bf16_tokens_per_s`` -- KV-cached decoding in bf16 (a bf16 copy of the weights, as
  the native backend decodes bf16-mixed runs) and ``engine_bf16_copy_s``, that copy's cost;
* issue 29's throughput workload (``python -m benchmarks.engine``'s: 64 prompts x 4, heavy-tailed
  lengths) on that bf16 copy at ``max_batch_rows`` 128, continuous vs time-shared vs chunked batching:
  ``batch_occupancy_*``, ``calls_vs_ideal_*``, ``tokens_per_s_*`` (wall clock), and
  ``kv_peak_vs_live_*``, the cache's peak bytes over the theoretical cache of the most
  rows live at once. ``--throughput-only`` runs just these (about a minute).

Peak memory is ``torch.cuda.max_memory_allocated`` per configuration. Sized for <= 8 minutes
on one H100/H200 (the first flex configuration includes its compile). Without CUDA it says
so and exits 0, so the project's tests never need a GPU.

    python -m benchmarks.gpu [--length 2048] [--rl-length 512] [--budget 16384]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

VOCAB = 151_936
MASK_ID, EOS_ID, PAD_ID = 151_669, 151_645, 151_643
# ~1.2B parameters: SDAR-8B's vocabulary, heads and head_dim, narrower and shallower.
ONE_B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=32_768)


def build_model(device):
    from dirl.model.families import get_family
    sdar = get_family("sdar")
    cfg = sdar.config_cls.for_init(ONE_B, vocab_size=VOCAB, mask_token_id=MASK_ID, eos_token_id=EOS_ID,
                                   pad_token_id=PAD_ID, block_size=4, torch_dtype="float32")
    model = sdar.model_cls(cfg)
    model.init_weights(0)
    return model.to(device)


def _measure(fn, device) -> tuple[float, float]:
    """(seconds of the second call, peak GB of it)."""
    fn()  # warm-up (and flex compile)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 1024**3


def sft_step_fn(model, optimizer, length: int, device):
    from dirl.algo.nelbo import TokenBatch, draw_noise, sft_nelbo
    ids = torch.randint(0, MASK_ID, (1, length), device=device)
    pos = torch.arange(length, device=device)[None]
    response = pos >= 64
    batch = TokenBatch(ids, pos, torch.zeros_like(ids), response, torch.zeros_like(ids))
    noise = draw_noise(response.cpu(), batch.sample_ids.cpu(), torch.Generator().manual_seed(0), complementary=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = sft_nelbo(model, batch, noise, MASK_ID)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def rl_step_fn(model, optimizer, rl_length: int, budget: int):
    from benchmarks.memory import synthetic_rollouts

    from dirl.rollout import SamplingSpec
    from dirl.train.optim import OptimConfig
    from dirl.train.rl.config import AlgoConfig
    from dirl.train.rl.update import Learner, policy_update
    rollouts = synthetic_rollouts(8, rl_length)
    adv = torch.linspace(-1, 1, 8)
    learner = Learner(model, None, optimizer, None, OptimConfig(lr=1e-6), AlgoConfig(micro_batch_tokens=budget),
                      SamplingSpec(max_new_tokens=rl_length))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            policy_update(learner, rollouts, adv, torch.Generator().manual_seed(0))
    return step


def engine_numbers(model, device) -> dict[str, float]:
    from dirl.engine.engine import Engine
    from dirl.rollout import SamplingParams
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    decode = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)  # the backend's copy
    torch.cuda.synchronize(device)
    copy_s = time.perf_counter() - start
    prompts = [torch.randint(0, MASK_ID, (64,)).tolist() for _ in range(32)]
    params = SamplingParams(max_new_tokens=256, temperature=1.0, unmasking="static", steps_per_block=2, seed=0)
    engine = Engine(decode)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"engine_bf16_tokens_per_s": sum(r.num_tokens for r in rollouts) / elapsed, "engine_bf16_copy_s": copy_s}


def throughput_numbers(model, device, rows: int = 128) -> dict[str, float]:
    """The heavy-tailed workload of ``python -m benchmarks.engine`` at ``rows``, each batching policy, bf16."""
    from benchmarks import _engine_throughput as throughput

    decode = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    throughput.run(decode, {"warm": {}}, (8,), prompts=2, n=2, max_new_tokens=16, clock=clock)
    modes = {"continuous": {}, "shared": {"batching": "shared"}, "chunked": {"batching": "chunked"}}
    out = throughput.run(decode, modes, (rows,), clock=clock)
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048, help="SFT packed row length")
    parser.add_argument("--rl-length", type=int, default=512, help="RL response tokens per rollout")
    parser.add_argument("--budget", type=int, default=16_384, help="RL micro-batch budget (packed tokens)")
    parser.add_argument("--throughput-only", action="store_true", help="only issue 29's throughput lines")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here -- nothing measured (run it on a GPU machine)")
        return 0
    device = torch.device("cuda")
    model = build_model(device)
    print(f"params_billions={sum(p.numel() for p in model.parameters()) / 1e9:.2f}", flush=True)
    if args.throughput_only:
        for key, value in throughput_numbers(model, device).items():
            print(f"{key}={value:.3f}")
        return 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # fp32 masters and moments
    for impl in ("flex", "sdpa"):
        model.attn_impl = impl
        for ckpt in (True, False):
            model.activation_checkpointing = ckpt
            name = f"sft_{impl}_{'ckpt' if ckpt else 'nockpt'}"
            try:
                seconds, peak = _measure(sft_step_fn(model, optimizer, args.length, device), device)
                print(f"{name}_step_s={seconds:.3f}\n{name}_peak_gb={peak:.2f}", flush=True)
            except torch.OutOfMemoryError:
                print(f"{name}_step_s=oom", flush=True)
                torch.cuda.empty_cache()
        model.activation_checkpointing = True
        seconds, peak = _measure(rl_step_fn(model, optimizer, args.rl_length, args.budget), device)
        print(f"rl_{impl}_step_s={seconds:.3f}\nrl_{impl}_peak_gb={peak:.2f}", flush=True)
    for key, value in engine_numbers(model, device).items():
        print(f"{key}={value:.3f}")
    for key, value in throughput_numbers(model, device).items():
        print(f"{key}={value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
