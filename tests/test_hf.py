"""dirl's Hugging Face classes: ``AutoModelForCausalLM`` loads dirl checkpoints with no remote code.

Oracles: the HF model's logits equal dirl's own forward on the same directory (bit for bit: one
module tree, one forward), a left-padded batch equals its rows run alone, ``generate`` equals
dirl's engine, and a ``save_pretrained`` round trip gives the source's config.json back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dirl  # noqa: F401 -- registers the families with transformers' auto classes
from dirl.cli import main as cli_main
from dirl.engine.engine import Engine
from dirl.model.checkpoint import load_pretrained
from dirl.model.hf import from_dirl
from dirl.model.masks import TokenMeta
from dirl.rollout import SamplingParams

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _dirl_logits(model, ids):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, TokenMeta.clean(pos, model.arch.block_size)).logits


def _ids(vocab, shape=(2, 13), seed=0):
    return torch.randint(4, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True])
def test_dirl_init_output_loads_in_auto_model_with_equal_logits(tmp_path, tied):
    out = tmp_path / "init"
    assert cli_main(["init", "--out", str(out), "preset=tiny", f"model.tie_word_embeddings={str(tied).lower()}"]) == 0
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # no remote code involved
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(hf).__name__ == "SDARHFForCausalLM" and isinstance(hf, transformers.PreTrainedModel)
    model, _ = load_pretrained(out)
    assert list(hf.state_dict()) == list(model.state_dict())  # the native names, no prefix
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    ids = _ids(model.arch.vocab_size)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, _dirl_logits(model, ids))


def test_left_padded_batch_equals_rows_alone(tiny_checkpoint):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    short, long = _ids(100, (1, 6), seed=1), _ids(100, (1, 11), seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with torch.no_grad():
        both = hf(batch, attention_mask=mask).logits
        torch.testing.assert_close(both[0, 5:], hf(short).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(both[1], hf(long).logits[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="labels"):
        hf(batch, labels=batch)


def test_sft_output_loads_in_auto_model(tiny_ckpt, tmp_path):
    run = tmp_path / "sft"
    assert cli_main(["sft", f"model={tiny_ckpt}", f"out={run}", "data.source=task:arithmetic", "data.limit=16",
                     "data.max_length=64", "batch_size=4", "max_steps=2", "progress=false", "save_every=0"]) == 0
    model, _ = load_pretrained(run / "final")
    hf = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    ids = _ids(model.arch.vocab_size)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, _dirl_logits(model, ids))


def test_real_sdar_config_loads_without_remote_code_and_saves_faithfully(sdar_dir, tmp_path):
    """SDAR-8B-Chat's config.json (auto_map, flex_attention, bf16) shrunk: no trust_remote_code needed."""
    data = json.loads((sdar_dir / "config.json").read_text())
    data.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=151936)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(data, indent=2))
    (src / "generation_config.json").write_bytes((sdar_dir / "generation_config.json").read_bytes())
    config = AutoConfig.from_pretrained(str(src))
    assert type(config).__name__ == "SDARHFConfig" and config.to_dirl().rope_theta == 1e6
    hf = AutoModelForCausalLM.from_config(config)  # random init through transformers
    out = tmp_path / "saved"
    hf.save_pretrained(str(out))
    assert json.loads((out / "config.json").read_text()) == data  # every field as read, auto_map included
    assert (out / "generation_config.json").read_bytes() == (sdar_dir / "generation_config.json").read_bytes()
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model, _ = load_pretrained(out, dtype="float32")
    ids = _ids(1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, _dirl_logits(model, ids))


def test_generate_runs_dirls_engine(tiny_checkpoint, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    prompts = [tokenizer.encode("12+34="), tokenizer.encode("7*8=")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_ids=[tokenizer.eos_token_id])
    rollouts = Engine(load_pretrained(tiny_checkpoint)[0].eval()).generate(prompts, params)
    assert torch.equal(out[:, :width], ids)  # the prompts as given, padding kept
    for row, rollout in zip(out, rollouts):
        n = len(rollout.completion_ids)
        assert n > 0 and row[width: width + n].tolist() == rollout.completion_ids


def test_peft_causal_lm_on_the_hf_class(tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    lora = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    assert type(lora).__name__ == "PeftModelForCausalLM"
    ids = _ids(100)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, hf.dirl_model(
            ids, torch.arange(13).expand(2, 13), TokenMeta.clean(torch.arange(13).expand(2, 13), 4)).logits)
    lora.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM"


def test_from_dirl_shares_the_parameters(tiny_model):
    hf = from_dirl(tiny_model)
    assert all(a is b for a, b in zip(hf.parameters(), tiny_model.parameters()))
    ids = _ids(100)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, _dirl_logits(tiny_model, ids))


def test_save_pretrained_round_trip_leaves_other_files(tiny_checkpoint, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint))
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    hf.save_pretrained(str(out))
    assert (out / "README.md").read_text() == "mine"
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_checkpoint / "config.json").read_text())
    assert torch.equal(AutoModelForCausalLM.from_pretrained(str(out)).lm_head.weight, hf.lm_head.weight)


@pytest.mark.integration
def test_import_dirl_registers_lazily_without_importing_transformers():
    code = ("import sys, dirl; assert 'transformers' not in sys.modules, 'imported transformers'; "
            "from transformers import AutoConfig, AutoModelForCausalLM; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "print(CONFIG_MAPPING['sdar'].__name__)")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SDARHFConfig"
