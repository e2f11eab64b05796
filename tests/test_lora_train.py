"""LoRA in the trainers: only adapters change (the base bit-identical), the RL reference is
the base (no copy), adapter checkpoints resume exactly, DDP matches one process, FSDP refused."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dirl import config as config_lib
from dirl.cli import main as cli_main
from dirl.config import ConfigError
from dirl.model.checkpoint import CheckpointError, load_pretrained
from dirl.model.loading import load_model_spec
from dirl.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModelView, adapter_state
from dirl.train import models as models_lib
from dirl.train.rl.config import RLConfig
from dirl.train.rl.loop import build_run as build_rl_run
from dirl.train.rl.loop import train_step as rl_step
from dirl.train.sft.config import SFTConfig
from dirl.train.sft.loop import build_run, train_step

pytest.importorskip("peft")
SFT_ARGS = ["data.source=task:arithmetic", "data.limit=64", "data.max_length=64", "batch_size=6",
            "optim.lr=1e-2", "progress=false", "log_every=1", "save_every=2", "lora.r=4", "lora.alpha=8"]
RL_ARGS = ["rewards.rl_rewards:digit_fraction=1.0", "rollout.num_prompts=2", "rollout.group_size=4",
           "rollout.sampling.max_new_tokens=8", "algo.beta=0.01", "optim.lr=1e-2", "optim.schedule=constant",
           "lora.r=4", "max_steps=2"]


def _split(model) -> tuple[dict, dict]:
    """(base tensors, adapter tensors) of a LoRA model, cloned."""
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return ({n: t for n, t in state.items() if "lora_" not in n}, {n: t for n, t in state.items() if "lora_" in n})


def _assert_only_adapters_changed(before: tuple[dict, dict], model) -> None:
    base, adapters = before
    base_after, adapters_after = _split(model)
    assert base.keys() == base_after.keys() and all(torch.equal(base[n], base_after[n]) for n in base)
    assert all(not torch.equal(adapters[n], adapters_after[n]) for n in adapters if "lora_B" in n)


def _adapters(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / ADAPTER_WEIGHTS))


def test_sft_with_lora_changes_only_adapters(tiny_checkpoint, tmp_path):
    run = build_run(config_lib.load(SFTConfig, None, [*SFT_ARGS, f"model={tiny_checkpoint}", f"out={tmp_path}"]))
    trainable = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for n, p in run.model.named_parameters() if "lora_" in n}
    before = _split(run.model)
    run.model.train()
    for _ in range(3):
        assert train_step(run)["skipped"] == 0
    _assert_only_adapters_changed(before, run.model)


def test_sft_lora_checkpoint_is_an_adapter_dir_and_resumes_exactly(tiny_checkpoint, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*SFT_ARGS, f"model={tiny_checkpoint}", "max_steps=4"]
    assert cli_main(["sft", *args, f"out={straight}"]) == 0
    assert cli_main(["sft", *args, f"out={split}", "stop_at_step=2"]) == 0
    step2 = split / "checkpoints" / "step-000002"
    assert (step2 / ADAPTER_CONFIG).exists() and not (step2 / "model.safetensors").exists()
    assert cli_main(["sft", "--resume", str(split)]) == 0
    a, b = _adapters(straight / "final"), _adapters(split / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(t.abs().sum() > 0 for n, t in a.items() if "lora_B" in n)  # trained away from B = 0


def test_rl_with_lora_reference_is_the_base_and_only_adapters_change(tiny_checkpoint, tmp_path):
    cfg = config_lib.load(RLConfig, None, [*RL_ARGS, f"model={tiny_checkpoint}", f"out={tmp_path}"])
    run = build_rl_run(cfg)
    assert isinstance(run.learner.ref_model, BaseModelView) and run.learner.ref_model.lora_model is run.learner.model
    before = _split(run.learner.model)
    kls = [rl_step(run, step)["kl"] for step in range(2)]
    _assert_only_adapters_changed(before, run.learner.model)
    assert kls[-1] > 0  # the policy moved away from its (adapter-free) reference
    merged = tmp_path / "merged"
    from dirl.train.state import save_model_dir

    save_model_dir(run.learner.model, run.collector.tokenizer, tmp_path / "final")
    assert cli_main(["merge", str(tmp_path / "final"), "--out", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == "sdar"
    with pytest.raises(CheckpointError, match="dirl merge"):  # an adapter dir is not a model dir
        load_pretrained(tmp_path / "final")


def test_rl_with_lora_in_bf16_mixed_trains_fp32_adapters_on_a_bf16_base(tiny_checkpoint, tmp_path):
    cfg = config_lib.load(RLConfig, None, [*RL_ARGS, f"model={tiny_checkpoint}", f"out={tmp_path}",
                                           "compute.precision=bf16-mixed", "max_steps=1"])
    run = build_rl_run(cfg)
    model = run.learner.model
    assert {str(p.dtype) for n, p in model.named_parameters() if "lora_" not in n} == {"torch.bfloat16"}
    assert all(p.dtype == torch.float32 for g in run.learner.optimizer.param_groups for p in g["params"])
    assert run.collector.backend.decode_model is not model  # decodes bf16 adapters on the shared bf16 base
    before = _split(model)
    assert rl_step(run, 0)["kl"] >= 0
    _assert_only_adapters_changed(before, model)  # the bf16 base bit-identical
    from dirl.train.state import save_model_dir

    adapters = _adapters(save_model_dir(model, run.collector.tokenizer, tmp_path / "final"))
    assert {t.dtype for t in adapters.values()} == {torch.float32}


def test_lora_needs_a_checkpoint_and_refuses_fsdp_and_other_backends(monkeypatch, tiny_checkpoint):
    lora = config_lib.load(SFTConfig, None, ["lora.r=4"]).lora
    with pytest.raises(ConfigError, match="checkpoint directory"):
        load_model_spec("init:tiny", lora=lora)
    with pytest.raises(ConfigError, match="rollout.backend"):
        models_lib.check_lora(lora, "fsdp", backend="http")
    monkeypatch.setattr(models_lib.dist_lib, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="dist.strategy=ddp"):
        models_lib.check_lora(lora, "fsdp")
    models_lib.check_lora(lora, "ddp")  # allowed


def _cli_rank(rank: int, port: int, args: tuple[str, ...]) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert cli_main(list(args)) == 0


@pytest.mark.integration
def test_sft_with_lora_on_two_ddp_ranks_matches_one_process(tiny_checkpoint, tmp_path):
    args = [*SFT_ARGS, f"model={tiny_checkpoint}", "max_steps=3", "save_every=0", "batch_size=7"]
    assert cli_main(["sft", *args, f"out={tmp_path / 'one'}"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_cli_rank, args=(port, ("sft", *args, f"out={tmp_path / 'two'}", "dist.strategy=ddp")),
                       nprocs=2, start_method="fork")
    a, b = _adapters(tmp_path / "one" / "final"), _adapters(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


def test_adapter_state_names_follow_peft(tiny_checkpoint):
    model, _ = load_model_spec(str(tiny_checkpoint), lora=config_lib.load(SFTConfig, None, ["lora.r=2"]).lora)
    names = list(adapter_state(model))
    assert names and all(n.startswith("base_model.model.model.layers.") for n in names)
