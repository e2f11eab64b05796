"""The settings every trainer shares, declared once: :class:`TrainerConfig`.

``SFTConfig`` (:mod:`dirl.train.sft.config`) and ``RLConfig`` (:mod:`dirl.train.rl.config`)
extend it with their own sections. Where a trainer wants another *default* for a shared
setting (RL runs 20 steps, SFT 300), it says so with :func:`trainer_defaults`, which keeps the
base's declaration (type, position, validation) and changes the default value only -- a
shared setting is never declared twice, so the two trainers cannot drift apart again.

Validation happens at construction (that is, at config load), in the style of
:func:`dirl.errors.check_fields`: one line naming the key.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, field
from typing import ClassVar

from dirl.errors import NON_NEGATIVE, POSITIVE, SEED, check_fields, one_of
from dirl.model.lora import LoraConfig
from dirl.train.dist import DistConfig
from dirl.train.moe import MoEConfig
from dirl.train.optim import OptimConfig
from dirl.train.precision import ComputeConfig
from dirl.train.tracking import REPORTERS, check_report_to

ATTN_IMPLS = ("auto", "sdpa", "flex")


@dataclass
class HeldOutConfig:
    """The held-out eval during training: greedy accuracy through the one eval path
    (:func:`dirl.eval.heldout.evaluate_rows`), logged as ``eval/accuracy`` and ``eval/mean_reward``."""

    every: int = 0                    # steps between evals (the last step too); 0 = off
    data: str = ""                    # .jsonl / .parquet / dataset dir / task:<name>:<split>; "" = the task's test split
    limit: int = 64                   # problems evaluated (the first N)

    def __post_init__(self) -> None:
        check_fields(self, {"every": NON_NEGATIVE, "limit": POSITIVE})


@dataclass
class TrainerConfig:
    """What a training run is, whichever objective trains it."""

    # Keys that a release renamed (old dotted name -> new): old recipes and saved runs still load.
    moved_keys: ClassVar[dict[str, str]] = {"eval_every": "eval.every", "eval_data": "eval.data",
                                            "eval_limit": "eval.limit"}

    model: str = "init:tiny"          # checkpoint dir, or init:[<family>/]<preset> (random weights, char tokenizer)
    block_size: int | None = None     # train / decode / save with this block size; null = the model's
    out: str = "runs/train"           # the run directory
    seed: int = 0
    device: str = "auto"              # auto (cuda when available) | cpu | cuda | cuda:N
    attn_impl: str = "auto"           # training forwards: auto (flex on CUDA, sdpa on CPU) | sdpa | flex
    compute: ComputeConfig = field(default_factory=ComputeConfig)  # precision, checkpointing, head chunks
    dist: DistConfig = field(default_factory=DistConfig)  # torchrun only
    lora: LoraConfig = field(default_factory=LoraConfig)  # r > 0: train adapters on a frozen base
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts models: router freezing, load metrics
    optim: OptimConfig = field(default_factory=OptimConfig)
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + wandb; "none" = jsonl only
    max_steps: int = 300
    stop_at_step: int = 0             # > 0: end this invocation after that step (resume later)
    log_every: int = 10               # steps per console / tracker line
    save_every: int = 100             # 0 = only at the end
    keep_last: int = 3                # checkpoints kept (older ones are deleted)
    eval: HeldOutConfig = field(default_factory=HeldOutConfig)  # held-out accuracy every eval.every steps
    progress: bool = True             # a progress bar (rank 0)
    overwrite: bool = False           # a fresh run may replace a run already in `out`

    def __post_init__(self) -> None:
        check_fields(self, {
            "block_size": POSITIVE, "max_steps": POSITIVE, "stop_at_step": NON_NEGATIVE,
            "log_every": NON_NEGATIVE, "save_every": NON_NEGATIVE, "keep_last": POSITIVE,
            "attn_impl": one_of(*ATTN_IMPLS), "seed": SEED})
        if isinstance(self.report_to, str):  # transformers' spelling: "none", "wandb", "all", "a,b"
            self.report_to = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if "all" in self.report_to:
            self.report_to = list(REPORTERS)
        self.report_to = [name for name in self.report_to if name != "none"]
        check_report_to(self.report_to)

    def last_step(self) -> int:
        """The step this invocation ends after (``stop_at_step`` ends it early, as a preemption
        would, without changing the schedule, which always spans ``max_steps``)."""
        return min(self.max_steps, self.stop_at_step) if self.stop_at_step > 0 else self.max_steps


def trainer_defaults(**defaults):
    """Class decorator (under ``@dataclass``): other default values for shared settings of
    :class:`TrainerConfig`, keeping the base's declaration. Values are deep-copied per instance."""
    hints = typing.get_type_hints(TrainerConfig)

    def apply(cls):
        annotations = cls.__dict__.get("__annotations__", {})
        for name, value in defaults.items():
            if name not in hints:
                raise TypeError(f"{name!r} is not a TrainerConfig setting")
            if name in annotations:
                raise TypeError(f"{cls.__name__} declares the shared setting {name!r} again")
            annotations[name] = hints[name]
            immutable = value is None or isinstance(value, (bool, int, float, str, tuple))
            setattr(cls, name, value if immutable else field(default_factory=lambda v=value: copy.deepcopy(v)))
        cls.__annotations__ = annotations
        return cls

    return apply

