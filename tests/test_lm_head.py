"""The chunked LM head (dirl.model.lm_head): chunked = unchunked, and no (N, V) tensor is kept."""

from __future__ import annotations

import functools

import pytest
import torch

from dirl.algo.nelbo import draw_noise, sft_nelbo
from dirl.model.factory import InitConfig, init_model
from dirl.model.lm_head import full_log_softmax, token_logprobs
from dirl.model.policy import policy_logprobs
from dirl.model.tokenizer import char_tokenizer
from dirl.train.sft.data import collate, tokenize_example

NUM_ROWS, DIM, VOCAB = 37, 8, 50

LOGP_FNS = {
    "full": full_log_softmax,
    "policy": functools.partial(policy_logprobs, temperature=0.7, top_k=20, top_p=0.9, mask_token_id=3),
}


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(NUM_ROWS, DIM, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, DIM, generator=gen, requires_grad=True)
    targets = torch.randint(4, VOCAB, (NUM_ROWS,), generator=gen)
    return hidden, weight, targets


def _values_and_grads(chunk_size: int, logp_fn, seed: int = 0):
    hidden, weight, targets = _inputs(seed)
    logp, entropy = token_logprobs(hidden, weight, targets, logp_fn, chunk_size, with_entropy=True)
    # A non-uniform upstream gradient, so every row's weight in the backward matters.
    (logp * torch.linspace(-1.0, 2.0, NUM_ROWS)).sum().backward()
    return logp.detach(), entropy, hidden.grad, weight.grad


@pytest.mark.parametrize("name", sorted(LOGP_FNS))
@pytest.mark.parametrize("chunk_size", [1, 5, 16, NUM_ROWS, 100])
def test_chunked_equals_unchunked(name, chunk_size):
    ref = _values_and_grads(0, LOGP_FNS[name])
    got = _values_and_grads(chunk_size, LOGP_FNS[name])
    # Relative as well as absolute: a one-row chunk runs a different matmul kernel than a full one,
    # and log-probs near -15 differ by a few fp32 ulps (~1e-6 each) from the summation order alone.
    for label, a, b, tol in zip(("logp", "entropy", "d hidden", "d weight"), got, ref, (1e-6, 1e-6, 1e-5, 1e-5)):
        assert torch.allclose(a, b, atol=tol, rtol=tol), (label, (a - b).abs().max())
    assert ref[0].dtype == torch.float32 and not got[1].requires_grad


def _largest_saved(chunk_size: int) -> int:
    """Numel of the largest tensor autograd keeps for backward."""
    largest = 0

    def pack(tensor):
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    hidden, weight, targets = _inputs()
    hidden = hidden * 1.0  # a non-leaf, like the backbone's output
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden, weight, targets, full_log_softmax, chunk_size).sum().backward()
    return largest


def test_no_num_rows_by_vocab_tensor_is_kept_for_backward():
    assert _largest_saved(0) >= NUM_ROWS * VOCAB  # the reference path keeps the logits
    assert _largest_saved(8) <= VOCAB * DIM < NUM_ROWS * VOCAB  # chunked: only h, W (and a chunk in backward)


def test_chunked_head_under_bf16_autocast_matches_unchunked():
    """The recompute replays the forward's autocast state, so bf16 values and grads agree."""
    results = []
    for chunk_size in (0, 8):
        hidden, weight, targets = _inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = token_logprobs(hidden, weight, targets, full_log_softmax, chunk_size)
        logp.sum().backward()
        results.append((logp.detach(), hidden.grad, weight.grad))
    assert results[0][0].dtype == torch.float32
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)


def test_sft_nelbo_chunked_equals_unchunked():
    tokenizer = char_tokenizer()
    model = init_model(InitConfig(preset="tiny", seed=0), tokenizer)
    examples = [[tokenize_example([{"role": "user", "content": f"{a}+{a}="},
                                   {"role": "assistant", "content": f"{2 * a}"}], tokenizer, 4)]
                for a in (12, 345, 6789)]
    batch = collate(examples, tokenizer.pad_token_id)
    noise = draw_noise(batch.response_mask, batch.sample_ids, torch.Generator().manual_seed(0), complementary=True)
    out = []
    for chunk_size in (0, 3):
        model.head_chunk_size = chunk_size
        model.zero_grad()
        loss, _ = sft_nelbo(model, batch, noise, tokenizer.mask_token_id)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert abs(float(out[0][0] - out[1][0])) <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(out[0][1], out[1][1])) <= 1e-5
