"""Faithful saves: a directory built like the real SDAR-8B-Chat one survives load -> save.

The source is ``../shared/sdar-8b-chat`` (real config.json, tokenizer files, chat
template, generation_config.json) shrunk to a tiny model, with remote-code stubs
written here (``configuration_sdar.py`` importing a helper module relatively,
``modeling_sdar.py``) and tiny bf16 weights.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dirl.model.checkpoint import load_pretrained, save_pretrained
from dirl.model.sdar.config import SDARConfig
from dirl.model.sdar.modeling import SDARForCausalLM

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)
SOURCE_FILES = ["generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "vocab.json", "merges.txt"]
CONFIGURATION_STUB = '''from transformers import PretrainedConfig

from .sdar_defaults import DEFAULT_BLOCK_SIZE


class SDARConfig(PretrainedConfig):
    model_type = "sdar"

    def __init__(self, block_size=DEFAULT_BLOCK_SIZE, mask_token_id=None, **kwargs):
        self.block_size, self.mask_token_id = block_size, mask_token_id
        super().__init__(**kwargs)
'''
MODELING_STUB = '''from transformers import PreTrainedModel

from .configuration_sdar import SDARConfig


class SDARModel(PreTrainedModel):
    config_class = SDARConfig


class SDARForCausalLM(SDARModel):
    pass
'''
REMOTE_CODE = {"configuration_sdar.py": CONFIGURATION_STUB, "modeling_sdar.py": MODELING_STUB,
               "sdar_defaults.py": "DEFAULT_BLOCK_SIZE = 4\n"}


@pytest.fixture
def sdar_like_dir(sdar_dir, tmp_path):
    """A tiny bf16 checkpoint laid out like SDAR-8B-Chat (real config fields, tokenizer, remote code)."""
    src = tmp_path / "sdar-tiny"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy(sdar_dir / name, src / name)
    for name, code in REMOTE_CODE.items():
        (src / name).write_text(code)
    config = {**json.loads((sdar_dir / "config.json").read_text()), **TINY}
    (src / "config.json").write_text(json.dumps(config, indent=2))
    model = SDARForCausalLM(SDARConfig.from_hf_dict(config))
    model.init_weights(seed=0)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _tensor_specs(directory) -> dict[str, tuple]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


def test_load_save_round_trip_is_faithful(sdar_like_dir, tmp_path):
    # Trainers load in fp32; the save still writes the source's bf16.
    model, tokenizer = load_pretrained(sdar_like_dir, dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    out = save_pretrained(model, tokenizer, tmp_path / "out")

    assert json.loads((out / "config.json").read_text()) == json.loads((sdar_like_dir / "config.json").read_text())
    source_specs = _tensor_specs(sdar_like_dir)
    assert _tensor_specs(out) == source_specs and len(source_specs) == 2 + 11 * 2 + 1  # embed, lm_head, norm
    with safe_open(str(out / "model.safetensors"), framework="pt") as saved, \
            safe_open(str(sdar_like_dir / "model.safetensors"), framework="pt") as source:
        assert all(torch.equal(saved.get_tensor(n), source.get_tensor(n)) for n in source.keys())
    # an unchanged tokenizer is its source's files, byte for byte, and nothing else
    for name in ["generation_config.json", *REMOTE_CODE, "vocab.json", "merges.txt", "added_tokens.json",
                 "special_tokens_map.json", "tokenizer_config.json", "chat_template.jinja"]:
        assert (out / name).read_bytes() == (sdar_like_dir / name).read_bytes(), name
    assert not (out / "tokenizer.json").exists()


@pytest.mark.integration
def test_saved_directory_loads_with_transformers_remote_code(sdar_like_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load_pretrained(sdar_like_dir, dtype="float32")
    out = save_pretrained(model, tokenizer, tmp_path / "served")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    # After `import dirl` the Auto classes pick dirl's registered class (transformers prefers explicitly
    # registered code over auto_map), so the remote code is fetched as its auto_map names it.
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    hf_config = get_class_from_dynamic_module(auto_map["AutoConfig"], str(out)).from_pretrained(str(out))
    assert type(hf_config).__name__ == "SDARConfig"
    assert (hf_config.block_size, hf_config.mask_token_id, hf_config.hidden_size) == (4, 151669, 32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))  # the built-in class, no remote code
    assert hf_tokenizer.convert_tokens_to_ids("<|MASK|>") == 151669
    assert hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_changed_fields_and_asked_dtype_are_written(sdar_like_dir, tmp_path):
    model, tokenizer = load_pretrained(sdar_like_dir, dtype="float32")
    model.config.block_size = 8  # a field dirl changed
    out = save_pretrained(model, tokenizer, tmp_path / "fp32", dtype="float32")
    saved = json.loads((out / "config.json").read_text())
    source = json.loads((sdar_like_dir / "config.json").read_text())
    assert {k for k in saved if saved[k] != source.get(k)} == {"block_size", "torch_dtype"}
    assert (saved["block_size"], saved["torch_dtype"]) == (8, "float32")
    assert {dtype for _, dtype in _tensor_specs(out).values()} == {"F32"}
    assert "pad_token_id" not in saved  # derived on load (= eos), not added on save
