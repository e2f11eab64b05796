"""Per-rank memory estimate of a training run (DESIGN §12): will this config fit the GPU?

An analytic count, in bytes, of what one rank holds in the steady state -- after the first
optimizer step, when AdamW's moments exist (a one-step measurement taken before that is a
lower bound) -- at the peak of each phase. What the code holds, term by term:

* states     -- the trained weights, their gradients and AdamW's two moments: 16 B / param in
  bf16-mixed and fp32 (fp32 masters, grads, moments), 8 B in pure bf16; divided by the ranks
  under FSDP2 (not under DDP). With LoRA only the adapters are trained (16 B / adapter param)
  and the frozen base is held in the compute dtype (2 B / param in bf16-mixed).
* step_temp  -- AdamW's foreach step (CUDA) keeps one temporary the size of the trained
  shard (``sqrt(v)``); the per-tensor CPU path keeps one tensor's (the embedding's).
* cast_cache -- bf16-mixed on unsharded weights runs under ``torch.autocast``, which caches
  the bf16 cast of every weight a matmul used until the step's autocast context exits
  (the backward runs inside it): 2 B per trained matmul weight (LoRA: the adapters only;
  a tied embedding is one, through the head's matmul).
* tied_grad  -- a tied embedding gets two gradients: the head's is accumulated first, so the
  lookup's dense (V, d) gradient, made last in backward, is a temporary added into it while
  every other gradient and the cast cache are held (full FT, unsharded).
* reference  -- RL with ``beta > 0``: the full-FT reference is a frozen copy in the compute
  dtype (:func:`dirl.train.models.reference_model`; 2 B / param in bf16-mixed, sharded
  under FSDP2); a LoRA run's reference is the base with the adapters off (no copy).
* decode_weights -- RL's native rollouts: at world 1 (and DDP) under bf16-mixed a bf16
  copy of the fp32 masters, held for the run (:class:`~dirl.backends.native.NativeBackend`);
  under FSDP2 the full bf16 weights gathered for the rollout phase (``full_params``).
* gathered   -- FSDP2 keeps the root (embeddings, lm_head) gathered in the compute dtype,
  plus two decoder layers in flight (the current one and the prefetch).
* activations -- per forward of T packed tokens: with checkpointing each layer keeps its
  input (T x d in the residual dtype: fp32 under autocast, whose residual stream stays
  fp32) and one layer at a time is recomputed with all its intermediates (q, k, v,
  attention out, MLP gate / up / product, their gradients: :func:`layer_bytes_per_token`);
  without, every layer keeps them. FlexAttention holds O(T) (no (T, T) mask or scores).
* head       -- the chunked LM head: ``HEAD_TENSORS`` fp32 (chunk, V) tensors at once in RL
  (logits, log-probs, their gradients through the policy's distribution), ``SFT_HEAD_TENSORS``
  in SFT (the gradient computed in place), plus the (N, d) hidden states and their gradient.
* kv_cache   -- the rows the engine decodes at once: prompts x group on this rank, capped
  by ``max_batch_rows`` (and by ``max_batch_tokens``, the engine's KV budget, when set),
  each ``prompt + max_new_tokens`` long (layers x 2 x kv_heads x head_dim x 2 B per token:
  144 KiB at SDAR-8B), plus one block of fp32 logits per row.

``train_peak`` = states + reference + decode_weights (world 1) + gathered + the largest of
step_temp (the optimizer step runs after the backward freed the rest), activations + head +
cast_cache (the backward's peak), and cast_cache + tied_grad (the backward's end);
``rollout_peak`` = states less the gradients (freed after each step) + reference +
decode_weights + kv_cache. The constants were checked against CPU measurements
(``python -m benchmarks.memory`` and ``benchmarks.memory_plan``; BENCHMARKS.md "Memory").
It is an estimate for planning, not a guarantee: allocator fragmentation and the CUDA context (~1 GB) come on top
(``MARGIN``).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3
HEAD_TENSORS = 3.5          # fp32 (chunk, V) tensors alive at once in RL's head backward (autograd; measured on CPU)
SFT_HEAD_TENSORS = 1.5      # the NELBO's hand-written head backward (dirl.model.lm_head): one, plus its cast
MARGIN = 0.85               # plan to at most this share of the device (fragmentation, CUDA context)


@dataclass
class Workload:
    """What one rank runs: the shape of one micro-batch and of the rollout phase."""

    world: int = 8                     # ranks
    precision: str = "bf16-mixed"      # fp32 | bf16-mixed | bf16
    tokens: int = 8192                 # packed tokens per forward (RL micro-batch / SFT row x copies)
    scored: int = 4096                 # scored positions per forward (through the head)
    checkpointing: bool = True
    head_chunk: int = 256
    reference: bool = False            # RL with beta > 0: a frozen reference
    decode_rows: int = 0               # rows decoded at once (0: no rollout phase: SFT, http)
    decode_len: int = 0                # prompt + max_new_tokens
    strategy: str = "fsdp"             # world > 1: fsdp (states sharded) | ddp (replicated)
    lora_params: int = 0               # > 0: LoRA, the adapters' parameter count (the base frozen)
    foreach: bool = True               # AdamW's multi-tensor step (CUDA's default; CPU steps per tensor)
    head_tensors: float = HEAD_TENSORS  # (chunk, V) fp32 tensors of the head's backward
    decode_tokens: int = 0             # rollout.<backend>.max_batch_tokens (0: no KV budget beyond the rows)
    decode_pool: int = 0               # batching=shared: rows held with their KV cache (0: decode_rows)


def decode_rows(work: Workload) -> int:
    """Rows the engine keeps in its KV cache: ``decode_rows`` (or, time-shared, ``decode_pool``),
    capped by the KV budget (at least one)."""
    rows = work.decode_pool or work.decode_rows
    if not work.decode_tokens or not work.decode_len:
        return rows
    return min(rows, max(1, work.decode_tokens // work.decode_len))


def layer_bytes_per_token(cfg, compute_bytes: int) -> int:
    """Intermediates of one decoder layer per token (forward + their gradients in backward).

    The MLP's come from the family (``cfg.sizes.mlp_activations``: gate / up / product of a
    dense SwiGLU; an MoE's top-k and shared experts, the routed copies of the token and the
    router's scores), the largest over its layers."""
    arch = cfg.arch
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    forward = 4 * arch.hidden_size + 2 * q + 2 * kv + cfg.sizes.mlp_activations  # norms, q/k/v/out, the MLP
    return 2 * forward * compute_bytes


def _weights(cfg, work: Workload) -> dict[str, float]:
    """Bytes of the weight-sized terms: states, step_temp, cast_cache, reference, decode_weights."""
    sizes = cfg.sizes
    params = sizes.parameters
    mixed, lora = work.precision == "bf16-mixed", work.lora_params > 0
    compute = 4 if work.precision == "fp32" else 2
    world = max(1, work.world)
    shard = world if world > 1 and work.strategy == "fsdp" and not lora else 1
    master = 2 if work.precision == "bf16" else 4
    trained = work.lora_params if lora else params
    frozen = params * compute if lora else 0   # the LoRA base, held in the compute dtype
    # the embedding lookup is not cast; a tied embedding is, by the head's matmul
    matmul = trained if lora else params - (0 if sizes.tied else sizes.embedding)
    return {
        "masters": trained * master / shard + frozen,
        "grads": trained * master / shard,
        "adam": 2 * trained * master / shard,
        "step_temp": (trained / shard if work.foreach else (0 if lora else sizes.embedding)) * master,
        "cast_cache": matmul * 2 if mixed and shard == 1 else 0,
        "tied_grad": sizes.embedding * master if sizes.tied and not lora and shard == 1 else 0,
        "reference": params * compute / shard if work.reference and not lora else 0,
        "decode_weights": (params * 2 if shard > 1 else (trained * 2 if mixed else 0)) if work.decode_rows else 0,
    }


def plan(cfg, work: Workload) -> dict[str, float]:
    """Per-rank peak memory (GB) by component, with ``train_peak`` and ``rollout_peak``."""
    weights = _weights(cfg, work)
    arch, sizes = cfg.arch, cfg.sizes
    compute = 4 if work.precision == "fp32" else 2
    sharded = work.world > 1 and work.strategy == "fsdp" and not work.lora_params
    residual = 2 if work.precision == "bf16" or sharded else 4  # autocast keeps the residual stream fp32
    root = 2 * sizes.embedding * compute
    gathered = (root + 2 * sizes.max_layer * compute) if sharded else 0
    per_layer = layer_bytes_per_token(cfg, compute) * work.tokens
    layer_inputs = arch.num_layers * work.tokens * arch.hidden_size * residual
    activations = layer_inputs + per_layer if work.checkpointing else arch.num_layers * per_layer
    head = work.head_tensors * min(work.head_chunk or work.scored, work.scored) * arch.vocab_size * 4 \
        + 2 * work.scored * arch.hidden_size * 4
    kv_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 2
    cached = decode_rows(work)  # the logits are the forward's rows' only
    kv_cache = cached * work.decode_len * kv_per_token + min(cached, work.decode_rows) * arch.block_size * \
        arch.vocab_size * 4
    states = weights["masters"] + weights["grads"] + weights["adam"]
    held = weights["reference"] + (weights["decode_weights"] if not sharded else 0)
    out = {**weights, "states": states, "gathered": gathered, "activations": activations, "head": head,
           "kv_cache": kv_cache}
    out["train_peak"] = states + held + gathered + max(weights["step_temp"],
                                                       activations + head + weights["cast_cache"],
                                                       weights["cast_cache"] + weights["tied_grad"])
    out["rollout_peak"] = (states - weights["grads"] + weights["reference"] + weights["decode_weights"]
                           + kv_cache) if work.decode_rows else 0.0
    result = {k: v / GB for k, v in out.items()}
    # Parameter counts (billions, not GB): a mixture of experts holds and trains all of them
    # (``states``, ``decode_weights``) but runs ``params_active`` per token (``activations``).
    result["params_total_b"] = sizes.parameters / 1e9
    result["params_active_b"] = sizes.active_parameters / 1e9
    return result


def fits(cfg, work: Workload, device_gb: float = 80.0, phase: str = "both") -> bool:
    """Does the plan stay under ``MARGIN`` of the device in ``phase`` (train | rollout | both)?"""
    result = plan(cfg, work)
    peaks = {"train": [result["train_peak"]], "rollout": [result["rollout_peak"]],
             "both": [result["train_peak"], result["rollout_peak"]]}[phase]
    return max(peaks) <= device_gb * MARGIN


PROMPT_TOKENS = 512  # planning allowance for a prompt (MATH prompts are shorter)
WORST_COPIES_PER_TOKEN = 4  # block 4, one token per step: 4 copies of 4 tokens per block of 4


def _precision(cfg) -> str:
    return cfg.compute.precision if cfg.compute.precision != "auto" else "bf16-mixed"


def rl_workload(cfg, world: int, max_new_tokens: int | None = None, block_size: int | None = None, *,
                response_tokens: float | None = None, prompt_tokens: int = PROMPT_TOKENS,
                copies: float | None = None, lora_params: int = 0, foreach: bool = True) -> Workload:
    """The workload of an :class:`~dirl.train.rl.config.RLConfig` (``max_new_tokens`` overrides the config's).

    The engine decodes this rank's prompts x group rows at once, at most ``max_batch_rows``,
    each ``prompt_tokens + max_new_tokens`` long. The update scores this rank's rows of one
    mini-batch in micro-batches of ``algo.micro_batch_tokens``; a trace row is
    ``prompt + (1 + copies) x response`` tokens (``copies``: states per committed token; default
    the worst case, one token per step: B copies of B tokens per block of B, B = ``block_size``
    (the model's), else the config's, else 4) with ``response_tokens`` the responses' mean
    length (default: ``max_new_tokens``), and is never split, so a micro-batch holds at least one."""
    copies = copies or block_size or cfg.block_size or WORST_COPIES_PER_TOKEN
    length = max_new_tokens or cfg.rollout.sampling.max_new_tokens
    response = min(length, response_tokens if response_tokens is not None else length)
    rows = max(1, -(-cfg.rollout.num_prompts // max(1, world))) * cfg.rollout.group_size
    row = int(prompt_tokens + (1 + copies) * response)
    minibatch = max(1, rows // cfg.algo.num_minibatches) * row
    tokens = max(min(cfg.algo.micro_batch_tokens or minibatch, minibatch), row)
    native = cfg.rollout.backend == "native"
    options = cfg.rollout.backend_options()
    decode_rows = min(rows, getattr(options, "max_batch_rows", rows)) if native else 0
    pool = rows if native and getattr(options, "batching", "continuous") == "shared" else 0  # every row admitted
    return Workload(world=world, precision=_precision(cfg), tokens=tokens,
                    scored=max(1, int(tokens * response / row)), checkpointing=cfg.compute.activation_checkpointing,
                    head_chunk=cfg.compute.head_chunk_size, reference=cfg.algo.beta > 0, decode_rows=decode_rows,
                    decode_len=prompt_tokens + length, strategy=cfg.dist.strategy, lora_params=lora_params,
                    foreach=foreach, decode_tokens=getattr(options, "max_batch_tokens", 0) if native else 0,
                    decode_pool=pool)


def sft_workload(cfg, world: int, max_length: int | None = None, *, lora_params: int = 0,
                 foreach: bool = True) -> Workload:
    """The workload of an :class:`~dirl.train.sft.config.SFTConfig`: ``batch_size / world`` packed rows of
    ``max_length`` tokens, each laid out as 2 (3 with complementary masks) streams."""
    length = max_length or cfg.data.max_length
    rows = max(1, cfg.batch_size // max(1, world))
    streams = 3 if cfg.complementary_masks else 2
    return Workload(world=world, precision=_precision(cfg), tokens=rows * streams * length, scored=rows * length,
                    checkpointing=cfg.compute.activation_checkpointing, head_chunk=cfg.compute.head_chunk_size,
                    strategy=cfg.dist.strategy, lora_params=lora_params, foreach=foreach,
                    head_tensors=SFT_HEAD_TENSORS)
