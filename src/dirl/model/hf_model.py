"""The ``PreTrainedModel`` class of every dirl model family (:mod:`dirl.model.hf` says what it is)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from dirl.model.families import get_family
from dirl.model.hf import hf_config_class, stem
from dirl.model.masks import TokenMeta


def clean_meta(arch, position_ids: torch.Tensor, valid: torch.Tensor) -> TokenMeta:
    """The metadata of a clean forward over (B, T) tokens: block-causal for block-diffusion
    families, one bidirectional copy of the whole sequence for full-attention ones."""
    if arch.attention == "block_causal":
        return TokenMeta.clean(position_ids, arch.block_size, valid)
    return TokenMeta.noisy_copy(position_ids, arch.block_size, torch.zeros_like(position_ids), valid)


class DirlHFForCausalLM(PreTrainedModel):
    """A family's model as a ``PreTrainedModel`` (:mod:`dirl.model.hf`); ``dirl_model`` is the
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


@functools.cache
def model_class(family_name: str) -> type:
    """The family's subclass of :class:`DirlHFForCausalLM` (what ``AutoModelForCausalLM`` builds)."""
    family = get_family(family_name)
    return type(f"{stem(family)}HFForCausalLM", (DirlHFForCausalLM,),
                {"config_class": hf_config_class(family_name), "dirl_family": family.name, "__module__": __name__})


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
