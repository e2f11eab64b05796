"""Building blocks shared by the model families: RMSNorm, RoPE, SwiGLU and the attention core.

Each is written once here and reused by every family's module tree (the families keep
their own parameter names by naming the submodules; these blocks only own ``weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dirl.model.attention import attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like Qwen3 / LLaMA, then cast back before the weight. F.rms_norm is
        # one fused op where the spelled-out form was five (a decode forward runs 4 per layer).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, rotary_dim) for rotate-half RoPE (Qwen / LLaMA layout).

    ``rotary_dim`` < head_dim is partial RoPE: only the first ``rotary_dim`` channels of a
    head rotate (:func:`apply_rope`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, R/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, R)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` channels of x (B, H, T, D); the rest pass."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; the three maps take the family's names."""

    def __init__(self, hidden_size: int, intermediate_size: int, names=("gate_proj", "up_proj", "down_proj"),
                 bias: bool = False):
        super().__init__()
        self._names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden_size, intermediate_size, bias=bias))
        setattr(self, up, nn.Linear(hidden_size, intermediate_size, bias=bias))
        setattr(self, down, nn.Linear(intermediate_size, hidden_size, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(F.silu(gate(x)) * up(x))


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, impl: str, cache_layer) -> torch.Tensor:
    """Attention of rotated q (B, H, T, D) over k, v (B, Hkv, T, D) -> (B, T, H * D).

    ``cache_layer``: one layer of the engine's in-place cache (``update(k, v)`` stores these
    K/V in their slots and returns the slots to attend over, no copy of the past) or None."""
    if cache_layer is not None:
        k, v = cache_layer.update(k, v)  # (B, Hkv, S, D) views
    out = attend(q, k, v, mask, impl)  # (B, H, T, D)
    batch, _, num_tokens, _ = out.shape
    return out.transpose(1, 2).reshape(batch, num_tokens, -1)


class PreNormLayer(nn.Module):
    """One pre-norm decoder layer in Qwen's naming: ``x + attn(input_layernorm(x))``, then
    ``x + mlp(post_attention_layernorm(x))``. ``attn_name`` is the attention's native attribute
    (``self_attn`` in Qwen's tree, ``attention`` in Ling's), so checkpoints keep their names; the
    submodules register in that order (attention, mlp, the two norms), as the seeded init expects."""

    def __init__(self, attn_name: str, attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.attn_name = attn_name
        setattr(self, attn_name, attn)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x, cos, sin, mask, impl, cache_layer=None):
        x = x + getattr(self, self.attn_name)(self.input_layernorm(x), cos, sin, mask, impl, cache_layer)
        return x + self.mlp(self.post_attention_layernorm(x))
