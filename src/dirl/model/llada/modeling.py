"""LLaDA's decoder with its native module tree, so real checkpoints load by name.

``model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm,
ff_proj, up_proj, ff_out}, ln_f, ff_out}``: the name ``ff_out`` is both a block's down
projection and the LM head (exposed as ``lm_head``). ``ff_proj`` is the SwiGLU gate.
Attention is bidirectional (the mask comes from the caller's TokenMeta, or none at all);
logits are not shifted: row i predicts token i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dirl.model.decoder import bidirectional_forward, init_normal
from dirl.model.lm_head import DEFAULT_CHUNK_SIZE
from dirl.model.llada.config import LLaDAConfig
from dirl.model.blocks import RMSNorm, apply_rope, attention_core
from dirl.model.forward import Readout


class LLaDABlock(nn.Module):
    """One LLaMA-style block in OLMo's naming (``model.transformer.blocks.N``)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=cfg.include_qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=cfg.include_qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=cfg.include_qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)   # gate
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)    # down

    def forward(self, x, cos, sin, mask, impl, past=None):
        batch, num_tokens, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, num_tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, num_tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, num_tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        out = attention_core(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, impl, past)  # (B, T, H*D)
        x = x + self.attn_out(out)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class _Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)  # the LM head


class _Model(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = _Transformer(cfg)


class LLaDAModelLM(nn.Module):
    """LLaDA: the SEAM forward over the native module tree (module docstring)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.model = _Model(cfg)
        self.attn_impl = "sdpa"
        self.activation_checkpointing = False
        self.head_chunk_size = DEFAULT_CHUNK_SIZE

    @property
    def arch(self):
        return self.config.arch

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def tie_weights(self) -> None:
        """LLaDA's head is never tied here (weight_tying is refused at load): nothing to do."""

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        init_normal(self, seed, std)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, meta=None, cache=None,
                readout: Readout = Readout(), attn_impl: str | None = None):
        t = self.model.transformer
        parts = (t.wte, t.blocks, t.ln_f, t.ff_out, self.config.head_dim, self.config.rope_theta)
        return bidirectional_forward(self, parts, input_ids, position_ids, meta, cache, readout, attn_impl)
