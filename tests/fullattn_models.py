"""Tiny LLaDA / Dream models for the full-attention tests (not a test module).

Vocabulary of 48 ids: mask 47, eos / pad 1. Norm weights and biases are perturbed away from
1 / 0 so a wrong or missing norm or bias shows in the logits.
"""

from __future__ import annotations

import torch

from dirl.model.families import get_family

VOCAB, MASK_ID, EOS_ID = 48, 47, 1


def tiny_model(family: str, seed: int = 0, **fields):
    fam = get_family(family)
    size = {"llada": dict(vocab_size=VOCAB, embedding_size=VOCAB), "dream": dict(vocab_size=VOCAB)}[family]
    cfg = fam.config_cls(**{**fam.presets["tiny"], **size, "mask_token_id": MASK_ID, "eos_token_id": EOS_ID,
                            "pad_token_id": EOS_ID, **fields})
    model = fam.model_cls(cfg)
    model.init_weights(seed, std=0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()
