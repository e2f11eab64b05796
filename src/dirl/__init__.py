"""dirl: post-training for blockwise diffusion language models.

The Python API (names are imported on first use, so ``import dirl`` and the CLI stay fast):

* trainers: ``SFTTrainer``, ``DiPOTrainer`` (RL with any estimator), ``TrainerCallback``;
* configs: ``SFTConfig``, ``SFTDataConfig``, ``RLConfig``, ``RolloutConfig``, ``AlgoConfig``,
  ``OptimConfig``, ``DistConfig``, and ``load_config`` (YAML + ``key=value`` overrides);
* models and decoding: ``load_model`` (-> model, tokenizer), ``Engine``, ``SamplingSpec``,
  ``SamplingParams``, ``generate``, ``evaluate`` (held-out accuracy with any reward);
* rewards: ``compute_rewards``, ``register_reward``, ``available_rewards``, ``RewardError``.

Importing ``dirl`` registers every model family with transformers' ``AutoConfig`` and
``AutoModelForCausalLM`` (:mod:`dirl.model.hf`), so ``AutoModelForCausalLM.from_pretrained(dir)``
loads a dirl checkpoint without remote code.
"""

from __future__ import annotations

import importlib

from dirl.model.hf_hook import install_import_hook

__version__ = "0.1.0"

_EXPORTS = {
    "SFTTrainer": ("dirl.train.trainers", "SFTTrainer"),
    "DiPOTrainer": ("dirl.train.trainers", "DiPOTrainer"),
    "TrainerCallback": ("dirl.train.callbacks", "TrainerCallback"),
    "SFTConfig": ("dirl.train.sft.config", "SFTConfig"),
    "SFTDataConfig": ("dirl.train.sft.config", "SFTDataConfig"),
    "RLConfig": ("dirl.train.rl.config", "RLConfig"),
    "RolloutConfig": ("dirl.train.rl.config", "RolloutConfig"),
    "AlgoConfig": ("dirl.train.rl.config", "AlgoConfig"),
    "OptimConfig": ("dirl.train.optim", "OptimConfig"),
    "DistConfig": ("dirl.train.dist", "DistConfig"),
    "load_config": ("dirl.config", "load"),
    "load_model": ("dirl.model.loading", "load_model_spec"),
    "Engine": ("dirl.engine.engine", "Engine"),
    "SamplingParams": ("dirl.rollout", "SamplingParams"),
    "SamplingSpec": ("dirl.rollout", "SamplingSpec"),
    "RewardError": ("dirl.rewards", "RewardError"),
    "generate": ("dirl.decode", "generate"),
    "evaluate": ("dirl.eval.heldout", "evaluate"),
    "compute_rewards": ("dirl.rewards", "compute_rewards"),
    "register_reward": ("dirl.rewards", "register"),
    "available_rewards": ("dirl.rewards", "available_rewards"),
}

__all__ = sorted(_EXPORTS)

install_import_hook()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dirl' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
