"""SDAR, a blockwise diffusion LM on the Qwen3 decoder.

RMSNorm, per-head q/k RMSNorm, grouped-query attention, RoPE, SwiGLU and an
untied ``lm_head``; the module tree reproduces SDAR's parameter names
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so checkpoints load as-is.

What makes it a *blockwise diffusion* model is only the attention pattern, which
the caller states per token (:class:`~dirl.model.masks.TokenMeta`): with
``block_size == 1`` and clean tokens the forward is exactly Qwen3's causal forward
(``tests/test_model.py`` checks it against transformers' Qwen3, the family's reference).

The forward follows :mod:`dirl.model.forward`: the KV cache is an argument (the
engine's in-place cache step), never module state, and no K/V is returned.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dirl.model.arch import Arch
from dirl.model.attention import build_mask, pad_to_bucket
from dirl.model.blocks import RMSNorm, SwiGLU, apply_rope, attention_core, rope_cos_sin
from dirl.model.forward import ForwardOutput, Readout
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.masks import TokenMeta
from dirl.model.sdar.config import SDARConfig


class Attention(nn.Module):
    def __init__(self, cfg: SDARConfig):
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

    def forward(self, x, cos, sin, mask, impl, cache_layer) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, num_tokens, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, num_tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, D), (B, Hkv, T, D)
        return self.o_proj(attention_core(q, k, v, mask, impl, cache_layer))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SDARConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl, cache_layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, impl, cache_layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` in SDAR's checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: SDARConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SDARForCausalLM(nn.Module):
    """The blockwise diffusion LM. See the module docstring."""

    def __init__(self, cfg: SDARConfig):
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

    @property
    def arch(self) -> Arch:
        return self.config.arch

    def decoder_layers(self) -> nn.ModuleList:
        """The repeated layers: FSDP's wrap units and the activation-checkpointing units."""
        return self.model.layers

    def tie_weights(self) -> None:
        """Re-point a tied ``lm_head`` at the embedding (after a meta-device load)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
                cache=None, readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
        """input_ids, position_ids: (B, T); meta: mask metadata of these tokens (unused with ``cache``).

        cache: the engine's in-place :class:`~dirl.engine.kv_cache.CacheStep` or None
        (:mod:`dirl.model.forward`). readout.index: flat indices into B*T -- only those rows
        of the LM head are computed (the vocabulary projection dominates at 150k).
        readout.hidden: skip the LM head and return the final-norm hidden states of those
        rows, for the chunked head (:mod:`dirl.model.lm_head`) that never holds their (N, V)
        logits.
        """
        impl = attn_impl or self.attn_impl
        num_tokens = input_ids.shape[1]
        if cache is not None:  # the cache knows which of its slots each query sees
            mask, impl = cache.mask, "sdpa"
        else:
            if impl == "flex":  # a few padded lengths: a few compiled shapes
                input_ids, position_ids, meta = pad_to_bucket(input_ids, position_ids, meta)
            mask = build_mask(meta, meta, impl)
        hidden = self.model.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            cache_layer = None if cache is None else cache[i]
            if recompute:  # checkpointed layers keep only their input
                hidden = checkpoint(layer, hidden, cos, sin, mask, impl, cache_layer, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask, impl, cache_layer)
        hidden = self.model.norm(hidden[:, :num_tokens])
        if readout.index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, readout.index)  # (N, d)
        if readout.hidden:
            return ForwardOutput(None, hidden)
        return ForwardOutput(self.lm_head(hidden))
