"""Per-rank memory estimate of a training step (DESIGN §12): will this config fit the GPU?

An analytic count, in bytes, of what one rank holds at the peak of each phase:

* states     -- weights + gradients + AdamW moments: 16 B / param in bf16-mixed and
  fp32 (fp32 masters, grads, two moments), 8 B in pure bf16; divided by the ranks
  under FSDP2. A frozen reference adds its bf16 weights (2 B / param, sharded).
* gathered   -- FSDP2 keeps the root (embeddings, lm_head) gathered in the compute
  dtype, plus two decoder layers in flight (the current one and the prefetch).
* activations -- per forward of T packed tokens: with checkpointing each layer keeps
  its input (T x d in the compute dtype) and one layer at a time is recomputed with
  all its intermediates (q, k, v, attention out, MLP gate / up / product, their
  gradients: ``LAYER_BYTES_PER_TOKEN``); without, every layer keeps them. FlexAttention
  holds O(T) (no (T, T) mask or scores).
* head       -- the chunked LM head: ``HEAD_TENSORS`` fp32 (chunk, V) tensors at once
  (logits, log-probs, their gradients), plus the (N, d) hidden states and their gradient.
* rollout    -- decoding under ``full_params``: the full weights in the compute dtype,
  plus the KV cache of the live rows: ``max_batch_rows`` rows of ``max_len`` tokens, or
  fewer when ``max_batch_tokens`` (the engine's KV budget) admits fewer such rows
  (layers x 2 x kv_heads x head_dim x 2 B per token: 144 KiB at SDAR-8B).

The constants were checked against CPU measurements of the narrow real-vocabulary model
(``python -m benchmarks.memory``; BENCHMARKS.md "Memory"): the head term predicts the measured
chunked-head step to within ~15 %. It is an estimate for planning, not a guarantee:
allocator fragmentation and the CUDA context (~1 GB) come on top (``margin``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dirl.model.sdar.config import SDARConfig

GB = 1024**3
HEAD_TENSORS = 3.5          # fp32 (chunk, V) tensors alive at once in the head's backward (measured on CPU)
MARGIN = 0.85               # plan to at most this share of the device (fragmentation, CUDA context)


@dataclass
class Workload:
    """What one rank runs: the shape of one micro-batch and of the rollout phase."""

    world: int = 8                     # ranks sharing the states (FSDP2)
    precision: str = "bf16-mixed"      # fp32 | bf16-mixed | bf16
    tokens: int = 8192                 # packed tokens per forward (RL micro-batch / SFT row x copies)
    scored: int = 4096                 # scored positions per forward (through the head)
    checkpointing: bool = True
    head_chunk: int = 256
    reference: bool = False            # RL with beta > 0: a frozen bf16 reference
    decode_rows: int = 0               # rollout.<backend>.max_batch_rows (0: no rollout phase: SFT, http)
    decode_len: int = 0                # prompt + max_new_tokens
    decode_tokens: int = 0             # rollout.<backend>.max_batch_tokens (0: no KV budget beyond the rows)


def decode_rows(work: Workload) -> int:
    """Rows the engine keeps live: ``decode_rows``, capped by the KV budget (at least one)."""
    if not work.decode_tokens or not work.decode_len:
        return work.decode_rows
    return min(work.decode_rows, max(1, work.decode_tokens // work.decode_len))


def _layer_params(cfg: SDARConfig) -> int:
    """The largest decoder layer (an MoE config says: ``max_layer_parameters``, all its experts)."""
    if hasattr(cfg, "max_layer_parameters"):
        return cfg.max_layer_parameters()
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size


def layer_bytes_per_token(cfg: SDARConfig, compute_bytes: int) -> int:
    """Intermediates of one decoder layer per token (forward + their gradients in backward).

    The MLP's are ``3 x intermediate_size`` (gate / up / product); an MoE config gives its own
    count (``mlp_activations_per_token``: the top-k experts' and the shared expert's, the routed
    copies of the token and the router's scores), the largest over its layers."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    mlp = cfg.mlp_activations_per_token() if hasattr(cfg, "mlp_activations_per_token") else 3 * cfg.intermediate_size
    forward = 4 * cfg.hidden_size + 2 * q + 2 * kv + mlp  # norms, q/k/v/out, the MLP
    return 2 * forward * compute_bytes


def plan(cfg: SDARConfig, work: Workload) -> dict[str, float]:
    """Per-rank peak memory (GB) by component, with ``train_peak`` and ``rollout_peak``."""
    params = cfg.num_parameters()
    compute = 4 if work.precision == "fp32" else 2
    state_bytes = 8 if work.precision == "bf16" else 16
    world = max(1, work.world)
    states = params * state_bytes / world + (params * 2 / world if work.reference else 0)
    root = 2 * cfg.vocab_size * cfg.hidden_size * compute
    gathered = (root + 2 * _layer_params(cfg) * compute) if world > 1 else 0
    per_layer = layer_bytes_per_token(cfg, compute) * work.tokens
    layer_inputs = cfg.num_hidden_layers * work.tokens * cfg.hidden_size * compute
    activations = layer_inputs + per_layer if work.checkpointing else cfg.num_hidden_layers * per_layer
    head = HEAD_TENSORS * min(work.head_chunk or work.scored, work.scored) * cfg.vocab_size * 4 \
        + 2 * work.scored * cfg.hidden_size * 4
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    kv_cache = decode_rows(work) * work.decode_len * kv_per_token
    full_weights = params * compute if world > 1 else 0  # full_params gathers for decoding
    out = {"states": states, "gathered": gathered, "activations": activations, "head": head,
           "kv_cache": kv_cache, "decode_weights": full_weights}
    out["train_peak"] = states + gathered + activations + head
    out["rollout_peak"] = states + full_weights + kv_cache if work.decode_rows else 0.0
    result = {k: v / GB for k, v in out.items()}
    # Parameter counts (billions, not GB): a mixture of experts holds and trains all of them
    # (``states``, ``decode_weights``) but runs ``params_active`` per token (``activations``).
    result["params_total_b"] = params / 1e9
    result["params_active_b"] = (cfg.num_active_parameters() if hasattr(cfg, "num_active_parameters")
                                 else params) / 1e9
    return result


def fits(cfg: SDARConfig, work: Workload, device_gb: float = 80.0, phase: str = "both") -> bool:
    """Does the plan stay under ``MARGIN`` of the device in ``phase`` (train | rollout | both)?"""
    result = plan(cfg, work)
    peaks = {"train": [result["train_peak"]], "rollout": [result["rollout_peak"]],
             "both": [result["train_peak"], result["rollout_peak"]]}[phase]
    return max(peaks) <= device_gb * MARGIN


PROMPT_TOKENS = 512  # planning allowance for a prompt (MATH prompts are shorter)
WORST_COPIES_PER_TOKEN = 4  # block 4, one token per step: 4 copies of 4 tokens per block of 4


def rl_workload(cfg, world: int, max_new_tokens: int | None = None, block_size: int | None = None) -> Workload:
    """The workload of an :class:`~dirl.train.rl.config.RLConfig` (``max_new_tokens`` overrides the config's).

    A trace row is worst-case (1 + B) x its response (one token committed per step: B copies of B
    tokens per block of B; B = ``block_size`` (the model's), else the config's, else 4) and
    is never split, so a micro-batch holds at least one row."""
    copies = block_size or cfg.block_size or WORST_COPIES_PER_TOKEN
    length = max_new_tokens or cfg.rollout.sampling.max_new_tokens
    options = cfg.rollout.backend_options()
    row = PROMPT_TOKENS + (1 + copies) * length
    tokens = max(cfg.algo.micro_batch_tokens or row * cfg.rollout.group_size, row)
    return Workload(world=world, precision=cfg.compute.precision if cfg.compute.precision != "auto" else "bf16-mixed",
                    tokens=tokens, scored=max(1, tokens // (1 + copies)),
                    checkpointing=cfg.compute.activation_checkpointing, head_chunk=cfg.compute.head_chunk_size,
                    reference=cfg.algo.beta > 0, decode_rows=getattr(options, "max_batch_rows", 0),
                    decode_len=PROMPT_TOKENS + length, decode_tokens=getattr(options, "max_batch_tokens", 0))


def sft_workload(cfg, world: int, max_length: int | None = None) -> Workload:
    """The workload of an :class:`~dirl.train.sft.config.SFTConfig`: ``batch_size / world`` packed rows of
    ``max_length`` tokens, each laid out as 2 (3 with complementary masks) streams."""
    length = max_length or cfg.data.max_length
    rows = max(1, cfg.batch_size // max(1, world))
    streams = 3 if cfg.complementary_masks else 2
    return Workload(world=world, precision=cfg.compute.precision if cfg.compute.precision != "auto" else "bf16-mixed",
                    tokens=rows * streams * length, scored=rows * length,
                    checkpointing=cfg.compute.activation_checkpointing, head_chunk=cfg.compute.head_chunk_size)
