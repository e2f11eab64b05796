"""Next-token SFT of a shifted-logit diffusion LM: Dream's autoregressive initialisation.

Dream-7B (Ye et al. 2025) starts from the AR model Qwen2.5 and keeps its readout: the logits
for token i sit at row i - 1 (the family's ``logit_shift`` of 1). Because that readout is the
AR one, a Dream-family model can first be trained as a plain causal LM and then adapted to
masked diffusion with the NELBO (:mod:`dirl.algo.nelbo`) -- the order Dream's own recipe
takes. At the demo's scale this matters: a tiny full-attention model trained with the NELBO
from scratch learns the left-to-right arithmetic far more slowly than one that learnt it
causally first (BENCHMARKS.md, "Full attention demo: AR initialisation").

Loss, per sample: the mean over its response tokens (EOS padding included, as in the NELBO)
of -log p(x_i | x_<i) under causal attention, then the plain mean over samples -- the NELBO's
normalisation, so the two objectives' losses read on the same scale.

Causal attention comes from the mask rule itself (:mod:`dirl.model.masks`): a clean stream
with blocks of one token is causal, so no family code changes.
"""

from __future__ import annotations

import torch

from dirl.algo.nelbo import TokenBatch, response_counts
from dirl.model.forward import Readout
from dirl.model.layout import readout_rows
from dirl.model.lm_head import head_logprobs
from dirl.model.masks import TokenMeta


def causal_meta(position_ids: torch.Tensor, doc_ids: torch.Tensor) -> TokenMeta:
    """(B, L) -> a clean stream with one block per position: every token sees itself and the
    tokens before it in its own sample (doc -1 = padding, seen by nothing)."""
    return TokenMeta(doc_ids, position_ids, torch.zeros_like(position_ids, dtype=torch.bool),
                     torch.full_like(position_ids, -1))


def sft_autoregressive(model, batch: TokenBatch, attn_impl: str | None = None) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy of ``batch``'s response tokens; one causal forward.

    ``batch``: unpacked (B, L) rows, one sample each (packed rows would be split into
    bidirectional segments by the full-attention forward). The model must read token i at
    row i - 1 (``arch.logit_shift == 1``). Returns ``(loss, stats)``."""
    if model.arch.logit_shift != 1:
        raise ValueError("the autoregressive objective needs a shifted-logit model (logit_shift 1, e.g. Dream)")
    input_ids, position_ids = batch.input_ids, batch.position_ids
    scored = batch.response_mask & (position_ids > 0)  # (B, L): a sample's first token has no row before it
    row_idx, col_idx = scored.nonzero(as_tuple=True)  # (N,) each
    target_index = row_idx * input_ids.shape[1] + col_idx
    readout = Readout(readout_rows(target_index, model.arch.logit_shift), hidden=True)
    hidden = model(input_ids, position_ids, causal_meta(position_ids, batch.doc_ids), readout=readout,
                   attn_impl=attn_impl).hidden  # (N, d)
    target_logp = head_logprobs(model, hidden, input_ids[row_idx, col_idx]).float()  # (N,)
    num_samples = int(batch.sample_ids.max()) + 1 if batch.sample_ids.numel() else 0
    num_response = response_counts(batch.response_mask, batch.sample_ids, num_samples)  # (S,)
    sample_index = batch.sample_ids[row_idx, col_idx]
    weight = 1.0 / num_response.to(target_logp.device).clamp(min=1).float()[sample_index]  # (N,)
    per_sample = torch.zeros(num_samples, device=target_logp.device).index_add(0, sample_index, -target_logp * weight)
    loss = per_sample.sum() / max(1, int((num_response > 0).sum()))
    return loss, {"num_scored": int(row_idx.numel()), "num_response": int(num_response.sum())}
