"""The normalised architecture record: what dirl outside a family's folder reads of a model.

Each family's config keeps its own field names (``num_hidden_layers``, ``n_layers``,
``d_model`` ...) so it saves faithfully; its ``.arch`` property maps them onto this one
record. The engine, the KV cache, the layouts, the trainers and the memory plan read
``model.arch`` (or ``model.config.arch``) and never a family's field names, so a new
family is a folder plus a registry line (:mod:`dirl.model.families`).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KINDS = ("block_causal", "bidirectional")


@dataclass(frozen=True)
class Arch:
    family: str
    attention: str        # "block_causal" | "bidirectional"
    logit_shift: int      # 0: token i's logits at row i; 1 (Dream): at row i - 1
    block_size: int       # block-causal: the model's block; bidirectional: the sampler's default block length
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention {self.attention!r} is not one of {list(ATTENTION_KINDS)}")
        if self.logit_shift not in (0, 1):
            raise ValueError(f"logit_shift must be 0 or 1, got {self.logit_shift}")
