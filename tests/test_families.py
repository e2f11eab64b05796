"""The model-family registry, the normalised Arch record, the readout function, partial RoPE."""

from __future__ import annotations

import json

import pytest
import torch

from dirl import cli
from dirl.errors import FieldError
from dirl.model.checkpoint import CheckpointError, load_config, load_pretrained
from dirl.model.families import FAMILIES, family_for_config, get_family
from dirl.model.layout import get_layout, readout_rows
from dirl.model.layout.block_causal import LAYOUT as BLOCK_CAUSAL


def test_real_sdar_config_picks_the_sdar_family_and_maps_onto_arch(sdar_dir):
    data = json.loads((sdar_dir / "config.json").read_text())
    family = family_for_config(data)
    assert family is get_family("sdar") and family.name == "sdar"
    arch = family.config_cls.from_hf_dict(data).arch
    assert (arch.family, arch.attention, arch.logit_shift, arch.block_size) == ("sdar", "block_causal", 0, 4)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (36, 4096, 32, 8, 128)
    assert (arch.vocab_size, arch.mask_token_id, arch.eos_token_id, arch.pad_token_id) == (151936, 151669, 151643, 151643)
    assert arch.max_position_embeddings == 32768
    assert get_layout(arch) is BLOCK_CAUSAL


def test_family_by_architectures_when_model_type_is_unknown():
    assert family_for_config({"model_type": "custom", "architectures": ["SDARForCausalLM"]}).name == "sdar"


def test_unknown_model_type_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(FieldError, match="model_type 'gpt2'"):
        family_for_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(FieldError, match="family 'nope'"):
        get_family("nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "config.json" in message and "model_type 'gpt2'" in message


def test_every_registered_family_is_complete():
    for name in FAMILIES:
        family = get_family(name)
        assert family.name == name and "tiny" in family.presets and family.lora_targets
        for method in ("from_hf_dict", "to_hf_dict", "for_init", "num_parameters"):
            assert hasattr(family.config_cls, method), (name, method)


def test_dirl_init_family_sdar_round_trips(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli.main(["init", "--out", str(out), "family=sdar", "preset=tiny", "seed=2"]) == 0
    data = json.loads((out / "config.json").read_text())
    assert (data["model_type"], data["architectures"]) == ("sdar", ["SDARForCausalLM"])
    model, tokenizer = load_pretrained(out)
    assert type(model) is get_family("sdar").model_cls
    assert model.arch.mask_token_id == tokenizer.mask_token_id and model.arch.num_layers == 2
    assert len(model.decoder_layers()) == 2
    assert cli.main(["init", "--out", str(tmp_path / "bad"), "family=nope"]) == 2
    assert "family" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli.main(["init", "--out", str(tmp_path / "bad"), "preset=huge"]) == 2
    assert "preset" in capsys.readouterr().err


def test_readout_rows_applies_the_logit_shift():
    index = torch.tensor([3, 7, 12])
    assert torch.equal(readout_rows(index, 0), index)
    assert torch.equal(readout_rows(index, 1), torch.tensor([2, 6, 11]))


def test_partial_rope_rotates_only_the_first_rotary_dim_channels():
    from dirl.model.blocks import apply_rope, rope_cos_sin

    x = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))  # (B, H, T, D)
    pos = torch.arange(5)[None]
    cos, sin = rope_cos_sin(pos, 4, 10_000.0, x.dtype)  # rotary_dim 4 of head_dim 8
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    # the rotated part is plain RoPE of a 4-channel head; position 0 is the identity
    torch.testing.assert_close(out[..., :4], apply_rope(x[..., :4].contiguous(), cos, sin))
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])
    assert not torch.allclose(out[..., :4], x[..., :4])
