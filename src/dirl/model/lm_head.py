"""The memory-bounded LM head: per-token log-probs without an (N, V) tensor (DESIGN §12).

At SDAR-8B's vocabulary (V = 151,936) the logits of N scored positions cost
N x V x 4 bytes in fp32 (2.3 MB a token) -- and the log-softmax, its backward and
the policy's temperature / top-k / top-p each add one more such tensor. Every loss
that needs log-probs (the SFT NELBO, DiPO's policy / old / reference log-probs, the
entropy, eval) goes through :func:`token_logprobs` instead, which walks the scored
rows in chunks of ``chunk_size``:

    forward:  for each chunk  logits = h W^T -> logp_fn(logits) -> gather the target's value
    backward: for each chunk  recompute that chunk's logits and log-probs, backprop
              the chunk's incoming gradient into h and W, free the chunk

so at most one chunk's (chunk_size, V) activations exist at once, in forward and
in backward. Exact: the per-row values are the same operations as the unchunked
head, and the gradients differ only by the summation order of W's gradient over
chunks (``tests/test_lm_head.py``: fp32 values <= 1e-6, gradients <= 1e-5).

``logp_fn`` maps a chunk's logits (n, V) to log-probs (n, V) in fp32: plain
:func:`full_log_softmax` for the NELBO, the sampler's policy distribution
(:func:`dirl.model.policy.policy_logprobs`) for RL. Under autocast the matmul runs
in the compute dtype (bf16) and ``logp_fn`` upcasts, in forward and in the
recomputation alike (the autocast state is replayed in backward).
Departure from DiRL / DARE: they ship fused Triton kernels for the same job; this
is plain PyTorch, so it runs on CPU and is exact, at the cost of one extra
head matmul per chunk in backward.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 256  # rows per chunk: 256 x 151,936 x 4 B = 156 MB per fp32 (chunk, V) tensor

LogpFn = Callable[[torch.Tensor], torch.Tensor]


def full_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """The model's own distribution over the whole vocabulary, fp32 (the NELBO's)."""
    return torch.log_softmax(logits.float(), dim=-1)


def _chunk_values(hidden, weight, targets, logp_fn: LogpFn, with_entropy: bool):
    """(n, d), (V, d), (n,) -> target log-probs (n,) [, entropies (n,)] of one chunk."""
    if logp_fn is full_log_softmax and not with_entropy and not torch.is_grad_enabled():
        logits = F.linear(hidden, weight).float()  # (n, V): the one (n, V) tensor, reused in place
        target = logits.gather(-1, targets[:, None]).squeeze(-1)
        top = logits.amax(-1)
        return target - top - logits.sub_(top[:, None]).exp_().sum(-1).log(), None
    logp_all = logp_fn(F.linear(hidden, weight))  # (n, V) fp32
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    if not with_entropy:
        return logp, None
    probs = logp_all.exp()
    entropy = -(probs * logp_all.masked_fill(probs == 0, 0)).sum(-1)  # (n,); 0 * -inf counts as 0
    return logp, entropy


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _ChunkPlan(NamedTuple):
    """The non-tensor inputs of :class:`_ChunkedLogprobs`, as one argument: ``forward``'s
    ``ctx`` is dictated by torch, and this keeps it within six parameters (and backward
    returns one ``None`` for the three settings)."""

    logp_fn: LogpFn
    chunk_size: int
    with_entropy: bool


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward in chunks, keep only (h, W, targets); backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, plan: _ChunkPlan):
        logp_fn, chunk_size, with_entropy = plan
        device_type = hidden.device.type
        ctx.autocast = _autocast_state(device_type)
        logps, entropies = [], []
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logp, entropy = _chunk_values(hidden[start:end], weight, targets[start:end], logp_fn, with_entropy)
            logps.append(logp)
            if with_entropy:
                entropies.append(entropy)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.logp_fn, ctx.chunk_size = logp_fn, chunk_size
        logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat(entropies) if entropies else logp.new_zeros(0)
        ctx.mark_non_differentiable(entropy)  # a diagnostic: RL logs it, nothing backprops it
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        enabled, dtype = ctx.autocast
        if ctx.logp_fn is full_log_softmax:
            _softmax_backward(hidden, weight, targets, grad_logp, ctx.chunk_size, dtype if enabled else None,
                              grad_hidden, grad_weight)
            return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            # cache_enabled=False: each chunk's ``w`` is a new leaf, whose cast autocast would
            # otherwise keep until the step's outer autocast exits -- one (V, d) copy per chunk.
            with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled,
                                                     cache_enabled=False):
                h = hidden[start:end].detach().requires_grad_(want_hidden)
                w = weight.detach().requires_grad_(want_weight)
                logp, _ = _chunk_values(h, w, targets[start:end], ctx.logp_fn, False)
                inputs = [t for t, want in ((h, want_hidden), (w, want_weight)) if want]
                grads = list(torch.autograd.grad(logp, inputs, grad_logp[start:end]))
            if want_hidden:
                grad_hidden[start:end] = grads.pop(0)
            if want_weight:
                grad_weight += grads.pop(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


@torch.no_grad()
def _softmax_backward(hidden, weight, targets, grad_logp, chunk_size: int, cast: torch.dtype | None,
                      grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """The NELBO's chunked backward by hand, into ``grad_hidden`` / ``grad_weight`` (in place).

    d logp_t / d logits = onehot(t) - softmax(logits), so a chunk's logits gradient is
    ``g * (onehot - p)``: computed in place over the chunk's fp32 logits, it holds one
    (chunk, V) fp32 tensor (and its compute-dtype cast for the matmuls) where autograd
    through log-softmax and gather holds ~3.5. ``cast``: the autocast dtype the forward's
    matmul ran in (the weight cast once, as autocast's cache would), None without autocast."""
    w = weight.to(cast) if cast is not None else weight
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        h = hidden[start:end].to(cast) if cast is not None else hidden[start:end]
        logits = F.linear(h, w).float()  # (n, V), then in place: p, then the gradient
        probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        probs /= probs.sum(-1, keepdim=True)
        g = grad_logp[start:end, None].float()  # (n, 1)
        grad = probs.mul_(-g).scatter_add_(1, targets[start:end, None], g)  # g * (onehot - p)
        del logits, probs
        grad = grad.to(w.dtype)
        if grad_hidden is not None:
            grad_hidden[start:end] = (grad @ w).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight += (grad.T @ h).float()
        del grad  # before the next chunk's logits


def _unchunked(hidden, weight, targets, logp_fn: LogpFn, with_entropy: bool):
    """The reference path (``chunk_size <= 0``): one (N, V) logits tensor, kept by autograd."""
    logp_all = logp_fn(F.linear(hidden, weight))  # (N, V) fp32
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp
    with torch.no_grad():
        probs = logp_all.exp()
        entropy = -(probs * logp_all.masked_fill(probs == 0, 0)).sum(-1)
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   logp_fn: LogpFn = full_log_softmax, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   with_entropy: bool = False):
    """Log-prob of each target under ``logp_fn(hidden @ weight.T)``, chunked.

    hidden: (N, d) final-norm hidden states at the scored positions; weight: (V, d)
    the LM head; targets: (N,) -> logp (N,) fp32, differentiable in hidden and weight
    [, entropy (N,) fp32, not differentiable]. ``chunk_size <= 0``: the unchunked
    reference path, materialising the (N, V) logits (the old behaviour; tests and
    ``python -m benchmarks.memory`` compare against it).
    """
    if chunk_size <= 0:
        return _unchunked(hidden, weight, targets, logp_fn, with_entropy)
    logp, entropy = _ChunkedLogprobs.apply(hidden, weight, targets, _ChunkPlan(logp_fn, chunk_size, with_entropy))
    return (logp, entropy) if with_entropy else logp


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, logp_fn: LogpFn = full_log_softmax,
                  with_entropy: bool = False):
    """:func:`token_logprobs` through ``model``'s LM head at its ``head_chunk_size``.

    hidden: (N, d) from ``model(..., readout=Readout(index, hidden=True)).hidden``.
    Under FSDP2 the root's parameters (the head among them) stay unsharded after the
    forward (``dist.wrap``), so the head weight read here is the full one.
    """
    chunk_size = getattr(model, "head_chunk_size", DEFAULT_CHUNK_SIZE)
    return token_logprobs(hidden, model.lm_head.weight, targets, logp_fn, chunk_size, with_entropy)
