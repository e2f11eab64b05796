"""LLaDA2.x (Ling-2.0 MoE) configuration with the model's own ``config.json`` field names.

The field names are those of ``inclusionAI/LLaDA2.0-mini``'s ``config.json`` (``model_type``
``llada2_moe``), so a real checkpoint directory loads with no renaming and saves back with
its own schema. Fields dirl does not use (``auto_map``, ``sliding_window``, ``output_dropout``
...) are kept in ``extra``; a field dirl did not change is written back exactly as read.

Where the public modeling code and the config disagree, the code wins (see also the
module docstring of :mod:`dirl.model.llada2.model`):

* RoPE covers ``int(head_dim * partial_rotary_factor)`` dims of each head (the code's rule);
  ``rotary_dim`` is kept and written back but not read (64 = 128 x 0.5 on the real model).
* ``norm_topk_prob``, ``score_function``, ``router_dtype`` and ``moe_router_enable_expert_bias``
  are not read by the code: the router is always a sigmoid in fp32 with an expert-bias buffer,
  and the top-k weights are always normalised when top-k > 1. They stay in ``extra``.

The real config.json has no ``mask_token_id``, ``eos_token_id`` or ``block_size`` (the reference
``generate`` takes them as arguments): the defaults below are LLaDA2's (mask 156895, eos 156892,
blocks of 32) and are not added on save unless changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dirl.model.arch import Arch, Sizes
from dirl.model.hf_config import record_loaded, write_fields

MODEL_TYPE = "llada2_moe"
ARCHITECTURE = "LLaDA2MoeModelLM"


@dataclass
class LLaDA2Config:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120          # the dense first layer(s)
    moe_intermediate_size: int = 512       # one routed expert; the shared expert is x num_shared_experts
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_qkv_bias: bool = False
    use_bias: bool = False
    use_qk_norm: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int = 156892
    eos_token_id: int = 156892
    mask_token_id: int = 156895
    block_size: int = 32
    torch_dtype: str = "bfloat16"         # config.json spells it "dtype" (transformers >= 4.56) or "torch_dtype"
    extra: dict[str, Any] = field(default_factory=dict)
    companion_files: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    loaded: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})"),
            (self.num_experts % self.n_group == 0,
             f"num_experts ({self.num_experts}) must be a multiple of n_group ({self.n_group})"),
            (1 <= self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be in [1, n_group]"),
            (self.num_experts // self.n_group >= 2,
             "each expert group needs >= 2 experts (a group's score is its top-2 sum)"),
            (1 <= self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group),
             f"num_experts_per_tok ({self.num_experts_per_tok}) must fit in the kept groups"),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (0 <= self.mask_token_id < self.vocab_size,
             f"mask_token_id {self.mask_token_id} is outside the vocabulary (vocab_size {self.vocab_size})"),
            (0 < self.partial_rotary_factor <= 1 and self.rotary_dims % 2 == 0,
             f"partial_rotary_factor {self.partial_rotary_factor} must give an even rotary dim"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config.json: {message}")

    @property
    def rotary_dims(self) -> int:
        """Dims of each head under RoPE: the modeling code's ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def arch(self) -> Arch:
        return Arch(family="llada2", attention="block_causal", logit_shift=0, block_size=self.block_size,
                    num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                    num_heads=self.num_attention_heads, num_kv_heads=self.num_key_value_heads,
                    head_dim=self.head_dim, vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    max_position_embeddings=self.max_position_embeddings)

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense_replace

    # -- config.json ----------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LLaDA2Config:
        """Build from a ``config.json`` dict; unknown fields are preserved in ``extra``."""
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {data['hidden_act']!r} is not supported (LLaDA2 uses silu)")
        if data.get("rope_scaling"):
            raise ValueError("config.json: rope_scaling is not supported")
        if data.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window is not supported")
        names = field_names()
        known = {k: v for k, v in data.items() if k in names}
        spelled = {k: data[k] for k in _DTYPE_KEYS if k in data}
        if isinstance(spelled.get("dtype", spelled.get("torch_dtype")), str):
            known["torch_dtype"] = spelled.get("dtype", spelled.get("torch_dtype"))
        if isinstance(known.get("eos_token_id"), list):
            known["eos_token_id"] = known["eos_token_id"][0]
        if known.get("num_shared_experts") is None:  # the code's "None = no shared expert"
            known["num_shared_experts"] = 0
        extra = {k: v for k, v in data.items() if k not in names and k not in ("model_type", *_DTYPE_KEYS)}
        cfg = cls(**known, extra=extra)
        record_loaded(cfg, data, names)
        cfg.loaded["torch_dtype"] = (spelled, cfg.torch_dtype)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (LLaDA2's schema); unchanged fields exactly as they were read."""
        out = dict(self.extra)
        spelled, parsed_dtype = self.loaded.get("torch_dtype", ({}, _ABSENT))
        if parsed_dtype == self.torch_dtype:
            out.update(spelled)
        else:
            out.update({key: self.torch_dtype for key in (spelled or ("dtype",))})
        write_fields(self, out, field_names(), _DERIVED_FIELDS)
        out["model_type"] = MODEL_TYPE
        out.setdefault("architectures", [ARCHITECTURE])
        out.setdefault("hidden_act", "silu")
        return out

    @classmethod
    def for_init(cls, preset: dict[str, Any], *, vocab_size: int, mask_token_id: int, eos_token_id: int,
                 pad_token_id: int, block_size: int | None = None, torch_dtype: str = "float32",
                 **overrides: Any) -> LLaDA2Config:
        """A random model's config for a tokenizer (``dirl init family=llada2``): a preset, the
        tokenizer's ids, native overrides; ``block_size`` None keeps LLaDA2's 32."""
        values = {**preset, "vocab_size": vocab_size, "mask_token_id": mask_token_id,
                  "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "torch_dtype": torch_dtype, **overrides}
        if block_size is not None:
            values["block_size"] = block_size
        return cls(**values)

    # -- sizes ------------------------------------------------------------------------------------------

    def _attention_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return h * (q + 2 * kv) + q * h + (2 * d if self.use_qk_norm else 0) + 2 * h  # + the two layer norms

    def _moe_params(self, experts: int) -> int:
        """An MoE layer's MLP with ``experts`` routed experts (all of them, or the active top-k)."""
        h, i = self.hidden_size, self.moe_intermediate_size
        return 3 * h * i * (experts + self.num_shared_experts) + self.num_experts * h  # + the router

    def _count(self, experts: int) -> int:
        h, v = self.hidden_size, self.vocab_size
        dense = 3 * h * self.intermediate_size
        layers = sum(self._attention_params() + (self._moe_params(experts) if self.is_moe_layer(i) else dense)
                     for i in range(self.num_hidden_layers))
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + layers + h + head

    def num_parameters(self) -> int:
        """Every parameter (all experts): what training states and a checkpoint hold."""
        return self._count(self.num_experts)

    def num_active_parameters(self) -> int:
        """Parameters one token runs through: top-k routed experts + the shared one (embedding included)."""
        return self._count(self.num_experts_per_tok)

    def max_layer_parameters(self) -> int:
        """The largest decoder layer (an MoE layer with all its experts): what FSDP2 gathers at once."""
        moe = self.num_hidden_layers > self.first_k_dense_replace
        return self._attention_params() + (self._moe_params(self.num_experts) if moe
                                           else 3 * self.hidden_size * self.intermediate_size)

    def mlp_activations_per_token(self) -> int:
        """Elements an MLP keeps per token for backward, the largest layer's (the memory plan's).

        MoE: gate / up / product of the top-k experts and the shared expert, the k routed copies of
        the token and their weighted outputs, and the router's fp32 logits and scores (x2 for fp32)."""
        h = self.hidden_size
        dense = 3 * self.intermediate_size if self.first_k_dense_replace else 0
        experts = self.num_experts_per_tok + self.num_shared_experts
        moe = 3 * self.moe_intermediate_size * experts + 2 * self.num_experts_per_tok * h + 4 * self.num_experts
        return max(dense, moe if self.num_hidden_layers > self.first_k_dense_replace else 0)

    @property
    def sizes(self) -> Sizes:
        """What the memory plan reads (:class:`~dirl.model.arch.Sizes`): all experts held, top-k run."""
        return Sizes(parameters=self.num_parameters(), active_parameters=self.num_active_parameters(),
                     embedding=self.vocab_size * self.hidden_size, tied=self.tie_word_embeddings,
                     max_layer=self.max_layer_parameters(), mlp_activations=self.mlp_activations_per_token())


_ABSENT = object()
_NOT_HF_FIELDS = ("extra", "companion_files", "loaded", "torch_dtype")  # torch_dtype: see _DTYPE_KEYS
_DTYPE_KEYS = ("dtype", "torch_dtype")
# Absent from the real config.json (or filled from another spelling): not added on save unless changed.
_DERIVED_FIELDS = ("mask_token_id", "eos_token_id", "block_size")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(LLaDA2Config) if f.name not in _NOT_HF_FIELDS]


PRESETS: dict[str, dict[str, Any]] = {
    # Tests: 2 layers (one dense, one MoE), d 64; 8 experts in 4 groups, 2 groups kept, top-2
    # (the real model's ratios: both the group and the expert selection matter).
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                 num_experts_per_tok=2, num_shared_experts=1, n_group=4, topk_group=2,
                 rope_theta=10_000.0, max_position_embeddings=512),
    # The real LLaDA2.0-mini / 2.1-mini shape (16B total, ~1.4B active; weights not shipped).
    "llada2-mini": dict(),
}
