"""TraceRL's diffusion-based value model: a copy of the policy's decoder and a scalar head.

TraceRL (Wang et al. 2025, §3.3; dLLM-RL ``train/init_sdar_value_model.py``) builds the
value model from the policy checkpoint plus a ``Linear(hidden, 1)`` head, and runs it on
the same trace rows as the policy: the value of token j is read at j's noisy position in
the copy of the step that committed it (:mod:`dirl.model.trace`), i.e. it scores the
denoising state right before that step.

Why a separate copy and not a head on the policy's own hidden states: a shared trunk
needs a loss weight between the policy and value objectives, and the value gradient
would move the policy (or, detached, the value would be a linear probe of features that
drift with every policy step); the copy is what the paper trains, has its own optimizer
and lr, and leaves the policy update bit-identical to a run without a critic as long as
the values are zero. The head is zero-initialised, so the first values are 0 and the
first advantages are the group's. The copy drops the LM head (the (V, d) matrix is never
used: only hidden states are read) and shares the policy's config object, so a block size
set on the policy (``block_size``, ``block_size_schedule``) is the value model's too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dirl.model.forward import Readout
from dirl.model.trace import TracePack


class ValueModel(nn.Module):
    """``backbone`` (the policy's decoder, copied; no LM head) + ``value_head`` (d -> 1)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        lm_head = policy.lm_head
        policy.lm_head = None  # not deep-copied: a value model never projects onto the vocabulary
        try:
            self.backbone = copy.deepcopy(policy)
        finally:
            policy.lm_head = lm_head
        self.backbone.config = policy.config  # shared: a block-size change applies to both models
        self.backbone.requires_grad_(True)
        weight = next(self.backbone.parameters())
        self.value_head = nn.Linear(policy.arch.hidden_size, 1, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    @property
    def arch(self):
        return self.backbone.arch

    def forward(self, pack: TracePack) -> torch.Tensor:
        """The value of each scored token's state: (N,) fp32, N = ``pack.score_index``'s length."""
        if pack.score_index.numel() == 0:
            return torch.zeros(0, device=pack.input_ids.device)
        hidden = self.backbone(pack.input_ids, pack.position_ids, pack.meta,
                               readout=Readout(pack.score_index, hidden=True)).hidden  # (N, d)
        return self.value_head(hidden).squeeze(-1).float()
