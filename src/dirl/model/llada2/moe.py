"""The Ling-2.0 / LLaDA2 mixture-of-experts MLP: grouped sigmoid routing, routed + shared experts.

Routing (LLaDA2.0 tech report; Ling-2.0; the public ``modeling_llada2_moe.py``), per token:

1. ``scores = sigmoid(x W_r^T)`` in fp32 (the router runs in fp32 whatever the model dtype);
2. selection uses ``scores + expert_bias`` (a buffer, the auxiliary-loss-free balancing bias):
   experts are split into ``n_group`` groups, a group's score is the sum of its top-2 biased
   scores, the best ``topk_group`` groups are kept, and the top ``num_experts_per_tok`` biased
   scores among their experts are chosen;
3. the weights are the chosen experts' *plain* scores, normalised to sum to 1 (when top-k > 1,
   with the code's +1e-20) and multiplied by ``routed_scaling_factor``.

The output is ``sum_k w_k expert_k(x) + shared(x)``; the weighted sum is taken in fp32 and cast
back to the model dtype, as the reference's ``moe_infer`` does.

Expert compute is grouped by expert: the (token, slot) pairs are sorted by expert once, each
expert with tokens runs one matmul on its rows, and ``index_add_`` scatters the weighted rows
back. The Python loop is over experts, never over tokens. With grad enabled every expert runs,
an idle one on zero rows, so each expert weight gets a (zero) gradient in every backward: DDP's
reducer and FSDP2's reduce-scatter then see the same parameters on every rank, whatever the
routing drew there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dirl.model.blocks import SwiGLU
from dirl.model.llada2.config import LLaDA2Config


def route(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped top-k routing. logits: (N, E) fp32 router logits; expert_bias: (E,).

    -> (expert ids (N, k) long, weights (N, k) fp32). See the module docstring."""
    num_tokens, num_experts = logits.shape
    scores = torch.sigmoid(logits.float())                                        # (N, E)
    biased = scores + expert_bias.float()                                         # (N, E)
    group_scores = biased.view(num_tokens, n_group, -1).topk(2, dim=-1).values.sum(-1)  # (N, G)
    kept = group_scores.topk(topk_group, dim=-1).indices                          # (N, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)     # (N, E)
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices  # (N, k)
    weights = scores.gather(1, ids)                                               # (N, k) plain scores
    if top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scale


class Router(nn.Module):
    """``mlp.gate``: the router weight and the ``expert_bias`` buffer (saved, never trained by SGD)."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scale = cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, E) in fp32
        return route(logits, self.expert_bias, self.top_k, self.n_group, self.topk_group, self.scale)


def grouped_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList,
                    counts_out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[n, k] * experts[ids[n, k]](x[n]), grouped by expert.

    x: (N, H); ids, weights: (N, k) -> (N, H) in x's dtype (accumulated in fp32).
    ``counts_out``: (E,) long, incremented in place by the tokens each expert received."""
    top_k = ids.shape[1]
    flat = ids.reshape(-1)                                  # (N k,)
    order = flat.argsort(stable=True)                       # slots sorted by expert
    counts = torch.bincount(flat, minlength=len(experts))   # (E,)
    if counts_out is not None:
        counts_out += counts
    flat_weights = weights.reshape(-1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    train = torch.is_grad_enabled()
    for expert, count in enumerate(counts.tolist()):
        if count == 0 and not train:
            continue
        slots = order[start:start + count]                  # (c,)
        tokens = slots // top_k
        rows = experts[expert](x.index_select(0, tokens))   # (c, H)
        out.index_add_(0, tokens, rows.float() * flat_weights[slots, None])
        start += count
    return out.to(x.dtype)


class SparseMoeBlock(nn.Module):
    """``mlp`` of an MoE layer: ``gate`` (router), ``experts.E``, ``shared_experts``."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        # Tokens routed to each expert by no-grad forwards (decoding, scoring) since the last
        # :meth:`take_expert_counts`: a statistic the forward never reads, for the RL trainer's
        # utilisation metric. Not a buffer: DDP would broadcast it, and it is not a weight.
        self.expert_counts: torch.Tensor | None = None

    def take_expert_counts(self) -> torch.Tensor | None:
        """(E,) tokens per expert since the last call (None: no forward yet); resets the count."""
        counts, self.expert_counts = self.expert_counts, None
        return counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                     # (N, H)
        ids, weights = self.gate(flat)
        counts = None
        if not torch.is_grad_enabled():  # training forwards (and their recomputation) are not counted
            if self.expert_counts is None or self.expert_counts.device != flat.device:
                self.expert_counts = torch.zeros(len(self.experts), dtype=torch.long, device=flat.device)
            counts = self.expert_counts
        out = grouped_experts(flat, ids, weights, self.experts, counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
