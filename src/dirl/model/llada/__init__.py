"""The LLaDA family (GSAI-ML/LLaDA-8B-Instruct): full bidirectional attention, unshifted logits."""

from dirl.model.families import Family
from dirl.model.llada.config import PRESETS, LLaDAConfig
from dirl.model.llada.modeling import LLaDAModelLM

FAMILY = Family(name="llada", model_types=("llada",), architectures=("LLaDAModelLM",), config_cls=LLaDAConfig,
                model_cls=LLaDAModelLM, presets=PRESETS,
                lora_targets=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"),
                # A block's down projection and the LM head are both named ff_out, and PEFT matches
                # suffixes: the head is excluded by name, so only the blocks' ff_out are adapted.
                lora_exclude=r"(.*\.)?transformer\.ff_out")

__all__ = ["FAMILY", "LLaDAConfig", "LLaDAModelLM"]
