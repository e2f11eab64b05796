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

from dirl.model.blocks import PreNormLayer, RMSNorm, SwiGLU, apply_rope, attention_core
from dirl.model.decoder import DiffusionLM, Parts, block_causal_forward
from dirl.model.forward import ForwardOutput, Readout
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


class DecoderLayer(PreNormLayer):
    def __init__(self, cfg: SDARConfig):
        super().__init__("self_attn", Attention(cfg), SwiGLU(cfg.hidden_size, cfg.intermediate_size),
                         cfg.hidden_size, cfg.rms_norm_eps)


class Backbone(nn.Module):
    """``model.*`` in SDAR's checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: SDARConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SDARForCausalLM(DiffusionLM):
    """The blockwise diffusion LM. See the module docstring."""

    def __init__(self, cfg: SDARConfig):
        super().__init__(cfg)
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def parts(self) -> Parts:
        m = self.model
        return Parts(m.embed_tokens, m.layers, m.norm, self.lm_head, self.config.head_dim, self.config.rope_theta)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: TokenMeta | None,
                cache=None, readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
        """The block-causal forward (:func:`dirl.model.decoder.block_causal_forward`)."""
        return block_causal_forward(self, input_ids, position_ids, meta, cache, readout, attn_impl)
