"""The LLaDA family (GSAI-ML/LLaDA-8B-Instruct): full bidirectional attention, unshifted logits."""

from dirl.model.families import Family
from dirl.model.llada.config import PRESETS, LLaDAConfig
from dirl.model.llada.modeling import LLaDAModelLM

FAMILY = Family(name="llada", model_types=("llada",), architectures=("LLaDAModelLM",), config_cls=LLaDAConfig,
                model_cls=LLaDAModelLM, presets=PRESETS,
                # A block's down projection is named ff_out like the LM head, and PEFT matches suffixes:
                # naming it would put an adapter on the head too, so it is left out.
                lora_targets=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj"))

__all__ = ["FAMILY", "LLaDAConfig", "LLaDAModelLM"]
