"""The Dream family (Dream-org/Dream-v0-Instruct-7B): bidirectional Qwen2, logits shifted by one."""

from dirl.model.dream.config import PRESETS, DreamConfig
from dirl.model.dream.modeling import DreamModel
from dirl.model.families import Family

FAMILY = Family(name="dream", model_types=("Dream", "dream"), architectures=("DreamModel",), config_cls=DreamConfig,
                model_cls=DreamModel, presets=PRESETS,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))

__all__ = ["FAMILY", "DreamConfig", "DreamModel"]
