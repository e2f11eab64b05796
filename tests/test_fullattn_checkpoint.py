"""Full-attention families through dirl's own plumbing: dirl init -> save -> load gives the same
logits with the family's own config schema; LoRA on the native names, the base = adapters off;
and (integration) dirl sft / rl / generate end to end on tiny LLaDA and Dream checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from dirl import cli
from dirl.model.checkpoint import load_pretrained, save_pretrained
from dirl.model.factory import InitConfig, init_model
from dirl.model.lora import LoraConfig, adapters_disabled, apply_lora


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None], None).logits


@pytest.mark.parametrize("family,fields", [("llada", {"d_model", "n_layers", "n_heads", "block_type"}),
                                           ("dream", {"hidden_size", "num_hidden_layers", "num_key_value_heads"})])
def test_init_save_load_round_trip(family, fields, tokenizer, tmp_path):
    model = init_model(InitConfig(family=family, preset="tiny", seed=3), tokenizer).eval()
    save_pretrained(model, tokenizer, tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert fields <= set(data) and data["model_type"] == {"llada": "llada", "dream": "Dream"}[family]
    loaded, tok = load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model) and tok is not None and loaded.arch == model.arch
    ids = torch.tensor([tokenizer.encode("12+7=19")])
    torch.testing.assert_close(_logits(loaded.eval(), ids), _logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_lora_on_native_names_reference_is_adapters_off(family, tokenizer, tmp_path):
    pytest.importorskip("peft")
    model = init_model(InitConfig(family=family, preset="tiny", seed=4), tokenizer).eval()
    ids = torch.tensor([tokenizer.encode("3*4=12")])
    base = _logits(model, ids)
    model = apply_lora(model, LoraConfig(r=4), base=str(tmp_path))
    adapted = [name for name, _ in model.named_modules() if name.endswith("lora_A")]
    assert adapted and not any(n.startswith(("model.transformer.ff_out", "lm_head")) for n in adapted)
    if family == "llada":  # every block's down projection (named ff_out, like the head) is adapted
        assert {n for n in adapted if ".ff_out." in n} == {f"model.transformer.blocks.{i}.ff_out.lora_A"
                                                           for i in range(model.arch.num_layers)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    with adapters_disabled(model):
        torch.testing.assert_close(_logits(model, ids), base, atol=0, rtol=0)
    assert float((_logits(model, ids) - base).abs().max()) > 1e-3


@pytest.mark.integration
@pytest.mark.parametrize("family,rule", [("llada", "low_confidence"), ("dream", "maskgit_plus")])
def test_cli_init_sft_rl_generate(family, rule, tmp_path, capsys):
    ckpt = tmp_path / "init"
    assert cli.main(["init", f"family={family}", "preset=tiny", "--out", str(ckpt)]) == 0
    assert cli.main(["sft", f"model={ckpt}", f"out={tmp_path / 'sft'}", "max_steps=2", "batch_size=2",
                     "progress=false", "report_to=[jsonl]", "save_every=0"]) == 0
    sampling = [f"rollout.sampling.unmasking={rule}", "rollout.sampling.max_new_tokens=8",
                "rollout.sampling.block_length=4", "rollout.sampling.steps_per_block=2"]
    assert cli.main(["rl", f"model={tmp_path / 'sft' / 'final'}", f"out={tmp_path / 'rl'}", "max_steps=1",
                     "rollout.num_prompts=2", "rollout.group_size=2", *sampling, "report_to=[jsonl]"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tmp_path / "rl" / "final"), "--prompt", "2+2=", "--json",
                     f"unmasking={rule}", "max_new_tokens=8", "block_length=4", "steps_per_block=2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) <= 8 and out["tokens_per_forward"] == 2.0


@pytest.mark.parametrize("recipe,family,preset,estimator", [
    ("llada-8b-agrpo.yaml", "llada", "llada-8b", "trace_mc"), ("dream-7b-tracerl.yaml", "dream", "dream-7b", "trace_shrink")])
def test_recipes_load_and_fit_the_real_shapes(recipe, family, preset, estimator):
    """The AGRPO / TraceRL recipes parse, name their estimator, and their sampling suits the real model."""
    from pathlib import Path

    from dirl import config as config_lib
    from dirl.model.families import get_family
    from dirl.rollout import check_sampling
    from dirl.train.rl.config import RLConfig

    cfg = config_lib.load(RLConfig, Path(__file__).resolve().parents[1] / "configs" / recipe)
    assert cfg.algo.estimator == estimator
    if family == "llada":  # AGRPO: k = 24 states, entropy importance sampling, LoRA r = 64
        assert (cfg.algo.mc_steps, cfg.algo.mc_sampling, cfg.lora.r) == (24, "entropy", 64)
    else:  # TraceRL: shrink s = 8
        assert cfg.algo.shrink == 8
    fam = get_family(family)
    check_sampling(cfg.rollout.sampling, fam.config_cls(**fam.presets[preset]).arch, "rollout.sampling")


@pytest.mark.parametrize("family,rule", [("llada", "random"), ("dream", "entropy")])
def test_dirl_eval_runs_on_full_attention(family, rule, tokenizer, tmp_path, capsys):
    """`dirl eval` (the shared eval path) decodes with the full-attention decoder: 2 held-out
    questions, 8 tokens in 4 forwards each."""
    model = init_model(InitConfig(family=family, preset="tiny", seed=5), tokenizer)
    save_pretrained(model, tokenizer, tmp_path / "ckpt")
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "ckpt"), "--data", "task:arithmetic:test",
                     "--out", str(tmp_path / "eval"), "limit=2", "sampling.max_new_tokens=8",
                     f"sampling.unmasking={rule}", "sampling.block_length=8", "sampling.steps_per_block=4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 2 and summary["tokens_per_forward"] == 2.0
