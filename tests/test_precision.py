"""Precision modes and activation checkpointing (dirl.train.precision, DESIGN §12)."""

from __future__ import annotations

import pytest
import torch

from dirl import config as config_lib
from dirl.algo.nelbo import draw_noise, sft_nelbo
from dirl.config import ConfigError
from dirl.model.factory import InitConfig, init_model
from dirl.train import precision
from dirl.train.sft.data import collate, tokenize_example
from dirl.train.precision import ComputeConfig
from dirl.train.sft.config import SFTConfig
from dirl.train.sft.loop import build_run, train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(tokenizer):
    examples = [[tokenize_example([{"role": "user", "content": f"{a}*{a}="},
                                   {"role": "assistant", "content": f"{a * a}"}], tokenizer, 4)]
                for a in (12, 345, 6789, 24680)]
    return collate(examples, tokenizer.pad_token_id)


def _loss(model, batch, tokenizer, compute: ComputeConfig):
    noise = draw_noise(batch.response_mask, batch.sample_ids, torch.Generator().manual_seed(0), complementary=True)
    precision.configure(model, compute)
    with precision.autocast(compute, CPU):
        loss, _ = sft_nelbo(model, batch, noise, tokenizer.mask_token_id)
    return loss


def _fraction_changed_by_one_step(mode: str, batch, tokenizer, lr: float = 1e-6) -> tuple[float, float]:
    """(loss, fraction of the weights with a nonzero gradient that one AdamW step changes)."""
    compute = ComputeConfig(precision=mode)
    model = init_model(InitConfig(preset="tiny", seed=0, param_dtype=precision.param_dtype(compute, CPU)), tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _loss(model, batch, tokenizer, compute)
    loss.backward()
    touched = {n: p.grad != 0 for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0).step()
    changed = sum(int(((p.detach() != before[n]) & touched[n]).sum()) for n, p in model.named_parameters())
    total = sum(int(t.sum()) for t in touched.values())
    return float(loss.detach()), changed / total


def test_bf16_mixed_keeps_small_updates_and_pure_bf16_loses_them(batch, tokenizer):
    loss32, changed32 = _fraction_changed_by_one_step("fp32", batch, tokenizer)
    loss_mixed, changed_mixed = _fraction_changed_by_one_step("bf16-mixed", batch, tokenizer)
    loss16, changed16 = _fraction_changed_by_one_step("bf16", batch, tokenizer)
    assert changed32 >= 0.99 and changed_mixed >= 0.99, (changed32, changed_mixed)
    assert changed16 < 0.2, changed16  # most lr-1e-6 updates are below half a bf16 ulp
    assert loss_mixed == pytest.approx(loss32, rel=2e-2) and loss16 == pytest.approx(loss32, rel=5e-2)


def test_fp32_master_weights_and_bf16_compute(batch, tokenizer):
    model = init_model(InitConfig(preset="tiny", seed=0), tokenizer)
    compute = ComputeConfig(precision="bf16-mixed")
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _loss(model, batch, tokenizer, compute).backward()
    hook.remove()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def _grads_and_saved_bytes(model, batch, tokenizer, checkpointing: bool):
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, batch, tokenizer, ComputeConfig(precision="fp32", activation_checkpointing=checkpointing))
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()], saved


def test_activation_checkpointing_same_gradients_less_saved_memory(batch, tokenizer):
    model = init_model(InitConfig(preset="tiny", seed=0), tokenizer)
    loss, grads, saved = _grads_and_saved_bytes(model, batch, tokenizer, False)
    loss_ckpt, grads_ckpt, saved_ckpt = _grads_and_saved_bytes(model, batch, tokenizer, True)
    assert abs(loss - loss_ckpt) <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(grads, grads_ckpt)) <= 1e-6
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)  # only each layer's input is kept


def test_sft_step_with_bf16_mixed_and_checkpointing_changes_every_parameter(tmp_path):
    cfg = config_lib.load(SFTConfig, None, [
        "model=init:tiny", "data.source=task:arithmetic", "data.limit=32", "data.max_length=64", "batch_size=4",
        "progress=false", f"out={tmp_path}", "compute.precision=bf16-mixed",
        "compute.activation_checkpointing=true", "compute.head_chunk_size=16"])
    run = build_run(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    metrics = train_step(run)
    assert metrics["loss"] > 0 and not metrics["skipped"]
    unchanged = [n for n, p in run.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged and run.model.activation_checkpointing and run.model.head_chunk_size == 16


def test_bad_precision_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="compute.*precision"):
        config_lib.load(SFTConfig, None, ["compute.precision=fp16"])


def test_rl_step_in_bf16_mixed_decodes_from_a_bf16_copy_and_changes_the_weights(tmp_path):
    from dirl.train.rl.config import RLConfig
    from dirl.train.rl.loop import build_run, train_step
    cfg = config_lib.load(RLConfig, None, [
        "model=init:tiny", f"out={tmp_path}", "rollout.num_prompts=2", "rollout.group_size=4",
        "rollout.sampling.max_new_tokens=8", "optim.lr=1e-3", "compute.precision=bf16-mixed",
        "compute.activation_checkpointing=true", "algo.micro_batch_tokens=32", "algo.beta=0.1"])
    cfg.rewards = {"rl_rewards:digit_fraction": 1.0}
    run = build_run(cfg)
    decode = run.collector.backend.decode_model
    assert decode is not run.learner.model and next(decode.parameters()).dtype == torch.bfloat16
    assert next(run.learner.model.parameters()).dtype == torch.float32  # the fp32 masters
    before = {n: p.detach().clone() for n, p in run.learner.model.named_parameters()}
    metrics = train_step(run, 0)
    assert metrics["optimizer_steps"] == 1 and metrics["grad_norm"] > 0
    assert all(not torch.equal(p.detach(), before[n]) for n, p in run.learner.model.named_parameters())
    # the engine's copy follows the update (cast to bf16)
    assert all(torch.equal(d, p.detach().to(torch.bfloat16)) for d, p in zip(decode.parameters(), run.learner.model.parameters()))


def test_rl_rejects_grad_accum_naming_the_key():
    from dirl.train.rl.config import RLConfig
    with pytest.raises(ConfigError, match="optim.grad_accum.*micro_batch_tokens"):
        config_lib.load(RLConfig, None, ["optim.grad_accum=2"])


def test_release_memory_is_auto_by_model_size_and_cpu_only():
    """``compute.release_memory``: auto fixes glibc's mmap threshold only for models of >= 50M
    parameters (it slowed the tiny demo 1.6x), on / off force it, and never off the CPU."""
    from dirl.train.precision import RELEASE_MEMORY_PARAMS, ComputeConfig, releases_memory

    tiny, big = torch.nn.Linear(4, 4), torch.nn.Embedding(RELEASE_MEMORY_PARAMS // 8, 8, device="meta")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not releases_memory(ComputeConfig(), tiny, cpu) and releases_memory(ComputeConfig(), big, cpu)
    assert releases_memory(ComputeConfig(release_memory="on"), tiny, cpu)
    assert not releases_memory(ComputeConfig(release_memory="off"), big, cpu)
    assert not releases_memory(ComputeConfig(release_memory="on"), tiny, cuda)
    with pytest.raises(ValueError, match="release_memory"):
        ComputeConfig(release_memory="yes")
