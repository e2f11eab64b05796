"""The blockwise masked-diffusion NELBO for SFT (DESIGN §6; BD3-LM / SDAR / LLaDA).

Per *sample* (one prompt+response; a packed row holds several) draw t ~ U(0, 1),
set the masking probability p = (1 - eps) t + eps (eps = 1e-3) and replace each
response token by ``[MASK]`` independently with probability p. Then

    loss_sample = (1 / n_resp) * sum_{masked i} CE(logits_i, x0_i) / p

where n_resp is the sample's number of response tokens (padding EOS included:
they are labelled targets). **Normalisation choice**: per sample, then the
plain mean over samples, so every example weighs the same whatever its length
(the token-mean alternative would weight long responses more). Prompt tokens are
never masked and never in the loss.

**Complementary masks** (``complementary=True``): a second noisy copy masks
exactly the response tokens the first copy left clean, so together the two copies
predict every response token exactly once. If copy 1 masks each token
independently with probability p, copy 2 masks each token independently with
probability 1 - p, so each copy, weighted by *its own* masking probability
(1/p resp. 1/(1-p)), is an unbiased estimate of the NELBO, and the loss is their
average. Departure: with complementary masks p is drawn as eps + (1 - 2 eps) t,
so both p and 1 - p lie in [eps, 1 - eps] (the 1/(1 - p) weight stays bounded,
and the two copies have the same marginal distribution of p).

Layout: one forward over ``[x_t^1 ; (x_t^2 ;) x_0]`` (BD3-LM's ``[x_t ; x_0]``,
extended with a second noisy stream when complementary), built by the model's
layout (:mod:`dirl.model.layout`; block-causal: a noisy block sees itself and the
clean blocks before it, the copies never see each other, and every stream shares
the position ids). The LM
head is evaluated only at masked noisy positions (``readout.index``), through the
chunked head (:mod:`dirl.model.lm_head`), so no (N, V) logits tensor is held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dirl.model.forward import Readout
from dirl.model.layout import get_layout
from dirl.model.lm_head import head_logprobs

NOISE_EPS = 1e-3


@dataclass
class TokenBatch:
    """Rows of (packed) SFT examples, every field (B, L)."""

    input_ids: torch.Tensor      # long
    position_ids: torch.Tensor   # long, restart at 0 for every packed example
    doc_ids: torch.Tensor        # long, example index within its row; -1 = padding
    response_mask: torch.Tensor  # bool, True on response tokens (EOS padding included)
    sample_ids: torch.Tensor     # long, batch-global example index; -1 = padding


@dataclass
class FixedNoise:
    """A draw given by hand (tests): per-sample times (S,) and/or per-token uniforms (B, L)."""

    t: torch.Tensor | None = None
    uniform: torch.Tensor | None = None


@dataclass
class NoiseDraw:
    """Which response tokens each noisy copy masks, and with what probability."""

    masked: torch.Tensor     # (C, B, L) bool -- True = [MASK] in copy c
    mask_prob: torch.Tensor  # (C, B, L) float -- masking probability of the token's sample in copy c


def mask_probabilities(t: torch.Tensor, eps: float = NOISE_EPS, complementary: bool = False) -> torch.Tensor:
    """t in [0, 1] -> p. Plain: (1 - eps) t + eps; complementary: eps + (1 - 2 eps) t."""
    if complementary:
        return eps + (1.0 - 2.0 * eps) * t
    return (1.0 - eps) * t + eps


def draw_noise(response_mask: torch.Tensor, sample_ids: torch.Tensor, generator: torch.Generator | None = None,
               eps: float = NOISE_EPS, complementary: bool = False, fixed: FixedNoise | None = None) -> NoiseDraw:
    """Draw the masks of one batch.

    response_mask: (B, L) bool, True on response tokens (the only maskable ones).
    sample_ids: (B, L) long, the batch-global sample index of each token (-1 = none).
    fixed: optional per-sample times t (S,) and/or per-token uniforms (B, L) given by hand
    (tests); what it leaves out comes from ``generator``.
    """
    t, uniform = (fixed.t, fixed.uniform) if fixed is not None else (None, None)
    num_samples = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
    if t is None:
        t = torch.rand(num_samples, generator=generator, dtype=torch.float64)  # (S,)
    if uniform is None:
        uniform = torch.rand(response_mask.shape, generator=generator, dtype=torch.float64)  # (B, L)
    p = mask_probabilities(t.to(torch.float64), eps, complementary)  # (S,)
    token_p = p[sample_ids.clamp(min=0)].to(uniform.device)  # (B, L)
    response_mask = response_mask.to(uniform.device)
    masked = (uniform < token_p) & response_mask  # (B, L)
    if not complementary:
        return NoiseDraw(masked[None], token_p[None].float())
    complement = response_mask & ~masked  # exactly the response tokens copy 1 left clean
    return NoiseDraw(torch.stack([masked, complement]), torch.stack([token_p, 1.0 - token_p]).float())


def response_counts(response_mask: torch.Tensor, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(S,) number of response tokens of each sample."""
    ids = sample_ids[response_mask]
    return torch.bincount(ids, minlength=num_samples)[:num_samples]


def nelbo_loss(target_logp: torch.Tensor, mask_prob: torch.Tensor, sample_index: torch.Tensor,
               num_response: torch.Tensor, num_copies: int = 1) -> torch.Tensor:
    """The NELBO from the clean tokens' log-probs at the masked positions only (all copies flattened).

    target_logp, mask_prob, sample_index: (N,) -- log p(x0_i | x_t) of the clean token
    (so its CE is ``-target_logp``), the masking probability of its copy and its
    sample; num_response: (S,).
    loss = mean over samples with responses of
           (1 / num_copies) * sum_copies sum_masked CE / p / n_resp.
    """
    ce = -target_logp.float()  # (N,)
    n_resp = num_response.to(ce.device).clamp(min=1).to(torch.float32)  # (S,)
    weight = 1.0 / (mask_prob.float() * n_resp[sample_index])  # (N,)
    per_sample = torch.zeros_like(n_resp).index_add(0, sample_index, ce * weight)  # (S,)
    num_with_response = int((num_response > 0).sum())
    return per_sample.sum() / (num_copies * max(1, num_with_response))


def sft_nelbo(model, batch: TokenBatch, noise: NoiseDraw, mask_token_id: int,
              attn_impl: str | None = None) -> tuple[torch.Tensor, dict]:
    """One forward of the ``[x_t ; x_0]`` layout and the NELBO of the batch.

    ``batch``: (B, L) fields (doc -1 = padding). Returns ``(loss, stats)`` with stats
    num_masked / num_response.
    """
    input_ids, response_mask, sample_ids = batch.input_ids, batch.response_mask, batch.sample_ids
    device = input_ids.device
    masked, mask_prob = noise.masked.to(device), noise.mask_prob.to(device)  # (C, B, L) each
    num_copies = masked.shape[0]
    arch = model.arch
    inputs = get_layout(arch).sft(arch, input_ids, batch.position_ids, batch.doc_ids, masked, mask_token_id)
    copy_idx, row_idx, col_idx = inputs.masked_at  # (N,) each
    hidden = model(inputs.input_ids, inputs.position_ids, inputs.meta,
                   readout=Readout(inputs.readout_index, hidden=True), attn_impl=attn_impl).hidden  # (N, d)
    target_logp = head_logprobs(model, hidden, input_ids[row_idx, col_idx])  # (N,), chunked: no (N, V)
    num_samples = int(sample_ids.max()) + 1 if sample_ids.numel() else 0
    num_response = response_counts(response_mask, sample_ids, num_samples)  # (S,)
    loss = nelbo_loss(target_logp, mask_prob[copy_idx, row_idx, col_idx], sample_ids[row_idx, col_idx],
                      num_response, num_copies)
    return loss, {"num_masked": int(copy_idx.numel()), "num_response": int(num_response.sum())}
