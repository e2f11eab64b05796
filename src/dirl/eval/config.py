"""``dirl eval``'s configuration: what to evaluate (checkpoint, data source) on top of an :class:`EvalSpec`.

The evaluation itself is :func:`dirl.eval.heldout.evaluate_rows`, the one eval path (the
trainers and the demo call it too). This module adds what only a stand-alone eval needs: the
checkpoint and data source, the task-derived defaults (:func:`resolve_defaults`) and the rows
(:func:`load_eval_rows`). ``dirl eval`` (:mod:`dirl.commands.eval`) loads the checkpoint and the
rows, evaluates them with the resolved config, and writes ``samples.jsonl`` + ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from dirl.data import DataError, load_prompt_rows, parse_task_source, task_of
from dirl.eval.heldout import DEFAULT_REWARD, DEFAULT_TEMPLATE, EvalSpec
from dirl.rewards import parse_reward_spec

__all__ = ["EvalConfig", "load_eval_rows", "resolve_defaults"]


@dataclass
class EvalConfig(EvalSpec):
    """What to evaluate and how to decode. Empty strings mean "derive a default" (see below)."""

    model: str = ""                # checkpoint directory (``dirl eval`` only)
    data: str = ""                 # .jsonl/.json/.parquet, saved dataset dir, or task:<name>[:<split>]
    split: str | None = None       # split of a saved DatasetDict / {split: rows} file
    data_seed: int = 0             # generator seed of task:<name> sources (fixed eval set)
    limit: int | None = None       # first N rows only
    out: str = ""                  # run directory; "": runs/eval-<timestamp>
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    param_dtype: str = "auto"      # weights: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


# The prompt template a file source gets by default, per primary reward: HumanEval's question is
# the code to continue (plain); a stdin -> stdout problem gets the code_io instruction.
REWARD_TEMPLATES = {"code": "plain", "code_io": "code_io", "code_io_fraction": "code_io"}


def resolve_defaults(cfg: EvalConfig) -> EvalConfig:
    """Fill ``reward`` and ``prompt_template`` from the task (task sources), the primary reward
    (``REWARD_TEMPLATES``) or the math defaults.

    Also validates the reward names, so a typo fails before any decoding.
    """
    task = task_of(cfg.data)
    reward = cfg.reward or (task.reward if task else DEFAULT_REWARD)
    primary = reward.split(",")[0].partition(":")[0].strip()
    fallback = REWARD_TEMPLATES.get(primary, DEFAULT_TEMPLATE)
    template = cfg.prompt_template or (task.prompt_template if task else fallback)
    resolved = replace(cfg, reward=reward, prompt_template=template)
    parse_reward_spec(resolved.reward)
    return resolved


def default_out_dir() -> str:
    return f"runs/eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_eval_rows(cfg: EvalConfig) -> list[dict]:
    """Rows with ``question`` and ``answer`` from ``cfg.data`` (``DataError`` on a bad source).

    A ``task:<name>`` source without a split means its *test* split (this is evaluation).
    """
    if not cfg.data:
        raise DataError("no data source: set data=... (a .jsonl file or task:<name>:test)")
    split = cfg.split
    parsed = parse_task_source(cfg.data)
    if parsed is not None and parsed[1] is None and split is None:
        split = "test"
    rows = load_prompt_rows(cfg.data, split=split, limit=cfg.limit, seed=cfg.data_seed)
    if not rows:
        raise DataError(f"{cfg.data}: no rows to evaluate (limit={cfg.limit})")
    return rows
