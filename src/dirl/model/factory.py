"""``dirl init``: a randomly initialised, self-contained checkpoint directory of any family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirl.errors import POSITIVE, SEED, FieldError, check_fields, one_of
from dirl.model.checkpoint import DTYPES, build_model, save_pretrained
from dirl.model.families import DEFAULT_FAMILY, FAMILIES, get_family
from dirl.model.tokenizer import Tokenizer, char_tokenizer, load_tokenizer


@dataclass
class InitConfig:
    family: str = DEFAULT_FAMILY     # a registered model family (dirl.model.families.FAMILIES)
    preset: str = "tiny"             # one of the family's presets (sdar: tiny | small | demo | sdar-8b)
    tokenizer: str = "char"          # "char" (built-in) or a directory with tokenizer files
    seed: int = 0
    param_dtype: str = "float32"
    block_size: int | None = None    # None: the family's own (sdar 4, llada2 32)
    max_shard_mb: int = 2048         # shard model.safetensors above this size
    model: dict[str, Any] = field(default_factory=dict)  # any field of the family's config, e.g. num_hidden_layers

    def __post_init__(self) -> None:
        check_fields(self, {"family": one_of(*FAMILIES), "param_dtype": one_of(*DTYPES),
                            "block_size": POSITIVE, "max_shard_mb": POSITIVE, "seed": SEED})
        family = get_family(self.family)
        check_fields(self, {"preset": one_of(*family.presets)})
        known = {f.name for f in dataclasses.fields(family.config_cls)}
        for key in self.model:
            if key not in known:
                raise FieldError(f"model.{key}", f"is not a model config field (family {family.name}); valid: "
                                                 f"{', '.join(sorted(known))}")


def build_tokenizer(spec: str) -> Tokenizer:
    return char_tokenizer() if spec == "char" else load_tokenizer(spec)


def init_model(cfg: InitConfig, tokenizer: Tokenizer):
    """A random model of ``cfg.family`` whose vocabulary and special ids match ``tokenizer``."""
    family = get_family(cfg.family)
    model_cfg = family.config_cls.for_init(
        family.presets[cfg.preset], vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, block_size=cfg.block_size,
        torch_dtype=cfg.param_dtype, **cfg.model)
    model = build_model(model_cfg)
    model.init_weights(cfg.seed)
    return model.to(DTYPES[cfg.param_dtype])


def init_checkpoint(cfg: InitConfig, out: str | Path) -> Path:
    tokenizer = build_tokenizer(cfg.tokenizer)
    model = init_model(cfg, tokenizer)
    return save_pretrained(model, tokenizer, out, max_shard_bytes=cfg.max_shard_mb << 20)
