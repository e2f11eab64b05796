"""The model-family registry: ``config.json`` -> the family that reads, builds and saves it.

A lazy table in the shape of the rollout backends' ``BACKENDS``: a family's module is
imported only when a checkpoint or an ``init`` asks for it. Each family package
``dirl.model.<name>`` exposes ``FAMILY = Family(...)`` and owns its config schema (read and
written faithfully), its module tree with native weight names, its presets and its LoRA
target names; the rest of dirl reads the normalised :class:`~dirl.model.arch.Arch`.
Adding a family = a folder + one line in :data:`FAMILIES` (verl's model registry is the model).

A family's ``config_cls`` provides ``from_hf_dict(dict)``, ``to_hf_dict()``, ``.arch``,
``extra`` / ``loaded`` / ``companion_files`` (faithful save), ``num_parameters()``, and
``for_init(preset, vocab_size=, mask_token_id=, eos_token_id=, pad_token_id=, block_size=,
torch_dtype=, **native_overrides)`` -- the config of a random model for a tokenizer
(``dirl init``) -- and the Hugging Face fields ``torch_dtype`` and ``tie_word_embeddings``
(what checkpoint saving reads). Its ``model_cls(config)`` follows :mod:`dirl.model.forward`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from dirl.errors import FieldError

FAMILIES: dict[str, str] = {
    "sdar": "dirl.model.sdar",
    "llada": "dirl.model.llada",
    "dream": "dirl.model.dream",
    "llada2": "dirl.model.llada2",
}
DEFAULT_FAMILY = "sdar"


@dataclass(frozen=True)
class Family:
    name: str                         # "sdar"
    model_types: tuple[str, ...]      # config.json "model_type" values it reads, e.g. ("sdar",)
    architectures: tuple[str, ...]    # config.json "architectures" values it reads (the fallback)
    config_cls: type                  # see the module docstring
    model_cls: type                   # nn.Module, __init__(config)
    presets: dict[str, dict[str, Any]]  # "tiny" at least, plus the real shape (e.g. "sdar-8b")
    lora_targets: tuple[str, ...]     # module-name suffixes for PEFT (native names)
    lora_exclude: str = ""           # a regex of module names a target suffix must not reach (e.g. a head named
    #                                   like a layer's projection); "" = none


def get_family(name: str) -> Family:
    """The family registered as ``name`` (its module imported on first use)."""
    if name not in FAMILIES:
        raise FieldError("family", f"{name!r} is not a model family; choose from {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def all_families() -> list[Family]:
    """Every registered family (imports them all: for listings and name checks)."""
    return [get_family(name) for name in FAMILIES]


def family_for_config(data: dict) -> Family:
    """The family of a ``config.json`` dict: by ``model_type``, then by ``architectures``."""
    model_type = data.get("model_type")
    families = all_families()
    for family in families:
        if model_type in family.model_types:
            return family
    architectures = data.get("architectures") or []
    for family in families:
        if any(a in family.architectures for a in architectures):
            return family
    known = sorted(t for f in families for t in f.model_types)
    raise FieldError("model_type", f"{model_type!r} (architectures {architectures}) is not a model family dirl "
                                   f"reads; known model types: {known}")
