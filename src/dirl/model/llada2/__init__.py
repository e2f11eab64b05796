"""The ``llada2`` family: LLaDA2.0 / 2.1 (Ling-2.0 MoE backbone, blocks of 32). See :mod:`.model`."""

from __future__ import annotations

from dirl.model.families import Family
from dirl.model.llada2.config import ARCHITECTURE, MODEL_TYPE, PRESETS, LLaDA2Config
from dirl.model.llada2.model import LLaDA2MoeModelLM

FAMILY = Family(
    name="llada2",
    model_types=(MODEL_TYPE,),
    architectures=(ARCHITECTURE,),
    config_cls=LLaDA2Config,
    model_cls=LLaDA2MoeModelLM,
    presets=PRESETS,
    lora_targets=("query_key_value", "dense", "gate_proj", "up_proj", "down_proj"),
)
