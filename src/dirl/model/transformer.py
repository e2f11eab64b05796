"""An SDAR-compatible blockwise diffusion LM: the Qwen3 decoder.

RMSNorm, per-head q/k RMSNorm, grouped-query attention, RoPE, SwiGLU and an
untied ``lm_head``; the module tree reproduces SDAR's parameter names
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so checkpoints load as-is.

What makes it a *blockwise diffusion* model is only the attention pattern, which
the caller states per token (:class:`~dirl.model.masks.TokenMeta`): with
``block_size == 1`` and clean tokens the forward is exactly Qwen3's causal forward
(``tests/test_model.py`` checks it against transformers' Qwen3).

The KV cache is never module state: ``past_kv`` is an argument and the K/V of
the new tokens are returned, for the caller (the engine) to store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dirl.model.attention import attend, build_mask, pad_to_bucket
from dirl.model.config import ModelConfig
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.masks import TokenMeta

KV = tuple[torch.Tensor, torch.Tensor]  # (B, Hkv, T, D) each, keys already rotated


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Qwen3, then cast back before the weight. F.rms_norm is one fused
        # op where the spelled-out form was five (a decode forward runs 4 per layer).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, D) for rotate-half RoPE (Qwen layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl, past: KV | None) -> tuple[torch.Tensor, KV]:
        batch, num_tokens, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, num_tokens, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, D), (B, Hkv, T, D)
        new_kv = (k, v)
        if isinstance(past, tuple):  # K/V of earlier tokens: attend over them, then these
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        elif past is not None:  # an in-place cache: stores these K/V in their slots, returns the slots in use
            k, v = past.update(k, v)  # (B, Hkv, S, D) views, no copy of the past
        out = attend(q, k, v, mask, impl)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_tokens, -1)), new_kv


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl, past):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, impl, past)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), new_kv


class Backbone(nn.Module):
    """``model.*`` in SDAR's checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CachedPrefix:
    """Clean keys of earlier tokens handed back to a forward explicitly (``past_kv``), with
    their mask metadata -- the caller-held alternative to the engine's in-place cache."""

    kv: Sequence[KV]   # per layer, (B, Hkv, P, D) each: an earlier forward's ``new_kv``
    meta: TokenMeta    # (B, P)

    def __getitem__(self, layer: int) -> KV:
        return self.kv[layer]


class Readout(NamedTuple):
    """Which rows a forward returns, and as what. A NamedTuple, so ``torch.compile`` (the
    engine's compiled step) sees its tensor as a plain input."""

    index: torch.Tensor | None = None  # (N,) flat indices into B*T; None = every row, (B, T, ...)
    hidden: bool = False               # True: final-norm hidden states instead of logits (no LM head)


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None    # (B, T, V), or (N, V) when readout.index is given; None with readout.hidden
    new_kv: list[KV]               # per layer, K/V of this forward's tokens only (empty when checkpointed)
    hidden: torch.Tensor | None = None  # final-norm hidden states, same rows as logits, with readout.hidden


class SDARForCausalLM(nn.Module):
    """The blockwise diffusion LM. See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_impl = "sdpa"
        # Recompute each decoder layer in backward (torch.utils.checkpoint): only the layer
        # inputs are kept, so activation memory is ~ num_layers x T x d instead of every
        # intermediate. Set by the trainers from ``compute.activation_checkpointing``.
        self.activation_checkpointing = False
        self.head_chunk_size = DEFAULT_CHUNK_SIZE  # rows per chunk of the chunked head (lm_head.py)

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Random init (normal(0, std) matrices, unit norms), reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: TokenMeta | None,
                past_kv: CachedPrefix | None = None, readout: Readout = Readout(),
                attn_impl: str | None = None) -> ForwardOutput:
        """input_ids, position_ids: (B, T); meta: mask metadata of these tokens.

        past_kv: cached clean keys of earlier tokens, either a :class:`CachedPrefix` (per
        layer (B, Hkv, P, D), with their metadata (B, P)) or an in-place cache step (the
        engine's :class:`~dirl.engine.kv_cache.CacheStep`: ``past_kv[i].update(k, v)`` stores
        layer i's K/V and returns the slots to attend over; ``past_kv.mask`` is the SDPA mask
        over them, and ``meta`` is unused). readout.index: flat indices into B*T -- only
        those rows of the LM head are computed (the vocabulary projection dominates at 150k).
        readout.hidden: skip the LM head and return the final-norm hidden states of those
        rows, for the chunked head (:mod:`dirl.model.lm_head`) that never holds their (N, V)
        logits.
        """
        impl = attn_impl or self.attn_impl
        num_tokens = input_ids.shape[1]
        if impl == "flex" and past_kv is None:  # a few padded lengths: a few compiled shapes
            input_ids, position_ids, meta = pad_to_bucket(input_ids, position_ids, meta)
        if hasattr(past_kv, "mask"):  # an in-place cache knows which of its slots each query sees
            mask, impl = past_kv.mask, "sdpa"
        else:
            mask = build_mask(meta, meta if past_kv is None else past_kv.meta.cat(meta), impl)
        hidden = self.model.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        # Checkpointed layers keep only their input; their K/V are not kept either (a
        # training forward never needs them, and holding them would undo the saving).
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and past_kv is None
        new_kv: list[KV] = []
        for i, layer in enumerate(self.model.layers):
            past = None if past_kv is None else past_kv[i]
            if recompute:
                hidden, _ = checkpoint(layer, hidden, cos, sin, mask, impl, past, use_reentrant=False)
                continue
            hidden, kv = layer(hidden, cos, sin, mask, impl, past)
            new_kv.append((kv[0][:, :, :num_tokens], kv[1][:, :, :num_tokens]))
        hidden = self.model.norm(hidden[:, :num_tokens])
        if readout.index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, readout.index)  # (N, d)
        if readout.hidden:
            return ForwardOutput(None, new_kv, hidden)
        return ForwardOutput(self.lm_head(hidden), new_kv)
