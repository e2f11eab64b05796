"""SDAR (Cheng et al. 2025): a Qwen3 decoder trained with block-causal diffusion; also TraDo and DiRL.

The family's config schema, module tree and presets live here; its parity reference is
transformers' Qwen3 (``tests/test_model.py``), and the tokenizer's special ids
(``<|MASK|>`` 151669, ``<|endoftext|>``) come from the checkpoint's tokenizer files.
"""

from dirl.model.families import Family
from dirl.model.sdar.config import PRESETS, SDARConfig
from dirl.model.sdar.modeling import SDARForCausalLM

# The Qwen3 decoder's attention and MLP projections (PEFT target suffixes).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILY = Family(name="sdar", model_types=("sdar",), architectures=("SDARForCausalLM",), config_cls=SDARConfig,
                model_cls=SDARForCausalLM, presets=PRESETS, lora_targets=LORA_TARGETS)
