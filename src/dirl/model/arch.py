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


@dataclass(frozen=True)
class Sizes:
    """Parameter and activation counts of a family's network: what the memory plan reads.

    A family's config computes it from its own field names (``cfg.sizes``), so the plan never
    reads a family's schema. A mixture of experts holds and trains every expert
    (``parameters``) but runs ``active_parameters`` per token."""

    parameters: int         # every parameter (all experts): what states and a checkpoint hold
    active_parameters: int  # what one token runs through (MoE: top-k routed + shared experts)
    embedding: int          # the input embedding's (vocabulary x hidden)
    tied: bool              # the LM head is the embedding
    max_layer: int          # the largest decoder layer (MoE: with all its experts): what FSDP2 gathers at once
    mlp_activations: int    # elements one token's MLP keeps for backward, the largest layer's


def dense_sizes(arch: Arch, *, parameters: int, intermediate: int, tied: bool,
                attention_extra: int = 0) -> Sizes:
    """The :class:`Sizes` of a dense SwiGLU decoder (``intermediate``: the MLP's hidden width; gate /
    up / their product kept per token). ``attention_extra``: a layer's q/k/v biases, q/k norms and
    the two layer norms, beyond the four projections."""
    h, q, kv = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * intermediate + attention_extra
    return Sizes(parameters=parameters, active_parameters=parameters, embedding=arch.vocab_size * h, tied=tied,
                 max_layer=layer, mlp_activations=3 * intermediate)
