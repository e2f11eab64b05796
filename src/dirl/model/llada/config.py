"""LLaDA's ``config.json`` with its own (OLMo-style) field names, and the size presets.

LLaDA-8B (Nie et al. 2025, "Large Language Diffusion Models") is a LLaMA-shaped decoder with
full bidirectional attention: multi-head attention, RMSNorm (eps 1e-5, fp32), rotate-half RoPE
(theta 5e5), SwiGLU of ``mlp_hidden_size``, no biases, an untied head. Settings of the OLMo
config this implementation does not cover (ALiBi, non-llama blocks, LayerNorm, tied weights,
biases on every linear) are refused at load with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dirl.model.arch import Arch, Sizes, dense_sizes
from dirl.model.hf_config import FaithfulConfig, read_ids_and_dtype, require

DEFAULT_BLOCK_LENGTH = 32  # the reference sampler's default block_length (LLaDA generate.py)


@dataclass
class LLaDAConfig(FaithfulConfig):
    MODEL_TYPE = "llada"
    ARCHITECTURES = ("LLaDAModelLM",)
    DERIVED = ("n_kv_heads", "embedding_size", "torch_dtype")

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None   # None: n_heads (multi-head)
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int | None = None  # None: vocab_size
    rope_theta: float = 500_000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    include_qkv_bias: bool = False
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"config.json: d_model {self.d_model} / n_heads {self.n_heads} / n_kv_heads "
                             f"{self.n_kv_heads} do not divide")
        if not 0 <= self.mask_token_id < self.embedding_size:
            raise ValueError(f"config.json: mask_token_id {self.mask_token_id} is outside the vocabulary")

    @classmethod
    def normalise(cls, known: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        require(data, "block_type", ("llama",), "llama")
        require(data, "activation_type", ("silu", "swiglu"), "silu")
        require(data, "alibi", (False,), False)
        require(data, "rope", (True,), True)
        require(data, "layer_norm_type", ("rms",), "rms")
        require(data, "weight_tying", (False,), False)
        require(data, "include_bias", (False,), False)
        require(data, "attention_layer_norm", (False,), False)
        require(data, "scale_logits", (False,), False)
        read_ids_and_dtype(known, data, cls.pad_token_id)
        return known

    @classmethod
    def for_init(cls, preset: dict[str, Any], *, vocab_size: int, mask_token_id: int, eos_token_id: int,
                 pad_token_id: int, block_size: int, torch_dtype: str, **overrides: Any) -> "LLaDAConfig":
        """The config of a random model (``dirl init``). ``block_size`` is not LLaDA's: full attention
        has no block in the model (the sampler's ``block_length`` is a sampling setting)."""
        return cls(**{**preset, "vocab_size": vocab_size, "embedding_size": vocab_size,
                      "mask_token_id": mask_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
                      "torch_dtype": torch_dtype, **overrides}, extra=dict(INIT_EXTRA))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def tie_word_embeddings(self) -> bool:  # what the checkpoint code asks; LLaDA's head is never tied here
        return False

    @property
    def arch(self) -> Arch:
        return Arch(family="llada", attention="bidirectional", logit_shift=0, block_size=DEFAULT_BLOCK_LENGTH,
                    num_layers=self.n_layers, hidden_size=self.d_model, num_heads=self.n_heads,
                    num_kv_heads=self.n_kv_heads, head_dim=self.head_dim, vocab_size=self.embedding_size,
                    mask_token_id=self.mask_token_id, eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id, max_position_embeddings=self.max_sequence_length)

    def num_parameters(self) -> int:
        d, h, v = self.d_model, self.mlp_hidden_size, self.embedding_size
        kv = self.n_kv_heads * self.head_dim
        qkv_bias = (d + 2 * kv) if self.include_qkv_bias else 0
        per_layer = d * (d + 2 * kv) + qkv_bias + d * d + 3 * d * h + 2 * d
        return 2 * v * d + self.n_layers * per_layer + d

    @property
    def sizes(self) -> Sizes:
        """What the memory plan reads (:class:`~dirl.model.arch.Sizes`)."""
        kv = self.n_kv_heads * self.head_dim
        bias = (self.d_model + 2 * kv) if self.include_qkv_bias else 0
        return dense_sizes(self.arch, parameters=self.num_parameters(), intermediate=self.mlp_hidden_size,
                           tied=False, attention_extra=bias + 2 * self.d_model)


# The OLMo settings this implementation assumes, written into a fresh config so LLaDA's own code
# (configuration_llada.py, whose defaults differ) builds the same network.
INIT_EXTRA: dict[str, Any] = {
    "activation_type": "silu", "alibi": False, "attention_dropout": 0.0, "attention_layer_norm": False,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
    "include_bias": False, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "multi_query_attention": None, "residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
    "scale_logits": False, "use_cache": False, "weight_tying": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the demo: two layers, d 64, multi-head like the real model.
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128, rope_theta=10_000.0,
                 max_sequence_length=512, torch_dtype="float32"),
    # The full-attention demo: 4 layers, d 128 (~0.8M parameters with the char tokenizer).
    "demo": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, rope_theta=10_000.0,
                 max_sequence_length=256, torch_dtype="float32"),
    # LLaDA-8B-Instruct's shape (../shared/llada-8b-instruct/config.json); weights are not shipped.
    "llada-8b": dict(),
}
