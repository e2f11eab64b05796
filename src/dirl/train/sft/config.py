"""``dirl sft``'s configuration: the shared :class:`~dirl.train.config.TrainerConfig` plus the
data, batching and masking settings of the blockwise NELBO (DESIGN §6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dirl.algo.nelbo import NOISE_EPS
from dirl.data import task_of
from dirl.errors import NON_NEGATIVE, POSITIVE, FieldError, check_fields, one_of
from dirl.rewards.registry import parse_reward_spec
from dirl.rollout import SamplingSpec
from dirl.train import hf_names
from dirl.train.config import HeldOutConfig, TrainerConfig, trainer_defaults
from dirl.train.hf_names import accept_hf_names

ASSISTANT_TURNS = ("last", "all")
OBJECTIVES = ("nelbo", "autoregressive")


@dataclass
class SFTDataConfig:
    source: str = "task:arithmetic"   # jsonl / json / parquet / saved dataset dir / task:<name>[:split]
    split: str | None = None
    prompt_template: str = "plain"    # a dirl.data.PROMPT_TEMPLATES name or a literal "{question}" string
    limit: int | None = None          # use the first N rows (tasks: generate N)
    max_length: int = 256             # tokens per example (and per packed row); longer rows are an error
    assistant_turns: str = "last"     # multi-turn rows: train the last assistant turn, or "all" of them

    def __post_init__(self) -> None:
        check_fields(self, {"assistant_turns": one_of(*ASSISTANT_TURNS), "max_length": POSITIVE,
                            "limit": NON_NEGATIVE})


@accept_hf_names(hf_names.SFT, hf_names.SFT_REFUSED)
@dataclass
@trainer_defaults(out="runs/sft", eval=HeldOutConfig(limit=32))
class SFTConfig(TrainerConfig):
    moved_keys: ClassVar[dict[str, str]] = {**TrainerConfig.moved_keys, "eval_num": "eval.limit"}

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    batch_size: int = 16              # examples per micro-batch, over all ranks (packed: rows of max_length)
    # How the held-out eval decodes (RL's decodes as its rollouts do, greedily)
    eval_sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(max_new_tokens=64, temperature=0.0))
    # and how it scores: a reward spec ("gsm8k", "math:1,format:0.1"); "" = the task's (eval.data's,
    # else the training data's), else math -- a JSONL file of task rows names no task, so say it here
    eval_reward: str = ""
    # nelbo: the masked-diffusion NELBO; autoregressive: next-token CE under causal attention, the
    # AR stage of Dream's recipe before the NELBO (shifted-logit families only; dirl.algo.autoregressive)
    objective: str = "nelbo"
    complementary_masks: bool = False
    pack: bool = False
    noise_eps: float = NOISE_EPS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, {"batch_size": POSITIVE, "log_every": POSITIVE, "objective": one_of(*OBJECTIVES),
                            "noise_eps": (lambda v: 0 <= v < 1, "in [0, 1)")})
        if self.objective == "autoregressive" and self.pack:
            raise FieldError("pack", "must be false with objective=autoregressive (one causal sample a row)")
        if self.eval_reward:
            try:
                parse_reward_spec(self.eval_reward)
            except ValueError as exc:
                raise FieldError("eval_reward", str(exc)) from None


def held_out_source(cfg: SFTConfig) -> str:
    """Where the held-out eval's problems come from: ``eval.data``, else the task's test split
    (a non-task training source and no ``eval.data``: "" -- no held-out eval)."""
    task = task_of(cfg.data.source)
    return cfg.eval.data or (f"task:{task.name}:test" if task else "")
