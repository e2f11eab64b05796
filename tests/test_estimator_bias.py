"""``python -m benchmarks.estimator_bias``: its statistics on hand-made draws, and its --quick run."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import estimator_bias as bias
from dirl.algo.likelihood import ESTIMATORS, MC_SAMPLING

LINE = re.compile(r"^(\w+)\[(.+)\]=(\S+)$")


def _stats(g_star, draws, num_batches):
    stats = bias.DrawStats(torch.tensor(g_star, dtype=torch.float64), len(draws), num_batches)
    for draw in draws:
        stats.add(torch.tensor(draw, dtype=torch.float64))
    return stats.summary()


def test_draw_stats_by_hand():
    # mean [1, 0] = g*: no bias; E||g - mean||^2 = 1 per draw, x M/(M-1) = 4/3 unbiased
    out = _stats([1.0, 0.0], [[1, 1], [1, -1], [1, 1], [1, -1]], 2)
    assert out["rel_bias"] == pytest.approx(0.0) and out["cosine"] == pytest.approx(1.0)
    assert out["rel_var"] == pytest.approx(4 / 3)
    # each batch's mean is g* too: leaving one out changes nothing -> zero jackknife SE of the bias
    assert out["rel_bias_se"] == pytest.approx(0.0) and out["noise_floor"] == pytest.approx((4 / 3 / 4) ** 0.5)
    # a constant draw 2 g*: relative bias 1, cosine 1, no variance
    out = _stats([1.0, 0.0], [[2, 0]] * 4, 2)
    assert (out["rel_bias"], out["cosine"], out["rel_var"]) == pytest.approx((1.0, 1.0, 0.0))
    # two batches with different means, [0, 0] | [2, 0], g* = [1, 0]: both leave-one-out biases are 1
    # (SE 0), the leave-one-out cosines 1 ([2, 0]) and 0 ([0, 0], zero norm) -> SE sqrt(1/2 * 2 * 0.25)
    out = _stats([1.0, 0.0], [[0, 0], [0, 0], [2, 0], [2, 0]], 2)
    assert out["rel_bias"] == pytest.approx(0.0) and out["rel_bias_se"] == pytest.approx(0.0)
    assert out["cosine_se"] == pytest.approx(0.5)


def test_split_half_z_detects_a_bias():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 50, generator=gen, dtype=torch.float64)
    g_star = torch.zeros(50, dtype=torch.float64)
    g_star[0] = 1.0
    for shift, biased in ((0.0, False), (1.0, True)):
        stats = bias.DrawStats(g_star, 200, 10)
        for row in noise:
            stats.add(g_star + row + shift * torch.eye(50, dtype=torch.float64)[1])
        z = stats.summary()["bias_z"]
        assert (abs(z) > 3) == biased, (shift, z)


def _parse(text: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            out.setdefault(match[1], {})[match[2]] = float(match[3])
    return out


def test_quick_run_parses_and_the_exact_estimator_is_unbiased(capsys):
    bias.main(["--quick"])
    stats = _parse(capsys.readouterr().out)
    rows = set(stats["rel_bias"])
    assert {re.sub(r"\[.*\]$", "", row) for row in rows} == set(ESTIMATORS)  # every registered estimator
    assert stats["rel_bias"]["trace"] < 1e-5 and stats["rel_var"]["trace"] == 0.0
    assert stats["draws"]["trace"] == 1 and stats["draws"]["random_mask"] == 4  # deterministic ones: one draw
    for key in ("cosine", "rel_var", "rel_bias_se", "noise_floor", "bias_z"):
        assert set(stats[key]) == rows
    assert stats["rel_bias"]["mean_field"] > 0.1  # a different objective: visibly biased
    assert {f"trace_mc[{mode}]" for mode in MC_SAMPLING} <= rows  # a row per sampling mode


def test_trace_mc_with_every_step_drawn_is_exact(capsys):
    """mc_steps >= the steps of every response: one stratum per step, weight 1 -- the trace gradient
    through the importance-weighted path (and the token_mean normaliser equals the constant one)."""
    labels = ["trace_mc[stratified]", "trace_mc[uniform]"]  # systematic points (j + u) / T: each step once
    results = bias.main(["--quick", "--mc-steps", "1000", "--estimators", ",".join(["trace", *labels]),
                         "--agg", "token_mean"])
    capsys.readouterr()
    for label in labels:
        assert results[label]["rel_bias"] < 1e-5 and results[label]["draws"] == 1, label
