"""``dirl init``: a randomly initialised, self-contained checkpoint directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirl.errors import POSITIVE, FieldError, check_fields, one_of
from dirl.model.checkpoint import DTYPES, save_pretrained
from dirl.model.config import PRESETS, ModelConfig, preset_config
from dirl.model.tokenizer import Tokenizer, char_tokenizer, load_tokenizer
from dirl.model.transformer import SDARForCausalLM


@dataclass
class InitConfig:
    preset: str = "tiny"             # tiny | small | sdar-8b (see dirl.model.config.PRESETS)
    tokenizer: str = "char"          # "char" (built-in) or a directory with tokenizer files
    seed: int = 0
    param_dtype: str = "float32"
    block_size: int = 4
    max_shard_mb: int = 2048         # shard model.safetensors above this size
    model: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field, e.g. num_hidden_layers

    def __post_init__(self) -> None:
        check_fields(self, {"preset": one_of(*PRESETS), "param_dtype": one_of(*DTYPES), "block_size": POSITIVE,
                            "max_shard_mb": POSITIVE})
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.model:
            if key not in known:
                raise FieldError(f"model.{key}", f"is not a model config field; valid: {', '.join(sorted(known))}")


def build_tokenizer(spec: str) -> Tokenizer:
    return char_tokenizer() if spec == "char" else load_tokenizer(spec)


def init_model(cfg: InitConfig, tokenizer: Tokenizer) -> SDARForCausalLM:
    """A random model whose vocabulary and special ids match ``tokenizer``."""
    vocab = tokenizer.vocab_size
    model_cfg = preset_config(cfg.preset, **{
        "vocab_size": vocab, "mask_token_id": tokenizer.mask_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.eos_token_id,
        "block_size": cfg.block_size, "torch_dtype": cfg.param_dtype, **cfg.model})
    model = SDARForCausalLM(model_cfg)
    model.init_weights(cfg.seed)
    return model.to(DTYPES[cfg.param_dtype])


def init_checkpoint(cfg: InitConfig, out: str | Path) -> Path:
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = init_model(cfg, tokenizer)
    return save_pretrained(model, tokenizer, out, max_shard_bytes=cfg.max_shard_mb << 20)
