"""TRL / transformers argument names on dirl's configs: ``SFTConfig(output_dir=...)``,
``RLConfig(num_generations=...)``.

Where the concept is the same, the HF name sets the dirl key (``output_dir`` -> ``out``,
``num_generations`` -> ``rollout.group_size``); where it is not (``num_train_epochs``: dirl
counts optimizer steps), the constructor raises a ``TypeError`` naming the dirl key to use.
YAML files and ``key=value`` overrides keep dirl's names only: one spelling per setting on disk.
"""

from __future__ import annotations

import functools

# transformers' TrainingArguments (and so TRL's configs) -> dirl, the same concept
COMMON = {"output_dir": "out", "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay",
          "warmup_steps": "optim.warmup_steps", "max_grad_norm": "optim.grad_clip",
          "gradient_accumulation_steps": "optim.grad_accum", "logging_steps": "log_every",
          "save_steps": "save_every", "save_total_limit": "keep_last", "eval_steps": "eval.every",
          "gradient_checkpointing": "compute.activation_checkpointing", "adam_epsilon": "optim.eps",
          "overwrite_output_dir": "overwrite"}
COMMON_REFUSED = {"num_train_epochs": "max_steps (dirl counts optimizer steps)",
                  "lr_scheduler_type": "optim.schedule ('cosine' | 'constant')",
                  "bf16": "compute.precision='bf16-mixed'", "fp16": "compute.precision (fp16 is not supported)",
                  "per_device_train_batch_size": "batch_size (SFT, over all ranks) or rollout.num_prompts (RL)",
                  "resume_from_checkpoint": "trainer.train(resume_from_checkpoint=...)"}
SFT = {"max_length": "data.max_length", "packing": "pack"}
SFT_REFUSED = {"dataset_text_field": "rows with question/answer, messages or prompt/completion columns"}
RL = {"num_generations": "rollout.group_size", "max_completion_length": "rollout.sampling.max_new_tokens",
      "temperature": "rollout.sampling.temperature", "top_p": "rollout.sampling.top_p",
      "top_k": "rollout.sampling.top_k", "beta": "algo.beta", "epsilon": "algo.clip_low",
      "epsilon_high": "algo.clip_high", "num_iterations": "algo.num_iterations"}
RL_REFUSED = {"loss_type": "algo.agg ('token_mean' | 'seq_mean_token_mean' | 'constant')",
              "scale_rewards": "algo.adv_mode ('zscore' | 'mean' | 'loo')",
              "max_prompt_length": "nothing: prompts are checked against the model's context",
              "reward_weights": "rewards={name: weight} (or reward_funcs={fn: weight})"}


def _set(cfg, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    target = cfg
    for name in parents:
        target = getattr(target, name)
    setattr(target, last, value)
    if hasattr(target, "__post_init__") and target is not cfg:
        target.__post_init__()  # the section's own checks


def accept_hf_names(aliases: dict, refused: dict):
    """Class decorator (above ``@dataclass``): the constructor also takes ``aliases`` (HF name ->
    dirl key) and refuses ``refused`` naming the dirl setting."""
    def apply(cls):
        init = cls.__init__
        table = {**COMMON, **aliases}
        refusals = {**COMMON_REFUSED, **refused}

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            moves = {}
            for name in [n for n in kwargs if n in table or n in refusals]:
                if name in refusals:
                    raise TypeError(f"{cls.__name__}({name}=...) has no identical dirl setting; use {refusals[name]}")
                moves[table[name]] = kwargs.pop(name)
            init(self, *args, **kwargs)
            for dotted, value in moves.items():
                _set(self, dotted, value)
            if moves:
                self.__post_init__()
        cls.__init__ = __init__
        cls.hf_names = dict(table)
        return cls
    return apply
