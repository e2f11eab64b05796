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
with blocks of one token (``TokenMeta.clean(positions, 1)``) is causal, so no family code changes.
"""

from __future__ import annotations

import torch

from dirl.algo.nelbo import TokenBatch, nelbo_loss, response_counts
from dirl.model.forward import Readout
from dirl.model.layout import readout_rows
from dirl.model.lm_head import head_logprobs
from dirl.model.masks import TokenMeta


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
    causal = TokenMeta.clean(position_ids, 1, batch.doc_ids >= 0)  # one sample a row
    hidden = model(input_ids, position_ids, causal, readout=readout, attn_impl=attn_impl).hidden  # (N, d)
    target_logp = head_logprobs(model, hidden, input_ids[row_idx, col_idx])  # (N,)
    num_samples = int(batch.sample_ids.max()) + 1 if batch.sample_ids.numel() else 0
    num_response = response_counts(batch.response_mask, batch.sample_ids, num_samples)  # (S,)
    # The NELBO's normalisation with every token scored at weight 1 (no masking probability).
    loss = nelbo_loss(target_logp, torch.ones_like(target_logp), batch.sample_ids[row_idx, col_idx], num_response)
    return loss, {"num_scored": int(row_idx.numel()), "num_response": int(num_response.sum())}
