"""Dream's ``config.json`` with its own (Qwen2) field names, and the size presets.

Dream-7B (Ye et al. 2025, "Dream 7B") is Qwen2.5-7B made bidirectional: grouped-query
attention with q/k/v biases, RMSNorm eps 1e-6, RoPE theta 1e6, an untied head -- and logits
shifted as in the AR model it came from (token i is read from row i - 1: ``arch.logit_shift = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dirl.model.arch import Arch, Sizes, dense_sizes
from dirl.model.hf_config import FaithfulConfig, read_ids_and_dtype, require

DEFAULT_BLOCK_LENGTH = 32  # the semi-AR block of TraceRL's Dream sampler; diffusion_generate has none


@dataclass
class DreamConfig(FaithfulConfig):
    MODEL_TYPE = "Dream"
    ARCHITECTURES = ("DreamModel",)
    DERIVED = ("pad_token_id", "torch_dtype")

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    mask_token_id: int = 151666
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    bos_token_id: int | None = 151643
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: hidden_size {self.hidden_size} / num_attention_heads "
                             f"{self.num_attention_heads} / num_key_value_heads {self.num_key_value_heads} do not divide")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"config.json: mask_token_id {self.mask_token_id} is outside the vocabulary")

    @classmethod
    def normalise(cls, known: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        require(data, "hidden_act", ("silu",), "silu")
        require(data, "rope_scaling", (None,), None)
        require(data, "use_sliding_window", (False,), False)
        require(data, "use_mrope", (False,), False)
        read_ids_and_dtype(known, data, cls.pad_token_id)
        return known

    @classmethod
    def for_init(cls, preset: dict[str, Any], *, vocab_size: int, mask_token_id: int, eos_token_id: int,
                 pad_token_id: int, block_size: int, torch_dtype: str, **overrides: Any) -> "DreamConfig":
        """The config of a random model (``dirl init``). ``block_size`` is not Dream's: full attention
        has no block in the model (the sampler's ``block_length`` is a sampling setting)."""
        return cls(**{**preset, "vocab_size": vocab_size, "mask_token_id": mask_token_id,
                      "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": eos_token_id,
                      "torch_dtype": torch_dtype, **overrides},
                   extra={"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
                          "attention_dropout": 0.0})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def arch(self) -> Arch:
        return Arch(family="dream", attention="bidirectional", logit_shift=1, block_size=DEFAULT_BLOCK_LENGTH,
                    num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                    num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    max_position_embeddings=self.max_position_embeddings)

    def num_parameters(self) -> int:
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + (d + 2 * kv) + d * d + 3 * d * i + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * per_layer + d + head

    @property
    def sizes(self) -> Sizes:
        """What the memory plan reads (:class:`~dirl.model.arch.Sizes`)."""
        kv = self.num_key_value_heads * self.head_dim
        return dense_sizes(self.arch, parameters=self.num_parameters(), intermediate=self.intermediate_size,
                           tied=self.tie_word_embeddings, attention_extra=(self.hidden_size + 2 * kv) + 2 * self.hidden_size)


PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the demo: two layers, d 64, grouped-query like the real model.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10_000.0, max_position_embeddings=512, torch_dtype="float32"),
    # The full-attention demo: 4 layers, d 128 (~0.8M parameters with the char tokenizer).
    "demo": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10_000.0, max_position_embeddings=256, torch_dtype="float32"),
    # Dream-v0-Instruct-7B's shape (../shared/dream-v0-instruct-7b/config.json); weights are not shipped.
    "dream-7b": dict(),
}
