"""LLaDA2.x (``LLaDA2MoeModelLM``): a Ling-2.0 MoE decoder trained as a block-diffusion LM.

The module tree reproduces the public checkpoint's parameter names
(``model.word_embeddings``, ``model.layers.N.attention.{query_key_value, dense, query_layernorm,
key_layernorm}``, ``model.layers.N.mlp.{gate, experts.E, shared_experts}`` -- layer 0 and the
other first ``first_k_dense_replace`` layers a dense ``mlp.{gate,up,down}_proj`` --, ``model.norm``,
``lm_head``), so a real checkpoint loads as-is and a saved one loads in the model's own remote code.

Per layer (pre-norm): ``x + dense(attn(input_layernorm(x)))``, then ``x + mlp(post_attention_layernorm(x))``.
Attention: one fused ``query_key_value`` projection split per head into H query, Hkv key and Hkv
value heads; RMSNorm over each q and k head; rotate-half RoPE over the first
``int(head_dim * partial_rotary_factor)`` dims of each head (the rest pass through), theta
``rope_theta``; grouped-query SDPA with scale 1/sqrt(head_dim). The MoE MLP is :mod:`.moe`.

What makes it a block-diffusion model is only the attention pattern the caller states per token
(:class:`~dirl.model.masks.TokenMeta`), as for SDAR: blocks of ``block_size`` (32) aligned to
absolute positions, logits not shifted. The KV cache is an argument, never module state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dirl.model.arch import Arch
from dirl.model.attention import build_mask, pad_to_bucket
from dirl.model.blocks import RMSNorm, SwiGLU, apply_rope, attention_core, rope_cos_sin
from dirl.model.forward import ForwardOutput, Readout
from dirl.model.llada2.config import LLaDA2Config
from dirl.model.llada2.moe import SparseMoeBlock
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.masks import TokenMeta


class Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, width, bias=cfg.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.use_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.use_qk_norm = cfg.use_qk_norm

    def forward(self, x, cos, sin, mask, impl, cache_layer) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        qkv = self.query_key_value(x).view(batch, num_tokens, -1, self.head_dim)  # (B, T, H + 2 Hkv, D)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D); cos covers the rotary dims only
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
        return self.dense(attention_core(q, k, v.transpose(1, 2), mask, impl, cache_layer))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, index: int):
        super().__init__()
        self.attention = Attention(cfg)
        self.mlp = (SparseMoeBlock(cfg) if cfg.is_moe_layer(index)
                    else SwiGLU(cfg.hidden_size, cfg.intermediate_size))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl, cache_layer):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask, impl, cache_layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*``: embeddings, layers, final norm."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2MoeModelLM(nn.Module):
    """The LLaDA2 block-diffusion MoE LM. See the module docstring."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        self.attn_impl = "sdpa"
        self.activation_checkpointing = False
        self.head_chunk_size = DEFAULT_CHUNK_SIZE

    @property
    def arch(self) -> Arch:
        return self.config.arch

    def tie_weights(self) -> None:
        """Re-point a tied ``lm_head`` at the embedding (after a meta-device load)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def moe_blocks(self) -> dict[int, SparseMoeBlock]:
        """Layer index -> its MoE MLP (the dense first layers excluded)."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoeBlock)}

    def router_parameters(self) -> list[nn.Parameter]:
        """The routers' weights (``mlp.gate.weight``); the expert biases are buffers, never trained."""
        return [block.gate.weight for block in self.moe_blocks().values()]

    def take_expert_counts(self) -> dict[int, torch.Tensor]:
        """Layer -> (E,) tokens routed to each expert by no-grad forwards since the last call (every
        MoE layer, zeros where none ran: each rank reports the same layers)."""
        out = {i: block.take_expert_counts() for i, block in self.moe_blocks().items()}
        return {i: torch.zeros(self.config.num_experts, dtype=torch.long) if counts is None else counts
                for i, counts in out.items()}

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Random init (normal(0, std) matrices, unit norms, zero expert bias), reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
            for block in self.moe_blocks().values():
                block.gate.expert_bias.zero_()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta: TokenMeta | None,
                cache=None, readout: Readout = Readout(), attn_impl: str | None = None) -> ForwardOutput:
        """input_ids, position_ids: (B, T); meta: these tokens' mask metadata (unused with a cache).

        cache: the engine's in-place cache step (``cache[i].update(k, v)``, ``cache.mask``) or None.
        readout: which flat rows of B*T to return, as logits or final-norm hidden states."""
        impl = attn_impl or self.attn_impl
        num_tokens = input_ids.shape[1]
        if cache is not None:
            mask, impl = cache.mask, "sdpa"
        else:
            if impl == "flex":
                input_ids, position_ids, meta = pad_to_bucket(input_ids, position_ids, meta)
            mask = build_mask(meta, meta, impl)
        hidden = self.model.word_embeddings(input_ids)  # (B, T, d)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dims, self.config.rope_theta, hidden.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.model.layers):
            cache_layer = None if cache is None else cache[i]
            if recompute:
                hidden = checkpoint(layer, hidden, cos, sin, mask, impl, cache_layer, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, mask, impl, cache_layer)
        hidden = self.model.norm(hidden[:, :num_tokens])
        if readout.index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, readout.index)  # (N, d)
        if readout.hidden:
            return ForwardOutput(None, hidden)
        return ForwardOutput(self.lm_head(hidden))
