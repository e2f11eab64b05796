"""Hugging Face classes of every dirl model family: ``AutoModelForCausalLM`` loads a dirl checkpoint.

For each registered family (:mod:`dirl.model.families`) this module builds, on first use,

* a ``PretrainedConfig`` subclass whose ``model_type`` is the family's -- it keeps the
  ``config.json`` dict as read, from which the family's own config record is parsed
  (:meth:`DirlHFConfig.to_dirl`), so nothing is renamed or defaulted differently;
* a ``PreTrainedModel`` subclass whose module tree IS the family's native tree: it builds the
  family's model and adopts its child-module, parameter and buffer tables (the same dict
  objects), so the state-dict names are the checkpoint's (no prefix) and a module replaced on
  one side (PEFT's LoRA layers, a meta-device load) is the other's too.

The HF model adds what the ecosystem expects: ``forward(input_ids, attention_mask)`` returning
the logits of a clean forward (block-causal for SDAR-style families, bidirectional for
full-attention ones; row ``i`` holds what the family's logits at row ``i`` mean:
``arch.logit_shift``), ``generate`` running dirl's KV-cached engine, ``save_pretrained``
writing dirl's faithful checkpoint (:mod:`dirl.model.checkpoint`: config fields as read,
remote code and ``auto_map`` kept as the source had them), and ``from_pretrained`` /
``push_to_hub`` / PEFT's ``CAUSAL_LM`` task type from ``PreTrainedModel``.

Registration with ``AutoConfig`` / ``AutoModelForCausalLM`` happens when ``dirl`` is imported
(:func:`dirl.model.hf_hook.install_import_hook`): at once if transformers' auto classes are
already imported, else when they are -- so ``import dirl`` stays as fast as before.
transformers has no entry-point group for third-party model types, so there is no entry
point to declare. A ``model_type`` that transformers itself ships keeps transformers' class.
The model class lives in :mod:`dirl.model.hf_model` (it imports transformers' modeling code,
which registering a config does not need).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from dirl.model.families import FAMILIES, get_family

_HF_RUNTIME_KEYS = ("_commit_hash", "name_or_path")  # passed by transformers' loader, not config.json fields


class DirlHFConfig(PretrainedConfig):
    """A family's ``config.json`` for transformers; :meth:`to_dirl` is the family's own record."""

    model_type = ""
    dirl_family = ""

    def __init__(self, **kwargs: Any):
        self._dirl_raw = {k: v for k, v in kwargs.items() if k not in _HF_RUNTIME_KEYS}
        super().__init__(**kwargs)
        # transformers' default (True in 4.x) must not tie what the family does not.
        self.tie_word_embeddings = self.to_dirl().tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_dirl_raw", None)
        return out

    def to_dirl(self):
        """The family's config record parsed from the ``config.json`` dict as read."""
        family = get_family(self.dirl_family)
        cfg = family.config_cls.from_hf_dict({**self._dirl_raw, "model_type": family.model_types[0]})
        source = Path(str(getattr(self, "_name_or_path", "") or ""))
        if (source / "config.json").exists():  # keep the source's remote code, generation config
            from dirl.model.checkpoint import companion_files

            cfg.companion_files = companion_files(source, self._dirl_raw)
        return cfg


def hf_classes(family_name: str) -> tuple[type, type]:
    """``(config_class, model_class)`` of a family (built once)."""
    return hf_config_class(family_name), hf_model_class(family_name)


@functools.cache
def hf_config_class(family_name: str) -> type:
    """The family's ``PretrainedConfig`` subclass (``model_type`` = the family's first)."""
    family = get_family(family_name)
    # transformers >= 5 turns a config subclass without its own __init__ into a plain dataclass.
    return type(f"{stem(family)}HFConfig", (DirlHFConfig,), {"model_type": family.model_types[0],
                                                           "dirl_family": family.name,
                                                           "__init__": DirlHFConfig.__init__, "__module__": __name__})


def hf_model_class(family_name: str) -> type:
    """The family's ``PreTrainedModel`` subclass (:mod:`dirl.model.hf_model`)."""
    from dirl.model.hf_model import model_class

    return model_class(family_name)


def stem(family) -> str:
    """The class-name stem of a family's HF classes (``SDAR`` -> ``SDARHFConfig``)."""
    return family.model_cls.__name__.removesuffix("ForCausalLM")


def from_dirl(model: torch.nn.Module):
    """The HF model of a dirl model (sharing its parameters): ``AutoModelForCausalLM``'s class
    around a model ``dirl.load_model`` or a trainer returned."""
    config_cls, model_cls = hf_classes(model.arch.family)
    raw = model.config.to_hf_dict()
    with torch.device("meta"):
        hf = model_cls(config_cls(**raw))
    hf._modules, hf._parameters, hf._buffers = model._modules, model._parameters, model._buffers
    object.__setattr__(hf, "_dirl_model", model)
    return hf


def register(family_names=None, models: bool = True) -> None:
    """Register each family's classes with ``AutoConfig`` (and ``AutoModelForCausalLM`` when
    ``models``); idempotent. A ``model_type`` that transformers ships is left to transformers."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for name in family_names or FAMILIES:
        config_cls = hf_config_class(name)
        if config_cls.model_type in CONFIG_MAPPING_NAMES:
            continue  # transformers' own class wins
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        if models:
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.register(config_cls, hf_model_class(name), exist_ok=True)
