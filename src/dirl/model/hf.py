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
already imported, else when they are -- so ``import dirl`` stays as fast as before. transformers has no entry-point
group for third-party model types, so there is no entry point to declare. A ``model_type`` that
transformers itself ships keeps transformers' class (never overridden).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from dirl.model.families import FAMILIES, get_family
from dirl.model.masks import TokenMeta

_HF_RUNTIME_KEYS = ("_commit_hash", "name_or_path")  # passed by transformers' loader, not config.json fields


def clean_meta(arch, position_ids: torch.Tensor, valid: torch.Tensor) -> TokenMeta:
    """The metadata of a clean forward over (B, T) tokens: block-causal for block-diffusion
    families, one bidirectional copy of the whole sequence for full-attention ones."""
    if arch.attention == "block_causal":
        return TokenMeta.clean(position_ids, arch.block_size, valid)
    return TokenMeta.noisy_copy(position_ids, arch.block_size, torch.zeros_like(position_ids), valid)


def hf_classes(family_name: str) -> tuple[type, type]:
    """``(config_class, model_class)`` of a family (built once)."""
    return hf_config_class(family_name), hf_model_class(family_name)


@functools.cache
def hf_config_class(family_name: str) -> type:
    """The family's ``PretrainedConfig`` subclass (needs only transformers' configuration module)."""
    from transformers import PretrainedConfig

    family = get_family(family_name)
    base = _config_base(PretrainedConfig)
    # transformers >= 5 turns a config subclass without its own __init__ into a plain dataclass.
    return type(f"{_stem(family)}HFConfig", (base,), {"model_type": family.model_types[0], "dirl_family": family.name,
                                                     "__init__": base.__init__, "__module__": __name__})


@functools.cache
def hf_model_class(family_name: str) -> type:
    """The family's ``PreTrainedModel`` subclass."""
    from transformers import PreTrainedModel

    family = get_family(family_name)
    return type(f"{_stem(family)}HFForCausalLM", (_model_base(PreTrainedModel),),
                {"config_class": hf_config_class(family_name), "dirl_family": family.name, "__module__": __name__})


def _stem(family) -> str:
    return family.model_cls.__name__.removesuffix("ForCausalLM")


@functools.cache
def _config_base(pretrained_config: type) -> type:
    class DirlHFConfig(pretrained_config):
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

    return DirlHFConfig


@functools.cache
def _model_base(pretrained_model: type) -> type:
    from transformers.modeling_outputs import CausalLMOutput

    class DirlHFForCausalLM(pretrained_model):
        """A family's model as a ``PreTrainedModel`` (module docstring); ``dirl_model`` is the
        family's own module, sharing every parameter."""

        dirl_family = ""
        base_model_prefix = ""
        main_input_name = "input_ids"
        _supports_sdpa = True
        _supports_flex_attn = True

        def __init__(self, config):
            super().__init__(config)
            native = get_family(self.dirl_family).model_cls(config.to_dirl())
            # One tree: the HF model's tables ARE the native model's (see the module docstring).
            self._modules, self._parameters, self._buffers = native._modules, native._parameters, native._buffers
            self._non_persistent_buffers_set = native._non_persistent_buffers_set
            object.__setattr__(self, "_dirl_model", native)  # not a submodule: no prefix
            self._tied_weights_keys = _tied_names(native)
            self.post_init()

        @property
        def dirl_model(self) -> torch.nn.Module:
            """The family's model (dirl's forward contract, :mod:`dirl.model.forward`)."""
            return self._dirl_model

        @property
        def arch(self):
            return self._dirl_model.arch

        def get_input_embeddings(self) -> torch.nn.Module:
            return next(m for m in self.modules() if isinstance(m, torch.nn.Embedding))

        def get_output_embeddings(self) -> torch.nn.Module:
            return self._dirl_model.lm_head

        def _init_weights(self, module: torch.nn.Module) -> None:
            """Random init of ``from_config``: normal(0, 0.02) matrices, unit norms, zero biases."""
            with torch.no_grad():
                for name, param in module.named_parameters(recurse=False):
                    if getattr(param, "_is_hf_initialized", False):
                        continue
                    if name == "bias":
                        param.zero_()
                    elif param.ndim == 1:
                        param.fill_(1.0)
                    else:
                        param.normal_(0.0, 0.02)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    return_dict: bool | None = None, **kwargs: Any):
            """Logits (B, T, V) of a clean forward over ``input_ids`` (B, T); ``attention_mask``
            (B, T) marks real tokens (left or right padding); positions count real tokens."""
            if labels is not None:
                raise ValueError("labels: a diffusion LM has no next-token loss to return; train it with "
                                 "dirl sft / dirl rl (or dirl.SFTTrainer)")
            unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_FORWARD_KWARGS)
            if unknown:
                raise ValueError(f"forward: {unknown} are not supported by dirl's {self.dirl_family} model")
            valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask.to(device=input_ids.device, dtype=torch.bool))
            if position_ids is None:
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            meta = clean_meta(self.arch, position_ids, valid)
            logits = self._dirl_model(input_ids, position_ids, meta).logits  # (B, T, V)
            return CausalLMOutput(logits=logits) if return_dict is not False else (logits,)

        @classmethod
        def can_generate(cls) -> bool:
            """False for transformers' GenerationMixin machinery: :meth:`generate` is dirl's engine."""
            return False

        def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
            return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}

        @torch.no_grad()
        def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 64, do_sample: bool | None = None, seed: int = 0,
                     eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                     **sampling: Any) -> torch.Tensor:
            """Decode with dirl's KV-cached engine: (B, P) prompts -> (B, P + N) sequences, each
            row its prompt (as given, padding kept) then its completion right-padded with
            ``pad_token_id``. ``sampling``: :class:`dirl.rollout.SamplingSpec` fields
            (``temperature``, ``top_k``, ``top_p``, ``unmasking``, ``threshold``,
            ``steps_per_block``); ``do_sample=False`` is greedy. Stops at ``eos_token_id``
            (default: the config's)."""
            from dirl.engine.engine import Engine
            from dirl.rollout import SamplingSpec

            if do_sample is False:
                sampling["temperature"] = 0.0
            arch = self.arch
            stop = eos_token_id if eos_token_id is not None else arch.eos_token_id
            stop_ids = list(stop) if isinstance(stop, (list, tuple)) else [stop]
            pad = arch.pad_token_id if pad_token_id is None else pad_token_id
            params = SamplingSpec(max_new_tokens=max_new_tokens, **sampling).params(stop_ids, seed=seed)
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            prompts = [row[keep].tolist() for row, keep in zip(input_ids, valid)]
            rollouts = Engine(self._dirl_model.eval()).generate(prompts, params)
            width = max(len(r.completion_ids) for r in rollouts)
            out = torch.full((len(prompts), input_ids.shape[1] + width), pad, dtype=input_ids.dtype)
            out[:, : input_ids.shape[1]] = input_ids.cpu()
            for row, rollout in enumerate(rollouts):
                out[row, input_ids.shape[1]: input_ids.shape[1] + len(rollout.completion_ids)] = torch.tensor(
                    rollout.completion_ids, dtype=input_ids.dtype)
            return out.to(input_ids.device)

        def save_pretrained(self, save_directory: str | Path, *, max_shard_size: int | str = "2GB",
                            push_to_hub: bool = False, tokenizer=None, **kwargs: Any) -> None:
            """dirl's faithful checkpoint (:func:`dirl.model.checkpoint.write_checkpoint`) into
            ``save_directory`` (created if absent; other files there are left alone).
            ``tokenizer``: a :class:`dirl.model.tokenizer.Tokenizer` to save beside it."""
            from dirl.model.checkpoint import write_checkpoint

            directory = Path(save_directory)
            directory.mkdir(parents=True, exist_ok=True)
            write_checkpoint(self._dirl_model, tokenizer, directory, max_shard_bytes=_shard_bytes(max_shard_size))
            if push_to_hub:
                self.push_to_hub(kwargs.get("repo_id") or directory.name, **kwargs)

    return DirlHFForCausalLM


# HF generation / Trainer keywords that change nothing for a clean forward without a cache.
_IGNORED_FORWARD_KWARGS = ("use_cache", "output_attentions", "output_hidden_states", "past_key_values",
                           "cache_position", "token_type_ids", "num_items_in_batch")


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """``{tied name: source name}`` of parameters that are one tensor under two names."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _shard_bytes(size: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` / an int -> bytes (transformers' ``max_shard_size`` spellings)."""
    if isinstance(size, int):
        return size
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


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
