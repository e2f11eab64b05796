"""The per-rank memory plan (dirl.memory_plan): hand-computed terms, the CPU measurement, the 8B configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dirl import config as config_lib
from dirl.model.sdar.config import SDARConfig, preset_config
from dirl.cli import main as cli_main
from dirl.commands.plan import model_config
from dirl.memory_plan import GB, SFT_HEAD_TENSORS, Workload, decode_rows, fits, plan, rl_workload, sft_workload
from dirl.train.rl.config import RLConfig
from dirl.train.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# the real SDAR-8B-Chat config.json (../shared beside the checkout, or above a worktree)
SDAR_DIR = next((p / "shared" / "sdar-8b-chat" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "sdar-8b-chat" / "config.json").is_file()), None)
needs_sdar = pytest.mark.skipif(SDAR_DIR is None, reason="../shared/sdar-8b-chat not available")
SDAR_8B = SDARConfig()
# `python -m benchmarks.memory` (BENCHMARKS.md "Memory"): step memory of the chunked head + backward at
# N = 1k..4k scored tokens, V = 151,936, chunk 256, on CPU (max RSS above the pre-step RSS):
# 526 MB through autograd (RL's policy distribution), 232 MB by the NELBO's own backward.
MEASURED_HEAD_MB = 526.0
MEASURED_SFT_HEAD_MB = 232.0


def test_states_and_kv_cache_by_hand():
    params = SDAR_8B.num_parameters()
    out = plan(SDAR_8B, Workload(world=8, precision="bf16-mixed", decode_rows=10, decode_len=1000))
    assert out["states"] == pytest.approx(params * 16 / 8 / GB)  # fp32 master + grad + 2 Adam moments
    assert plan(SDAR_8B, Workload(world=8, precision="bf16"))["states"] == pytest.approx(params * 8 / 8 / GB)
    # 36 layers x (K, V) x 8 KV heads x 128 x 2 B = 144 KiB per token (DESIGN §12), plus a block of fp32 logits
    assert out["kv_cache"] == pytest.approx(10 * (1000 * 144 * 1024 + 4 * SDAR_8B.vocab_size * 4) / GB)
    assert plan(SDAR_8B, Workload(world=8, strategy="ddp"))["states"] == pytest.approx(params * 16 / GB)


def test_what_one_process_holds_beyond_the_states():
    """World 1, bf16-mixed: the autocast cache (bf16 of every matmul weight), RL's bf16 decode copy
    and the bf16 reference, 2 B / param each; the steady state counts AdamW's moments."""
    params, embed = SDAR_8B.num_parameters(), SDAR_8B.vocab_size * SDAR_8B.hidden_size
    out = plan(SDAR_8B, Workload(world=1, reference=True, decode_rows=1, decode_len=8, foreach=False))
    assert out["cast_cache"] == pytest.approx((params - embed) * 2 / GB)
    assert out["decode_weights"] == pytest.approx(params * 2 / GB)
    assert out["reference"] == pytest.approx(params * 2 / GB)
    assert out["adam"] == pytest.approx(params * 8 / GB)
    assert out["step_temp"] == pytest.approx(embed * 4 / GB)  # CPU: one tensor at a time
    held = out["states"] + out["reference"] + out["decode_weights"]
    assert out["train_peak"] == pytest.approx(held + out["activations"] + out["head"] + out["cast_cache"])
    assert out["rollout_peak"] == pytest.approx(held - out["grads"] + out["kv_cache"])
    fp32 = plan(SDAR_8B, Workload(world=1, precision="fp32", reference=True, decode_rows=1, decode_len=8))
    assert fp32["cast_cache"] == fp32["decode_weights"] == 0 and fp32["reference"] == pytest.approx(params * 4 / GB)


def test_a_tied_embedding_is_cast_and_gets_a_second_gradient():
    """Tied (Qwen3-0.6B): the head's matmul casts the shared table, and the lookup's dense gradient is a
    temporary added into the head's at the end of backward, with the cast cache still held."""
    tied = dataclasses.replace(SDAR_8B, tie_word_embeddings=True)
    params, embed = tied.num_parameters(), tied.vocab_size * tied.hidden_size
    out = plan(tied, Workload(world=1, tokens=16, scored=8, foreach=False))
    assert out["cast_cache"] == pytest.approx(params * 2 / GB) and out["tied_grad"] == pytest.approx(embed * 4 / GB)
    assert out["train_peak"] == pytest.approx(out["states"] + out["cast_cache"] + out["tied_grad"])
    assert plan(SDAR_8B, Workload(world=1, foreach=False))["tied_grad"] == 0
    assert plan(tied, Workload(world=1, lora_params=1000))["tied_grad"] == 0  # a frozen table has no gradient


def test_lora_holds_a_frozen_base_and_the_adapters_states():
    params, adapters = SDAR_8B.num_parameters(), 40_000_000
    out = plan(SDAR_8B, Workload(world=1, lora_params=adapters, reference=True, decode_rows=1, decode_len=8))
    assert out["masters"] == pytest.approx((params * 2 + adapters * 4) / GB)  # bf16 base + fp32 adapters
    assert out["states"] == pytest.approx((params * 2 + adapters * 16) / GB)
    assert out["reference"] == 0  # the base with the adapters off
    assert out["cast_cache"] == out["decode_weights"] == pytest.approx(adapters * 2 / GB)


@pytest.mark.parametrize("family,native", [("sdar", {}), ("sdar", {"tie_word_embeddings": True}), ("llada", {}),
                                           ("llada", {"include_qkv_bias": True}), ("dream", {}), ("llada2", {}),
                                           ("llada2", {"num_shared_experts": 0, "first_k_dense_replace": 0})])
def test_the_plan_counts_each_familys_own_parameters(family, native):
    """The plan reads a family's sizes through its hook (``cfg.sizes``), never its field names (LLaDA's
    OLMo ``d_model`` / ``mlp_hidden_size``, LLaDA2's experts): its total, embedding and largest layer equal
    the built model's tensors."""
    import re
    from collections import Counter

    import torch

    from dirl.model.families import get_family
    fam = get_family(family)
    cfg = fam.config_cls.for_init(fam.presets["tiny"], vocab_size=300, mask_token_id=299, eos_token_id=1,
                                  pad_token_id=0, block_size=4, torch_dtype="float32", **native)
    with torch.device("meta"):
        model = fam.model_cls(cfg)
    layers = Counter()
    for name, p in model.named_parameters():
        if (index := re.search(r"\.(\d+)\.", name)) is not None:
            layers[int(index.group(1))] += p.numel()
    out = plan(cfg, Workload(world=8, tokens=64, scored=32, decode_rows=2, decode_len=16))
    assert out["params_total_b"] * 1e9 == pytest.approx(sum(p.numel() for p in model.parameters()), abs=0.5)
    assert cfg.sizes.max_layer == max(layers.values()) and len(layers) == cfg.arch.num_layers
    assert cfg.sizes.embedding == 300 * cfg.arch.hidden_size
    active = cfg.sizes.active_parameters
    assert active < cfg.sizes.parameters if family == "llada2" else active == cfg.sizes.parameters
    assert out["gathered"] == pytest.approx((2 * cfg.sizes.embedding + 2 * cfg.sizes.max_layer) * 2 / GB)


@pytest.mark.parametrize("family", ["sdar", "llada", "llada2"])
def test_the_plans_adapter_count_is_what_lora_trains(family, tmp_path):
    """`dirl plan`'s LoRA count skips what apply_lora excludes (LLaDA's head named ff_out, routed experts)."""
    import json

    from dirl.model.families import get_family
    from dirl.model.lora import LoraConfig, apply_lora, num_parameters
    fam = get_family(family)
    cfg = fam.config_cls.for_init(fam.presets["tiny"], vocab_size=300, mask_token_id=299, eos_token_id=1,
                                  pad_token_id=0, block_size=4, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    lora = LoraConfig(r=4)
    _, adapters = model_config(str(tmp_path), lora)
    trainable, _ = num_parameters(apply_lora(fam.model_cls(cfg), lora, str(tmp_path)))
    assert adapters == trainable > 0


def test_rl_workload_decodes_the_rows_it_has_and_trains_on_the_responses():
    cfg = RLConfig()  # 8 prompts x 8, max_batch_rows 256, 32 new tokens, micro-batches of 8192 tokens
    work = rl_workload(cfg, world=1, prompt_tokens=100)
    assert work.decode_rows == 64 and work.decode_len == 132
    assert rl_workload(cfg, world=4, prompt_tokens=100).decode_rows == 16  # 2 prompts x 8 per rank
    cfg.rollout.native.max_batch_rows = 10
    assert rl_workload(cfg, world=1).decode_rows == 10
    # 64 rows of 100 + 5 x 12 = 160 tokens = 10,240: micro-batches of 8,192; at 1 token a row is 105
    assert rl_workload(cfg, world=1, prompt_tokens=100, response_tokens=12).tokens == 8192
    assert rl_workload(cfg, world=1, prompt_tokens=100, response_tokens=1).tokens == 64 * 105


def test_head_term_matches_the_cpu_measurement():
    narrow = preset_config("tiny", vocab_size=151_936)
    for scored in (1024, 4096):
        head_mb = plan(narrow, Workload(world=1, precision="fp32", tokens=scored, scored=scored))["head"] * 1024
        assert head_mb == pytest.approx(MEASURED_HEAD_MB, rel=0.15)
        sft = Workload(world=1, precision="fp32", tokens=scored, scored=scored, head_tensors=SFT_HEAD_TENSORS)
        assert plan(narrow, sft)["head"] * 1024 == pytest.approx(MEASURED_SFT_HEAD_MB, rel=0.15)
    # unchunked, the head grows with N (the old path): ~1.75 GB per 1k tokens at this vocabulary
    unchunked = plan(narrow, Workload(world=1, precision="fp32", tokens=4096, scored=4096, head_chunk=0))["head"]
    assert unchunked > 8 * MEASURED_HEAD_MB / 1024


def test_checkpointing_cuts_activations_by_about_the_layer_count():
    work = dict(world=8, tokens=16_384, scored=4096)
    with_ckpt = plan(SDAR_8B, Workload(**work, checkpointing=True))["activations"]
    without = plan(SDAR_8B, Workload(**work, checkpointing=False))["activations"]
    assert 5 < without / with_ckpt < SDAR_8B.num_hidden_layers


@pytest.mark.parametrize("max_new_tokens,live_rows", [(2048, 64), (8192, 28)])
def test_the_8b_rl_config_fits_8x80gb(max_new_tokens, live_rows):
    """Each rank decodes its 2 prompts x 32 rows; the KV budget (rollout.native.max_batch_tokens) keeps
    the rollout phase in the device at 8k too."""
    cfg = config_lib.load(RLConfig, CONFIGS / "sdar-8b-rl.yaml", [])
    work = rl_workload(cfg, world=8, max_new_tokens=max_new_tokens)
    assert decode_rows(work) == live_rows  # 245,760 // (512 + 8192) = 28
    assert fits(SDAR_8B, work, device_gb=80)
    unbudgeted = fits(SDAR_8B, dataclasses.replace(work, decode_tokens=0), device_gb=80, phase="rollout")
    assert unbudgeted == (max_new_tokens == 2048)  # 64 rows at 8k would not fit
    assert cfg.compute.precision == "bf16-mixed" and cfg.compute.activation_checkpointing


def test_time_sharing_holds_every_row_in_the_kv_cache_within_the_budget():
    """batching=shared admits all of a rank's 64 rows with their KV (capped by max_batch_tokens),
    while only max_batch_rows of them run: the cache term grows by exactly the paused rows' KV."""
    arch = SDAR_8B.arch
    kv_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * 2
    base = ["rollout.native.max_batch_rows=16"]
    fifo, shared = (rl_workload(config_lib.load(RLConfig, CONFIGS / "sdar-8b-rl.yaml", base + extra), world=8,
                                max_new_tokens=2048) for extra in ([], ["rollout.native.batching=shared"]))
    assert (decode_rows(fifo), decode_rows(shared)) == (16, 64)  # 245,760 // (512 + 2048) = 96 >= 64
    extra = (plan(SDAR_8B, shared)["kv_cache"] - plan(SDAR_8B, fifo)["kv_cache"]) * GB
    assert extra == pytest.approx(48 * (512 + 2048) * kv_per_token)
    assert decode_rows(dataclasses.replace(shared, decode_tokens=32 * (512 + 2048))) == 32  # the budget caps it


@pytest.mark.parametrize("max_length", [2048, 3072, 8192])
def test_the_8b_fsdp_sft_config_fits_8x80gb(max_length):
    cfg = config_lib.load(SFTConfig, CONFIGS / "sdar-8b-sft-fsdp.yaml", [])
    assert fits(SDAR_8B, sft_workload(cfg, world=8, max_length=max_length), device_gb=80)


@needs_sdar
def test_the_single_gpu_sft_config_is_lora_on_80gb():
    """Full FT in bf16-mixed on one GPU holds ~153 GB (more than an H200), so the recipe is LoRA."""
    cfg = config_lib.load(SFTConfig, CONFIGS / "sdar-8b-sft.yaml", [])
    assert cfg.lora.r == 64
    _, adapters = model_config(str(SDAR_DIR), cfg.lora)
    assert fits(SDAR_8B, sft_workload(cfg, world=1, lora_params=adapters), device_gb=80)
    cfg.lora.r = 0
    assert not fits(SDAR_8B, sft_workload(cfg, world=1), device_gb=141)


@needs_sdar
@pytest.mark.parametrize("config,extra,code", [
    ("sdar-8b-rl.yaml", ["--gpus", "8"], 0), ("sdar-8b-sft-fsdp.yaml", ["--gpus", "8"], 0),
    ("sdar-8b-sft.yaml", [], 0), ("sdar-8b-sft.yaml", ["lora.r=0", "--gpu-gb", "141"], 1)])
def test_dirl_plan_prints_the_breakdown_and_exits_by_the_fit(config, extra, code, capsys):
    assert cli_main(["plan", "--config", str(CONFIGS / config), f"model={SDAR_DIR}", *extra]) == code
    out = capsys.readouterr().out
    assert "kv_cache" in out and "train_peak" in out and ("does not fit" in out) == bool(code)


def test_dirl_plan_needs_a_model_config(tmp_path, capsys):
    assert cli_main(["plan", "--config", str(CONFIGS / "sdar-8b-rl.yaml"), f"model={tmp_path}"]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
@needs_sdar
@pytest.mark.parametrize("case", ["sft-lora", "rl-lora", "sft-full", "rl-full"])
def test_plan_matches_the_measured_steady_state_peak(case, tmp_path):
    """`python -m benchmarks.memory_plan`: a Qwen3-0.6B-shaped model trained by the real trainers on CPU in
    bf16-mixed; the peak RSS of the second step (above the pre-load RSS) within 15% of the plan.
    Needs ~4 GB (LoRA) / ~12 GB (full) free and minutes per case."""
    from benchmarks import memory_plan as bench
    length = 128 if case.startswith("rl") else 256  # RL: 16 new tokens (BENCHMARKS.md's table)
    result = bench.run_case(case, bench.make_checkpoint(tmp_path, SDAR_DIR), length=length)
    assert 0.85 <= result["ratio"] <= 1.15, result
