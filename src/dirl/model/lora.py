"""LoRA adapters on a dirl model of any family, through ``peft`` (``pip install dirl[lora]``).

LoRA (Hu et al. 2021): each target linear map ``W`` becomes ``W + (alpha / r) B A``
with ``A`` (r, d_in), ``B`` (d_out, r), ``B = 0`` at the start; only A and B
train. The layers are injected into *our* model (its family's module tree)
(``peft.inject_adapter_in_model``), so its forward -- with the KV cache as an
argument -- is unchanged, the engine decodes with the adapters applied and the
trainer scores the same function. ``adapters_disabled`` gives the base model
back without a copy: DiPO's frozen reference is the policy with its adapters off.
The target modules are the family's (``Family.lora_targets``, native names); a short name
is a target without its ``_proj`` suffix (``q`` = ``q_proj``).

Checkpoints hold the adapters in PEFT's format (``adapter_config.json`` with
``task_type: CAUSAL_LM`` and the base in ``base_model_name_or_path`` -- a path
relative to the adapter directory, so a run directory moved with its base still
resolves, or the ``init:`` spec --, ``adapter_model.safetensors`` with
PeftModel's ``base_model.model.`` key prefix), so ``PeftModel.from_pretrained``
reads them onto the base (``AutoModelForCausalLM.from_pretrained(base)`` after
``import dirl``); :func:`merge_adapters` folds them into the base weights
(``dirl merge``; :func:`resolve_base` finds the base).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's parameter names
# A routed expert's modules (``...mlp.experts.7.gate_proj``): the MoE convention of LLaDA2, Qwen-MoE, DeepSeek.
ROUTED_EXPERT = re.compile(r".*\.experts\.\d+\..*")


def short_name(target: str) -> str:
    """``q_proj`` -> ``q``: the short spelling of a target in ``lora.target_modules``."""
    return target.removesuffix("_proj")


def known_targets() -> dict[str, str]:
    """Every registered family's targets, by short and full name -> full name (config checks)."""
    from dirl.model.families import all_families

    names = {t: t for f in all_families() for t in f.lora_targets}
    return {**{short_name(t): t for t in names}, **names}


def family_targets(model: nn.Module, requested: list[str]) -> list[str]:
    """``requested`` (short or full names; empty = all) as the model family's target names."""
    from dirl.model.families import get_family

    family = get_family(model.arch.family)
    by_name = {**{short_name(t): t for t in family.lora_targets}, **{t: t for t in family.lora_targets}}
    unknown = [m for m in requested if m not in by_name]
    if unknown:
        raise ValueError(f"lora.target_modules: {unknown} are not LoRA targets of the {family.name} family; "
                         f"choose from {[short_name(t) for t in family.lora_targets]}")
    return sorted({by_name[m] for m in requested} if requested else set(family.lora_targets))


@dataclass
class LoraConfig:
    """``lora.*`` of ``dirl sft`` / ``dirl rl``. ``r = 0``: no adapters (full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # short or full names; empty = all the family's
    # Mixture-of-experts models: adapters on the routed experts' projections too. Off by default:
    # an adapter per expert multiplies the adapter size by the expert count (LLaDA2-mini at r 16:
    # ~0.6B adapter weights in the routed experts vs ~6M elsewhere), and each token trains only its
    # top-k experts' adapters. The shared expert and dense MLPs are targeted either way.
    experts: bool = False

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, got {self.r}")
        if isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        known = known_targets()
        unknown = [m for m in self.target_modules if m not in known]
        if unknown:
            raise ValueError(f"lora.target_modules: unknown {unknown}; choose from "
                             f"{sorted(set(map(short_name, known.values())))} (or their *_proj names)")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def _peft():
    try:
        import peft
    except ImportError as err:  # an optional extra
        raise ImportError("LoRA needs peft: pip install 'dirl[lora]' (or pip install peft)") from err
    return peft


def apply_lora(model: nn.Module, cfg: LoraConfig, base: str) -> nn.Module:
    """Inject LoRA layers into ``model`` in place (the base frozen); ``base`` names the base
    checkpoint (a directory or an ``init:`` spec) for the adapter directory."""
    peft = _peft()
    from dirl.model.families import get_family

    patterns = [get_family(model.arch.family).lora_exclude]
    if not cfg.experts and any(ROUTED_EXPERT.fullmatch(n) for n, _ in model.named_modules()):
        patterns.append(ROUTED_EXPERT.pattern)
    patterns = [p for p in patterns if p]
    exclude = {"exclude_modules": "|".join(f"(?:{p})" for p in patterns)} if patterns else {}
    peft_config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                  target_modules=family_targets(model, cfg.target_modules),
                                  base_model_name_or_path=base, task_type="CAUSAL_LM", **exclude)
    return inject(model, peft_config)


def inject(model: nn.Module, peft_config) -> nn.Module:
    """``peft.inject_adapter_in_model`` with everything but the adapters frozen."""
    model = _peft().inject_adapter_in_model(peft_config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def has_adapters(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block ``model`` computes its base function (the adapters are bypassed)."""
    layers = [m for _, m in _tuner_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class BaseModelView(nn.Module):
    """The base of a LoRA model as a callable model (``config``, ``forward``): forwards run
    with the adapters off. It holds no parameters of its own -- the reference policy of RL
    at the cost of nothing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "lora_model", model)  # not a submodule: no parameters here
        self.config = model.config

    @property
    def arch(self):
        return self.lora_model.arch

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self.lora_model):
            return self.lora_model(*args, **kwargs)

    @property
    def lm_head(self) -> nn.Module:
        """The base LM head, for the chunked head after a ``readout.hidden`` forward (lm_head.py)."""
        return self.lora_model.lm_head

    @property
    def head_chunk_size(self) -> int:
        return self.lora_model.head_chunk_size


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's file names (``base_model.model.<module>.lora_A.weight``)."""
    state = _peft().get_peft_model_state_dict(model, save_embedding_layers=False)
    return {PEFT_PREFIX + name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def save_adapter(model: nn.Module, directory: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``; the base
    path is written relative to ``directory`` (module docstring)."""
    peft_config = copy.copy(model.peft_config["default"])
    peft_config.task_type = "CAUSAL_LM"
    base = peft_config.base_model_name_or_path
    if base and Path(base).is_absolute():
        peft_config.base_model_name_or_path = os.path.relpath(base, Path(directory).absolute())
    peft_config.save_pretrained(str(directory))
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def resolve_base(adapter_dir: str | Path, base: str) -> str:
    """The base checkpoint an adapter config names: a path relative to the adapter directory
    (as :func:`save_adapter` writes it), else as given (an absolute path, a path relative to
    the working directory, an ``init:`` spec)."""
    beside = Path(adapter_dir) / base
    return str(beside.resolve()) if not Path(base).is_absolute() and (beside / "config.json").exists() else base


def read_adapter_config(directory: str | Path):
    """The ``peft.LoraConfig`` of an adapter directory (a ValueError naming the file if unusable)."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        json.loads(path.read_text())
        return _peft().LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a LoRA adapter config ({err})") from err


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy the adapters of ``directory`` into ``model``; every adapter tensor must match."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.exists():
        raise ValueError(f"{path}: not found")
    with safe_open(str(path), framework="pt") as f:
        state = {name.removeprefix(PEFT_PREFIX): f.get_tensor(name) for name in f.keys()}
    expected = _peft().get_peft_model_state_dict(model, save_embedding_layers=False)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{path}: adapters do not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    _peft().set_peft_model_state_dict(model, state)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's ``merge``) and drop the LoRA layers:
    the plain model, whose parameter names are the checkpoint's again."""
    for name, layer in _tuner_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    del model.peft_config
    return model


def num_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
