"""Checkpoint directories: round trips, sharding, validation errors, SDAR names, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dirl.model.checkpoint as checkpoint
from dirl.model.checkpoint import CheckpointError, load_config, load_pretrained, save_pretrained
from dirl.model.masks import TokenMeta
from dirl.model.sdar.config import SDARConfig
from dirl.model.sdar.modeling import SDARForCausalLM

SHRUNK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, vocab_size=160, mask_token_id=159, eos_token_id=150, pad_token_id=150,
              bos_token_id=150)


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        return model(ids, pos, TokenMeta.clean(pos, model.config.block_size)).logits


def test_round_trip_gives_identical_logits(tiny_model, tiny_checkpoint, tokenizer):
    assert (tiny_checkpoint / "config.json").exists() and (tiny_checkpoint / "model.safetensors").exists()
    loaded, loaded_tok = load_pretrained(tiny_checkpoint)
    assert loaded.config.to_hf_dict() == tiny_model.config.to_hf_dict()
    assert torch.equal(_logits(loaded), _logits(tiny_model))
    assert loaded_tok.encode("a+b=3") == tokenizer.encode("a+b=3")


def test_sharded_checkpoint_writes_index_and_loads(tiny_model, ckpt_dir):
    save_pretrained(tiny_model, None, ckpt_dir, max_shard_bytes=40_000)
    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (ckpt_dir / "model.safetensors").exists()
    assert all((ckpt_dir / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    loaded, tok = load_pretrained(ckpt_dir)
    assert tok is None
    assert torch.equal(_logits(loaded), _logits(tiny_model))


def _edit_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_bad_tensor_raises_checkpoint_error_naming_it(tiny_checkpoint, problem):
    name = "model.layers.1.mlp.up_proj.weight"
    if problem == "missing":
        _edit_weights(tiny_checkpoint, lambda s: s.pop(name))
    elif problem == "unexpected":
        name = "model.layers.1.mlp.extra_proj.weight"
        _edit_weights(tiny_checkpoint, lambda s: s.__setitem__(name, torch.zeros(3)))
    else:
        _edit_weights(tiny_checkpoint, lambda s: s.__setitem__(name, torch.zeros(5, 64)))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_pretrained(tiny_checkpoint)


def test_missing_directory_files_raise_checkpoint_error(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tiny_checkpoint)


def test_shrunk_real_sdar_config_round_trips(sdar_dir, ckpt_dir):
    real = json.loads((sdar_dir / "config.json").read_text())
    cfg = SDARConfig.from_hf_dict({**real, **SHRUNK})
    model = SDARForCausalLM(cfg)
    model.init_weights(seed=3)
    save_pretrained(model, None, ckpt_dir, dtype="float32")  # asked for fp32 instead of the source's bf16
    loaded, _ = load_pretrained(ckpt_dir)
    assert loaded.config.block_size == 4 and loaded.config.mask_token_id == 159
    assert torch.equal(_logits(loaded), _logits(model))
    saved = json.loads((ckpt_dir / "config.json").read_text())
    for key, value in real.items():  # every real field survives; only the shrunk sizes and dtype change
        if key not in SHRUNK and key != "torch_dtype":
            assert saved[key] == value, key
    assert {k: saved[k] for k in SHRUNK} == SHRUNK
    assert saved["torch_dtype"] == "float32"


def test_real_sdar_config_fields_survive_load_save(sdar_dir):
    real = json.loads((sdar_dir / "config.json").read_text())
    cfg = load_config(sdar_dir)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.mask_token_id) == (4096, 36, 151936, 151669)
    written = cfg.to_hf_dict()
    assert {k: written[k] for k in real} == real
    assert SDARConfig.from_hf_dict(written) == cfg


def test_meta_model_key_names_equal_real_sdar_index(sdar_dir):
    index = json.loads((sdar_dir / "model.safetensors.index.json").read_text())
    with torch.device("meta"):
        model = SDARForCausalLM(load_config(sdar_dir))
    names = set(model.state_dict())
    assert len(index["weight_map"]) == 399
    assert names == set(index["weight_map"])
    # The shapes of the real model, for a few representative tensors.
    state = model.state_dict()
    assert state["model.embed_tokens.weight"].shape == (151936, 4096)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (8 * 128, 4096)
    assert state["model.layers.35.self_attn.q_norm.weight"].shape == (128,)


def test_dirl_init_writes_sdar_layout(tmp_path, monkeypatch):
    from dirl import cli

    out = tmp_path / "init"
    monkeypatch.setattr("sys.argv", ["dirl"])
    assert cli.main(["init", "--out", str(out), "preset=tiny", "block_size=8", "seed=5"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_size"] == 8 and cfg["mask_token_id"] == 3 and cfg["model_type"] == "sdar"
    state = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.self_attn.q_norm.weight" in state and "lm_head.weight" in state
    assert all(k.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")) for k in state)
    model, tok = load_pretrained(out)
    assert tok.mask_token_id == model.config.mask_token_id


def test_interrupted_save_keeps_previous_checkpoint(tiny_model, tiny_checkpoint, make_tiny_model, monkeypatch):
    before = _logits(load_pretrained(tiny_checkpoint)[0])
    real_save = checkpoint.save_weights

    def crash(state, directory, max_shard_bytes=2 << 30):
        real_save(state, directory, max_shard_bytes)  # half the work is on disk ...
        raise KeyboardInterrupt("killed mid-save")  # ... then the process dies

    monkeypatch.setattr(checkpoint, "save_weights", crash)
    other = make_tiny_model(seed=7)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(other, None, tiny_checkpoint)
    after, tok = load_pretrained(tiny_checkpoint)
    assert torch.equal(_logits(after), before)
    assert tok is not None  # the old directory, tokenizer included
    monkeypatch.setattr(checkpoint, "save_weights", real_save)
    save_pretrained(other, None, tiny_checkpoint)  # a later save still works
    assert torch.equal(_logits(load_pretrained(tiny_checkpoint)[0]), _logits(other))


@pytest.mark.parametrize("enabled", ["1", "0"])
def test_a_save_fsyncs_every_file_and_directory_unless_turned_off(tiny_model, tmp_path, monkeypatch, enabled):
    """With fsync on (the default) every file of the new directory, the directory itself and its
    parent are flushed before the save returns; ``DIRL_FSYNC=0`` (the test suite) flushes nothing."""
    monkeypatch.setenv("DIRL_FSYNC", enabled)
    synced = []
    real_fsync = checkpoint.os.fsync

    def record(fd):
        synced.append(checkpoint.os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", record)
    final = save_pretrained(tiny_model, None, tmp_path / "ckpt")
    names = {p.name for p in final.iterdir()}
    if enabled == "0":
        assert synced == []
        return
    # the files and the directory were synced under the temporary name, then the parent
    tmp_names = {checkpoint.Path(p).name for p in synced}
    assert names <= tmp_names and len(names) >= 2, (names, synced)
    assert str(tmp_path) in synced and any(".ckpt.tmp-" in checkpoint.Path(p).name for p in synced)
