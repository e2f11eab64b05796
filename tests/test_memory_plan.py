"""The per-rank memory plan (dirl.memory_plan): hand-computed terms, the CPU measurement, the 8B configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dirl import config as config_lib
from dirl.model.sdar.config import SDARConfig, preset_config
from dirl.memory_plan import GB, Workload, decode_rows, fits, plan, rl_workload, sft_workload
from dirl.train.rl.config import RLConfig
from dirl.train.sft.config import SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SDAR_8B = SDARConfig()
# `python -m benchmarks.memory` (BENCHMARKS.md "Memory"): step memory of the chunked head + backward at
# N = 1k..4k scored tokens, V = 151,936, chunk 256, on CPU (max RSS above the pre-step RSS).
MEASURED_HEAD_MB = 526.0


def test_states_and_kv_cache_by_hand():
    params = SDAR_8B.num_parameters()
    out = plan(SDAR_8B, Workload(world=8, precision="bf16-mixed", decode_rows=10, decode_len=1000))
    assert out["states"] == pytest.approx(params * 16 / 8 / GB)  # fp32 master + grad + 2 Adam moments
    assert plan(SDAR_8B, Workload(world=8, precision="bf16"))["states"] == pytest.approx(params * 8 / 8 / GB)
    # 36 layers x (K, V) x 8 KV heads x 128 x 2 B = 144 KiB per token (DESIGN §12)
    assert out["kv_cache"] == pytest.approx(10 * 1000 * 144 * 1024 / GB)


def test_head_term_matches_the_cpu_measurement():
    narrow = preset_config("tiny", vocab_size=151_936)
    for scored in (1024, 4096):
        head_mb = plan(narrow, Workload(world=1, precision="fp32", tokens=scored, scored=scored))["head"] * 1024
        assert head_mb == pytest.approx(MEASURED_HEAD_MB, rel=0.15)
    # unchunked, the head grows with N (the old path): ~1.75 GB per 1k tokens at this vocabulary
    unchunked = plan(narrow, Workload(world=1, precision="fp32", tokens=4096, scored=4096, head_chunk=0))["head"]
    assert unchunked > 8 * MEASURED_HEAD_MB / 1024


def test_checkpointing_cuts_activations_by_about_the_layer_count():
    work = dict(world=8, tokens=16_384, scored=4096)
    with_ckpt = plan(SDAR_8B, Workload(**work, checkpointing=True))["activations"]
    without = plan(SDAR_8B, Workload(**work, checkpointing=False))["activations"]
    assert 5 < without / with_ckpt < SDAR_8B.num_hidden_layers


@pytest.mark.parametrize("max_new_tokens,live_rows", [(2048, 96), (8192, 28)])
def test_the_8b_rl_config_fits_8x80gb(max_new_tokens, live_rows):
    """The KV budget (rollout.native.max_batch_tokens) keeps the rollout phase in the device at 8k too."""
    cfg = config_lib.load(RLConfig, CONFIGS / "sdar-8b-rl.yaml", [])
    work = rl_workload(cfg, world=8, max_new_tokens=max_new_tokens)
    assert decode_rows(work) == live_rows  # 245,760 // (512 + 8192) = 28
    assert fits(SDAR_8B, work, device_gb=80)
    unbudgeted = fits(SDAR_8B, dataclasses.replace(work, decode_tokens=0), device_gb=80, phase="rollout")
    assert unbudgeted == (max_new_tokens == 2048)  # 96 rows at 8k would not fit
    assert cfg.compute.precision == "bf16-mixed" and cfg.compute.activation_checkpointing


@pytest.mark.parametrize("max_length", [2048, 3072, 8192])
def test_the_8b_fsdp_sft_config_fits_8x80gb(max_length):
    cfg = config_lib.load(SFTConfig, CONFIGS / "sdar-8b-sft-fsdp.yaml", [])
    assert fits(SDAR_8B, sft_workload(cfg, world=8, max_length=max_length), device_gb=80)


def test_the_single_gpu_sft_config_needs_an_h200():
    cfg = config_lib.load(SFTConfig, CONFIGS / "sdar-8b-sft.yaml", [])
    peak = plan(SDAR_8B, sft_workload(cfg, world=1))["train_peak"]
    assert 80 < peak < 141  # too big for 80 GB, under an H200's 141 GB (tight: see the config)
