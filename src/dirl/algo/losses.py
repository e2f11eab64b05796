"""The DiPO / GRPO surrogate loss: clipped ratios, k3 KL, one aggregation function.

Per scored token i of sequence s (DESIGN §7):
    ratio_i = exp(logp_new_i - logp_old_i)
    surr_i  = min(ratio_i * A_s, clip(ratio_i, 1 - eps_low, 1 + eps_high) * A_s)
    kl_i    = exp(ref_i - new_i) - (ref_i - new_i) - 1          (k3, Schulman 2020)
    loss_i  = w_i * (-surr_i + beta * kl_i)
``w_i`` is the estimator's importance weight (1 for exact DiPO; the stratum
size for the Monte-Carlo estimator, keeping it unbiased). The clip range is
asymmetric (DAPO's clip-higher) with defaults 0.2 / 0.28.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")


def aggregate(token_loss: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, mode: str,
              seq_lengths: torch.Tensor | None = None, constant: float | None = None) -> torch.Tensor:
    """Reduce per-token losses (N,) to a scalar.

    * ``token_mean`` (DAPO): sum / number of completion tokens (``seq_lengths.sum()``;
      without ``seq_lengths``, the number of scored entries). Every token weighs the
      same, so long responses weigh more; the normaliser depends on the batch's
      total length, a (mild) bias across batches. An estimator that scores a sample
      of the states with importance weights (``trace_mc``, ``random_mask``) is thereby
      an unbiased estimate of ``trace``'s loss; dividing by its own scored count would
      scale it up by ~T/k (measured 4-10x, BENCHMARKS "Estimator bias").
    * ``seq_mean_token_mean`` (original GRPO): mean over sequences of the mean over
      its tokens. Biased towards short responses: a short wrong answer is
      penalised more per token than a long wrong one (Dr. GRPO's length bias).
    * ``constant`` (Dr. GRPO): sum / (num_seqs * constant) with a fixed constant
      (e.g. max_new_tokens): the gradient of the plain sum objective, no length bias.
    ``seq_lengths`` (num_seqs,): tokens per sequence for ``seq_mean_token_mean``
    (defaults to the count of scored tokens).
    """
    if mode == "token_mean":
        count = token_loss.numel() if seq_lengths is None else int(seq_lengths.sum())
        return token_loss.sum() / max(count, 1)
    if mode == "seq_mean_token_mean":
        if seq_lengths is None:
            seq_lengths = torch.bincount(seq_index, minlength=num_seqs)
        per_seq = torch.zeros(num_seqs, dtype=token_loss.dtype, device=token_loss.device)
        per_seq = per_seq.index_add(0, seq_index, token_loss)
        return (per_seq / seq_lengths.clamp_min(1).to(token_loss.dtype)).mean()
    if mode == "constant":
        if not constant:
            raise ValueError("aggregation 'constant' needs a positive constant (e.g. max_new_tokens)")
        return token_loss.sum() / (num_seqs * constant)
    raise ValueError(f"unknown aggregation {mode!r}; choose from {AGGREGATIONS}")


@dataclass
class LossConfig:
    """The surrogate's settings (``AlgoConfig`` extends this, so YAML keys stay ``algo.clip_low`` ...)."""

    clip_low: float = 0.2             # eps_low: the ratio is clipped at 1 - clip_low (A < 0)
    clip_high: float = 0.28           # eps_high: ... at 1 + clip_high (A > 0); DAPO's clip-higher
    beta: float = 0.0                 # k3 KL coefficient to the frozen reference (0 = no reference)
    agg: str = "token_mean"           # token_mean | seq_mean_token_mean | constant


@dataclass
class ScoredTokens:
    """The N scored tokens of a batch of S sequences: every tensor is (N,) unless noted."""

    logp_new: torch.Tensor
    logp_old: torch.Tensor
    adv: torch.Tensor                          # its sequence's advantage
    seq_index: torch.Tensor                    # which sequence, in [0, num_seqs)
    num_seqs: int
    weight: torch.Tensor | None = None         # the estimator's importance weight (None = 1)
    logp_ref: torch.Tensor | None = None       # frozen reference (beta > 0)
    seq_lengths: torch.Tensor | None = None    # (S,) completion tokens per sequence


@dataclass
class LossStats:
    kl: float
    clipped_low_frac: float   # fraction of tokens clipped at 1 - clip_low (A < 0)
    clipped_high_frac: float  # fraction of tokens clipped at 1 + clip_high (A > 0)
    ratio_mean: float


def dipo_loss(tokens: ScoredTokens, cfg: LossConfig, constant: float | None = None):
    """The surrogate of the module docstring over ``tokens``. -> (loss, LossStats).

    ``constant``: the ``constant`` aggregation's normaliser (the rollouts' max_new_tokens)."""
    adv, logp_new = tokens.adv, tokens.logp_new
    ratio = torch.exp(logp_new - tokens.logp_old)
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    surr = torch.minimum(ratio * adv, clipped * adv)
    token_loss = -surr
    kl = torch.zeros_like(logp_new)
    if tokens.logp_ref is not None and cfg.beta > 0:
        log_ratio_ref = tokens.logp_ref - logp_new
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
        token_loss = token_loss + cfg.beta * kl
    if tokens.weight is not None:
        token_loss = token_loss * tokens.weight
    loss = aggregate(token_loss, tokens.seq_index, tokens.num_seqs, cfg.agg, tokens.seq_lengths, constant)
    with torch.no_grad():
        n = max(ratio.numel(), 1)
        stats = LossStats(
            kl=float(kl.sum() / n),
            clipped_low_frac=float(((ratio < 1 - cfg.clip_low) & (adv < 0)).sum() / n),
            clipped_high_frac=float(((ratio > 1 + cfg.clip_high) & (adv > 0)).sum() / n),
            ratio_mean=float(ratio.mean()) if ratio.numel() else 1.0,
        )
    return loss, stats
