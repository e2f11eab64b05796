"""The blockwise NELBO (dirl.algo.nelbo): hand-computed values, masks, layout."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dirl.algo.nelbo import (FixedNoise, NoiseDraw, TokenBatch, draw_noise, mask_probabilities, nelbo_loss,
                             response_counts, sft_nelbo)
from dirl.model.forward import ForwardOutput, Readout
from dirl.model.layout.block_causal import multi_copy_meta
from dirl.model.masks import dense_mask
from dirl.train.sft.data import collate, tokenize_example

MASK_ID = 99
EPS = 1e-3


class LogitsTable(torch.nn.Module):
    """A stand-in model: the logits of a token are a fixed row chosen by its position
    (its hidden state is that row and its LM head the identity)."""

    def __init__(self, table: torch.Tensor, block_size: int = 4):
        super().__init__()
        self.table = table  # (L, V)
        self.arch = SimpleNamespace(attention="block_causal", logit_shift=0, block_size=block_size)
        self.lm_head = torch.nn.Linear(table.shape[1], table.shape[1], bias=False)
        torch.nn.init.eye_(self.lm_head.weight)
        self.seen_input_ids = None

    def forward(self, input_ids, position_ids, meta, readout=Readout(), attn_impl=None):
        self.seen_input_ids = input_ids
        per_token = self.table[position_ids.reshape(-1)][readout.index]  # (N, V)
        return ForwardOutput(None, per_token) if readout.hidden else ForwardOutput(per_token)


def _ce(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(x) for x in row)) - row[target]


# A 1-sequence toy batch: 3 prompt tokens, 5 response tokens, vocabulary of 3.
TOY_IDS = [1, 2, 0, 2, 1, 0, 0, 2]
PROMPT_LEN = 3
TOY_LOGITS = [[0.5, -1.0, 2.0], [1.0, 0.0, -1.0], [0.2, 0.3, 0.1], [2.0, 1.0, 0.0],
              [-0.5, 0.5, 1.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0], [0.3, -0.7, 0.9]]
# Uniforms below p=~0.5 at positions 3 and 5 only: those two are masked in copy 1.
TOY_UNIFORM = [0.1, 0.1, 0.1, 0.2, 0.9, 0.3, 0.8, 0.7]


def _toy_inputs():
    ids = torch.tensor([TOY_IDS])
    length = ids.shape[1]
    response = torch.zeros(1, length, dtype=torch.bool)
    response[0, PROMPT_LEN:] = True
    return ids, torch.arange(length)[None], torch.zeros(1, length, dtype=torch.long), response, \
        torch.zeros(1, length, dtype=torch.long)


@pytest.mark.parametrize("complementary", [False, True])
def test_loss_matches_hand_computed_value(complementary):
    ids, positions, docs, response, samples = _toy_inputs()
    t = torch.tensor([0.5], dtype=torch.float64)
    noise = draw_noise(response, samples, complementary=complementary,
                       fixed=FixedNoise(t, torch.tensor([TOY_UNIFORM], dtype=torch.float64)))
    model = LogitsTable(torch.tensor(TOY_LOGITS))
    loss, stats = sft_nelbo(model, TokenBatch(ids, positions, docs, response, samples), noise, MASK_ID)

    p = (1 - 2 * EPS) * 0.5 + EPS if complementary else (1 - EPS) * 0.5 + EPS
    copy1 = sum(_ce(TOY_LOGITS[i], TOY_IDS[i]) for i in (3, 5)) / p
    if complementary:
        copy2 = sum(_ce(TOY_LOGITS[i], TOY_IDS[i]) for i in (4, 6, 7)) / (1 - p)
        expected = 0.5 * (copy1 + copy2) / 5
    else:
        expected = copy1 / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats == {"num_masked": 5 if complementary else 2, "num_response": 5}
    # The model saw [MASK] exactly at the masked noisy positions and the clean x0 last.
    seen = model.seen_input_ids[0].tolist()
    assert seen[:8] == [1, 2, 0, MASK_ID, 1, MASK_ID, 0, 2]
    assert seen[-8:] == TOY_IDS
    if complementary:
        assert seen[8:16] == [1, 2, 0, 2, MASK_ID, 0, MASK_ID, MASK_ID]


def test_mask_probability_range():
    t = torch.tensor([0.0, 1.0])
    assert mask_probabilities(t).tolist() == pytest.approx([EPS, 1.0])
    assert mask_probabilities(t, complementary=True).tolist() == pytest.approx([EPS, 1 - EPS])


def _random_batch(batch=6, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, 10, (batch,), generator=gen)
    valid_lens = torch.randint(12, length + 1, (batch,), generator=gen)
    cols = torch.arange(length)[None]
    response = (cols >= prompt_lens[:, None]) & (cols < valid_lens[:, None])
    samples = torch.where(cols < valid_lens[:, None], torch.arange(batch)[:, None], -1)
    return response, samples


def test_complementary_masks_cover_every_response_token_exactly_once():
    response, samples = _random_batch()
    for seed in range(20):
        noise = draw_noise(response, samples, torch.Generator().manual_seed(seed), complementary=True)
        first, second = noise.masked
        assert torch.equal(first ^ second, response)
        assert not (first & second).any()
        # each copy is weighted by its own masking probability
        assert torch.allclose(noise.mask_prob[0] + noise.mask_prob[1], torch.ones_like(noise.mask_prob[0]))


def test_prompt_and_padding_tokens_are_never_masked():
    response, samples = _random_batch()
    # t = 1 gives p = 1: every response token is masked, and nothing else.
    all_masked = draw_noise(response, samples, fixed=FixedNoise(t=torch.ones(6, dtype=torch.float64)))
    assert torch.equal(all_masked.masked[0], response)
    for seed in range(20):
        noise = draw_noise(response, samples, torch.Generator().manual_seed(seed), complementary=seed % 2 == 0)
        assert not (noise.masked & ~response).any()


def test_padding_eos_tokens_are_labelled_response(tokenizer):
    messages = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "#### 3"}]
    example = tokenize_example(messages, tokenizer, block_size=4)
    eos = tokenizer.eos_token_id
    assert len(example.input_ids) % 4 == 0
    response = example.input_ids[example.prompt_len:]
    text_ids = tokenizer.encode("#### 3")
    assert response[:len(text_ids)] == text_ids
    padding = response[len(text_ids):]
    assert padding and set(padding) == {eos}  # at least the real EOS, then EOS up to the block end
    batch = collate([[example]], pad_id=eos, row_length=len(example.input_ids) + 8)
    # every EOS of the example is a labelled response token; the row padding is not
    assert batch.response_mask[0, example.prompt_len:len(example.input_ids)].all()
    assert not batch.response_mask[0, len(example.input_ids):].any()
    noise = draw_noise(batch.response_mask, batch.sample_ids,
                       fixed=FixedNoise(t=torch.ones(1, dtype=torch.float64)))
    masked_targets = batch.input_ids[noise.masked[0]].tolist()
    assert masked_targets.count(eos) == len(padding)


def test_nelbo_is_unbiased_for_constant_cross_entropy():
    """With CE = c on every token, E[sum_masked c / p] / n = c for either scheme."""
    num_samples, length, vocab = 4000, 8, 5
    response = torch.ones(num_samples, length, dtype=torch.bool)
    samples = torch.arange(num_samples)[:, None].expand(-1, length)
    counts = response_counts(response, samples, num_samples)
    c = math.log(vocab)  # uniform logits
    for complementary in (False, True):
        noise = draw_noise(response, samples, torch.Generator().manual_seed(1), complementary=complementary)
        copy_idx, row_idx, _ = noise.masked.nonzero(as_tuple=True)
        target_logp = torch.full((len(row_idx),), -c)  # uniform logits: log p = -log V
        loss = nelbo_loss(target_logp, noise.mask_prob[noise.masked], row_idx, counts,
                          num_copies=noise.masked.shape[0])
        assert loss.item() == pytest.approx(c, rel=0.05)


def test_copies_never_see_each_other_and_clean_never_sees_noisy():
    positions = torch.arange(8)[None]
    meta = multi_copy_meta(positions, 4, torch.zeros_like(positions), num_copies=2)
    mask = dense_mask(meta, meta)[0, 0]  # (24, 24)
    copy1, copy2, clean = slice(0, 8), slice(8, 16), slice(16, 24)
    assert not mask[copy1, copy2].any() and not mask[copy2, copy1].any()
    assert not mask[clean, copy1].any() and not mask[clean, copy2].any()
    # noisy block 1 sees clean block 0 but not clean block 1; bidirectional inside itself
    assert mask[copy2][4:8, 16:20].all() and not mask[copy2][4:8, 20:24].any()
    assert mask[copy2][4:8, 12:16].all()


def test_packed_loss_equals_mean_of_separate_losses(tiny_model, tokenizer):
    """Block-diagonal packing: each example's loss is what it would be alone."""
    examples = [tokenize_example([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                 tokenizer, 4) for q, a in [("12+5=", "#### 17"), ("3*4=", "3*4=12\n#### 12")]]
    packed = collate([examples], tokenizer.pad_token_id, row_length=64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    uniform = torch.rand(packed.input_ids.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = draw_noise(packed.response_mask, packed.sample_ids, fixed=FixedNoise(t, uniform))
    with torch.no_grad():
        loss_packed, _ = sft_nelbo(tiny_model, packed, noise, tokenizer.mask_token_id)
        separate, start = [], 0
        for i, example in enumerate(examples):
            single = collate([[example]], tokenizer.pad_token_id)
            n = len(example.input_ids)
            one = NoiseDraw(noise.masked[:, :, start:start + n], noise.mask_prob[:, :, start:start + n])
            loss, _ = sft_nelbo(tiny_model, single, one, tokenizer.mask_token_id)
            separate.append(loss.item())
            start += n
    assert loss_packed.item() == pytest.approx(sum(separate) / 2, rel=1e-5)


def test_gradient_flows_and_empty_mask_is_zero(tiny_model, tokenizer):
    example = tokenize_example([{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}],
                               tokenizer, 4)
    batch = collate([[example]], tokenizer.pad_token_id)
    empty = draw_noise(batch.response_mask, batch.sample_ids,
                       fixed=FixedNoise(uniform=torch.ones(batch.input_ids.shape, dtype=torch.float64)))
    loss, stats = sft_nelbo(tiny_model, batch, empty, tokenizer.mask_token_id)
    assert stats["num_masked"] == 0 and loss.item() == 0.0
    full = draw_noise(batch.response_mask, batch.sample_ids,
                      fixed=FixedNoise(t=torch.ones(1, dtype=torch.float64)))
    loss, _ = sft_nelbo(tiny_model, batch, full, tokenizer.mask_token_id)
    loss.backward()
    assert tiny_model.lm_head.weight.grad is not None and tiny_model.lm_head.weight.grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)
