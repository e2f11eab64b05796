"""Dream's decoder with Qwen2's module tree (``model.layers.N.self_attn.q_proj.bias`` ...).

Bidirectional attention (the mask comes from the caller's TokenMeta, or none at all). The
forward returns the rows as the network computes them; the logit shift (token i read at row
i - 1) is applied by the one readout function (:func:`dirl.model.layout.readout_rows`),
never here.
"""

from __future__ import annotations

import torch
from torch import nn

from dirl.model.decoder import bidirectional_forward, init_normal
from dirl.model.dream.config import DreamConfig
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.blocks import RMSNorm, SwiGLU, apply_rope, attention_core
from dirl.model.forward import Readout


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask, impl, past=None):
        batch, num_tokens, _ = x.shape
        q = self.q_proj(x).view(batch, num_tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, num_tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, num_tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        out = attention_core(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, impl, past)  # (B, T, H*D)
        return self.o_proj(out)


class DreamLayer(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)  # mlp.{gate,up,down}_proj
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, impl, past=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, impl, past)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(nn.Module):
    """Dream: the SEAM forward over Qwen2's module tree (module docstring)."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.config = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.attn_impl = "sdpa"
        self.activation_checkpointing = False
        self.head_chunk_size = DEFAULT_CHUNK_SIZE

    @property
    def arch(self):
        return self.config.arch

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        init_normal(self, seed, std)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta=None, cache=None,
                readout: Readout = Readout(), attn_impl: str | None = None):
        m = self.model
        parts = (m.embed_tokens, m.layers, m.norm, self.lm_head, self.config.head_dim, self.config.rope_theta)
        return bidirectional_forward(self, parts, input_ids, position_ids, meta, cache, readout, attn_impl)
