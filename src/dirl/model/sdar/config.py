"""SDAR's config record (its ``config.json`` schema), its ``.arch``, and the built-in size presets.

The field names are exactly those of SDAR's ``config.json`` (a Qwen3 decoder plus
``block_size`` and ``mask_token_id``), so a real SDAR / TraDo / DiRL checkpoint
directory loads with no renaming. Fields we do not use (``auto_map``,
``fuse_cross_entropy``, ...) are kept in ``extra`` and written back on save.

Saving is faithful to what was loaded: a field dirl did not change is written
back exactly as it was read (a derived ``pad_token_id`` stays absent, a list of
EOS ids stays a list), and the files dirl does not own (remote code named by
``auto_map``, ``generation_config.json``) travel with the config in
``companion_files`` -- see :mod:`dirl.model.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dirl.model.arch import Arch, Sizes, dense_sizes
from dirl.model.hf_config import read_ids_and_dtype, record_loaded, write_fields


@dataclass
class SDARConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    block_size: int = 4
    mask_token_id: int = 151669
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    bos_token_id: int | None = 151643
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)
    # Not config.json fields. ``companion_files``: file name -> bytes of the source directory's
    # files dirl does not own, written back on save. ``loaded``: field -> (value as read or
    # absent, value as parsed), so an unchanged field is written back as it was read.
    companion_files: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    loaded: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary "
                             f"(vocab_size {self.vocab_size})")

    @property
    def arch(self) -> Arch:
        """The normalised record the rest of dirl reads (read afresh: ``block_size`` may change)."""
        return Arch(family="sdar", attention="block_causal", logit_shift=0, block_size=self.block_size,
                    num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                    num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    max_position_embeddings=self.max_position_embeddings)

    @classmethod
    def for_init(cls, preset: dict[str, Any], *, vocab_size: int, mask_token_id: int, eos_token_id: int,
                 pad_token_id: int, block_size: int | None, torch_dtype: str, **overrides: Any) -> "SDARConfig":
        """The config of a random model (``dirl init``): a preset, the tokenizer's ids, native overrides;
        ``block_size`` None keeps SDAR's 4."""
        sizes = {} if block_size is None else {"block_size": block_size}
        return cls(**{**preset, "vocab_size": vocab_size, "mask_token_id": mask_token_id,
                      "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": eos_token_id,
                      **sizes, "torch_dtype": torch_dtype, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (SDAR's schema); unchanged fields exactly as they were read."""
        out = dict(self.extra)
        write_fields(self, out, config_field_names(), _DERIVED_FIELDS)
        if "dtype" in out:  # transformers >= 5 spells torch_dtype "dtype": keep both in step
            out["dtype"] = self.torch_dtype
        out["model_type"] = "sdar"
        out.setdefault("architectures", ["SDARForCausalLM"])
        out.setdefault("hidden_act", "silu")
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> "SDARConfig":
        """Build from a ``config.json`` dict; unknown fields are preserved in ``extra``."""
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {data['hidden_act']!r} is not supported (SDAR uses silu)")
        if data.get("rope_scaling"):
            raise ValueError("config.json: rope_scaling is not supported yet")
        names = config_field_names()
        known = {k: v for k, v in data.items() if k in names}
        read_ids_and_dtype(known, data, cls.pad_token_id)
        if "head_dim" not in known and "hidden_size" in known and "num_attention_heads" in known:
            known["head_dim"] = known["hidden_size"] // known["num_attention_heads"]
        if "rope_theta" not in known and isinstance(data.get("rope_parameters"), dict):
            known["rope_theta"] = _default_rope_theta(data["rope_parameters"])
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        cfg = cls(**known, extra=extra)
        record_loaded(cfg, data, names)
        return cfg

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * per_layer + h + head

    @property
    def sizes(self) -> Sizes:
        """What the memory plan reads (:class:`~dirl.model.arch.Sizes`)."""
        return dense_sizes(self.arch, parameters=self.num_parameters(), intermediate=self.intermediate_size,
                           tied=self.tie_word_embeddings, attention_extra=2 * self.hidden_size + 2 * self.head_dim)


def config_field_names() -> list[str]:
    """The SDARConfig fields that are ``config.json`` fields."""
    return [f.name for f in dataclasses.fields(SDARConfig) if f.name not in _NOT_HF_FIELDS]


_NOT_HF_FIELDS = ("extra", "companion_files", "loaded")
# Filled in from other fields on load (or spelled otherwise in the source): not added on save.
_DERIVED_FIELDS = ("pad_token_id", "head_dim", "torch_dtype", "rope_theta")


def _default_rope_theta(rope_parameters: dict[str, Any]) -> float:
    """transformers >= 5 writes RoPE as ``rope_parameters``; only plain RoPE is supported."""
    if rope_parameters.get("rope_type", "default") != "default" or "rope_theta" not in rope_parameters:
        raise ValueError(f"config.json: rope_parameters {rope_parameters!r} is not supported "
                         "(plain RoPE with a rope_theta only)")
    return float(rope_parameters["rope_theta"])


# Architecture presets. Vocabulary and special ids come from the tokenizer at init time.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: two layers, d 64 -- a forward takes milliseconds on CPU.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 rope_theta=10_000.0, max_position_embeddings=512),
    # Benchmarks and the demo: ~10M parameters with the char tokenizer.
    "small": dict(hidden_size=320, intermediate_size=1088, num_hidden_layers=8,
                  num_attention_heads=5, num_key_value_heads=1, head_dim=64,
                  rope_theta=10_000.0, max_position_embeddings=1024),
    # `dirl demo`: ~0.8M parameters (4 layers, d 128), 3.2 MB in fp32. Chosen for the
    # 10-minute CPU budget: `small` runs ~10x slower per token on a 2-core CPU, too
    # slow to SFT in the budget and to take the ~200 RL steps the demo needs.
    "demo": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 rope_theta=10_000.0, max_position_embeddings=256),
    # The real thing (weights are not shipped): SDAR-8B-Chat's shape.
    "sdar-8b": dict(),
}


def preset_config(name: str, **overrides: Any) -> SDARConfig:
    """An SDARConfig from a preset name plus field overrides (vocab and special ids)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return SDARConfig(**{**PRESETS[name], **overrides})
