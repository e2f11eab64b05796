"""The unmasking rules and the inverse-CDF sampler, on hand-made confidences and uniforms."""

from __future__ import annotations

import math

import pytest
import torch

from dirl.engine.unmask import UNMASKING, sample_from_logprobs, select_commits

CONF = torch.tensor([[0.95, 0.20, 0.91, 0.50],    # two above 0.9
                     [0.10, 0.30, 0.20, 0.40],    # none above 0.9: the most confident only
                     [0.99, 0.99, 0.99, 0.99]])   # all confident, but offsets 0-1 already committed
MASKED = torch.tensor([[True, True, True, True],
                       [True, True, True, False],
                       [False, False, True, True]])


def test_dynamic_commits_everything_above_threshold_and_at_least_one():
    commit = select_commits(CONF, MASKED, "dynamic", threshold=0.9, block_size=4)
    assert commit.tolist() == [[True, False, True, False],
                               [False, True, False, False],   # 0.40 is not masked: 0.30 is the best masked
                               [False, False, True, True]]


def test_static_commits_ceil_b_over_steps_most_confident():
    commit = select_commits(CONF, MASKED, "static", steps_per_block=2, block_size=4)  # k = 2
    assert commit.tolist() == [[True, False, True, False],
                               [False, True, True, False],
                               [False, False, True, True]]
    one_step = select_commits(CONF, MASKED, "static", steps_per_block=1, block_size=4)  # k = 4
    assert torch.equal(one_step, MASKED)
    three = select_commits(CONF, MASKED, "static", steps_per_block=3, block_size=4)  # k = ceil(4/3) = 2
    assert three.sum(-1).tolist() == [2, 2, 2]


def test_sequential_commits_the_leftmost_masked_position():
    commit = select_commits(CONF, MASKED, "sequential", block_size=4)
    assert commit.tolist() == [[True, False, False, False],
                               [True, False, False, False],
                               [False, False, True, False]]


@pytest.mark.parametrize("strategy", UNMASKING)
def test_rows_with_nothing_masked_commit_nothing(strategy):
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    assert not select_commits(torch.rand(2, 4), nothing, strategy, block_size=4).any()


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="unknown unmasking strategy 'random'"):
        select_commits(CONF, MASKED, "random")


def test_inverse_cdf_sampling_by_hand():
    # p = [0.1, 0.2, 0.3, 0.4] -> CDF [0.1, 0.3, 0.6, 1.0]
    logp = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(5, 4)
    uniforms = torch.tensor([0.05, 0.15, 0.35, 0.59, 0.99])
    assert sample_from_logprobs(logp, uniforms, greedy=False).tolist() == [0, 1, 2, 2, 3]
    assert sample_from_logprobs(logp, uniforms, greedy=True).tolist() == [3, 3, 3, 3, 3]


def test_zero_probability_tokens_are_never_drawn():
    logp = torch.tensor([[-math.inf, 0.5, -math.inf, 0.5]]).log_softmax(-1).expand(200, 4)
    draws = sample_from_logprobs(logp, torch.rand(200, generator=torch.Generator().manual_seed(0)), greedy=False)
    assert set(draws.tolist()) == {1, 3}
    # a CDF that ends slightly below 1 (float error) still maps u close to 1 to a real token
    assert sample_from_logprobs(logp[:1], torch.tensor([0.999999]), greedy=False).item() == 3
