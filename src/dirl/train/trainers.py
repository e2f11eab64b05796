"""The Python API's trainers: ``SFTTrainer`` and ``DiPOTrainer``, in TRL's shape.

A trainer takes a model (a checkpoint path, ``init:<preset>`` or a model object with its
tokenizer), a dataset (a path / ``task:<name>``, a list of dicts or a ``datasets.Dataset``),
for RL reward functions (names or callables, TRL's signature), a config (``args``) and
callbacks. ``train()`` runs the very code ``dirl sft`` / ``dirl rl`` run -- the CLI builds the
same trainer from its YAML -- so a config gives the same metrics from either.

Objects given in memory are not part of a config file: the run's ``config.yaml`` then names
them ``<in-memory>`` (resume such a run from Python, giving the objects again).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dirl.data import load_prompt_rows, task_of
from dirl.eval.heldout import evaluate
from dirl.train.callbacks import CallbackList, TrainerCallback
from dirl.train.models import RunInputs
from dirl.train.plots import read_metrics
from dirl.train.rl.config import RLConfig, task_defaults
from dirl.train.rl.loop import train_rl
from dirl.train.sft.config import SFTConfig
from dirl.train.sft.loop import train_sft
from dirl.train.state import save_model_dir

__all__ = ["IN_MEMORY", "DiPOTrainer", "SFTTrainer"]

IN_MEMORY = "<in-memory>"
ModelArg = str | Path | torch.nn.Module | None
DatasetArg = str | Path | Sequence[Mapping[str, Any]] | Any


def _model_inputs(model: ModelArg, tokenizer: Any) -> tuple[str | None, torch.nn.Module | None]:
    """(config value, object): a path goes into the config, an object travels beside it."""
    if model is None:
        return None, None
    if isinstance(model, (str, Path)):
        return str(model), None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a path, init:<preset> or a dirl model, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=... (dirl.load_model returns both)")
    return IN_MEMORY, model


def _dataset_inputs(dataset: DatasetArg) -> tuple[str | None, list[dict] | None]:
    """(config value, rows): a path / task source goes into the config, rows travel beside it."""
    if dataset is None:
        return None, None
    if isinstance(dataset, (str, Path)):
        return str(dataset), None
    if hasattr(dataset, "to_list") and hasattr(dataset, "column_names"):  # datasets.Dataset
        return IN_MEMORY, dataset.to_list()
    return IN_MEMORY, [dict(row) for row in dataset]


def _tokenizer_arg(tokenizer: Any, processing_class: Any) -> Any:
    """TRL's ``processing_class`` is dirl's ``tokenizer`` (the same object)."""
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise ValueError("give the tokenizer once: tokenizer= or processing_class= (TRL's name), not both")
    return tokenizer if tokenizer is not None else processing_class


@dataclass
class RunState:
    """``trainer.state`` (transformers' ``TrainerState`` fields that dirl has): the last optimizer
    step, the planned steps, and every logged record of ``metrics.jsonl``."""

    global_step: int = 0
    max_steps: int = 0
    log_history: list[dict] = field(default_factory=list)


class _Trainer:
    """What both trainers share: the in-memory inputs and access to them."""

    inputs: RunInputs
    args: Any
    run_dir: Path | None

    @property
    def model(self) -> torch.nn.Module | None:
        """The model being trained (set once ``train`` has loaded it)."""
        return self.inputs.model

    @property
    def tokenizer(self) -> Any:
        return self.inputs.tokenizer

    def add_callback(self, callback: TrainerCallback) -> None:
        self.inputs.callbacks = CallbackList([*self.inputs.callbacks.callbacks, callback], self.args)

    @property
    def state(self) -> RunState:
        """The run so far, read from its ``metrics.jsonl`` (empty before ``train``)."""
        history = read_metrics(self.run_dir) if self.run_dir else []
        return RunState(max((r["step"] for r in history), default=0), self.args.max_steps, history)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the trained model and its tokenizer as a checkpoint directory (default:
        ``<out>/final``, where ``train`` already put it); returns the directory."""
        if self.model is None:
            raise ValueError("nothing to save yet: call train() first")
        return save_model_dir(self.model, self.tokenizer, Path(output_dir or Path(self.args.out) / "final"))

    def evaluate(self, eval_dataset: DatasetArg = None, reward: Any = None, **kwargs) -> dict:
        """Held-out accuracy of the trained model (:func:`dirl.evaluate`, greedy): ``eval_dataset``
        rows (default: the task's test split of the training data), ``reward`` (default: the
        run's, else ``math``). Keys are prefixed ``eval_`` as in transformers."""
        if self.model is None:
            raise ValueError("nothing to evaluate yet: call train() first (or dirl.evaluate(model, rows))")
        rows = self._eval_rows(eval_dataset)
        summary = evaluate(self.model, rows, self._eval_reward() if reward is None else reward,
                           tokenizer=self.tokenizer, **kwargs)
        return {f"eval_{k}": v for k, v in summary.items()}

    def _eval_rows(self, eval_dataset: DatasetArg) -> list[dict]:
        source, rows = _dataset_inputs(eval_dataset)
        if rows is not None:
            return rows
        if source is None:
            task = task_of(self._data_source())
            if task is None:
                raise ValueError("evaluate() needs eval_dataset= (the training data is not a task:<name>)")
            source = f"task:{task.name}:test"
        return load_prompt_rows(source, limit=64, seed=self.args.seed)


class SFTTrainer(_Trainer):
    """Supervised fine-tuning with the blockwise NELBO (``dirl sft``).

    >>> import tempfile
    >>> from dirl import SFTConfig, SFTTrainer
    >>> rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    >>> args = SFTConfig(out=tempfile.mkdtemp(), max_steps=2, batch_size=4, progress=False,
    ...                  report_to=["jsonl"])
    >>> trainer = SFTTrainer("init:tiny", train_dataset=rows, args=args)
    >>> run_dir = trainer.train()  # doctest: +ELLIPSIS
    step 2/2 loss=...
    >>> (run_dir / "final" / "model.safetensors").exists()
    True
    """

    def __init__(self, model: ModelArg = None, *, tokenizer: Any = None, train_dataset: DatasetArg = None,
                 args: SFTConfig | None = None, callbacks: Iterable[TrainerCallback] = (),
                 processing_class: Any = None):
        self.args = copy.deepcopy(args) if args is not None else SFTConfig()
        tokenizer = _tokenizer_arg(tokenizer, processing_class)
        model_value, model_obj = _model_inputs(model, tokenizer)
        data_value, rows = _dataset_inputs(train_dataset)
        if model_value is not None:
            self.args.model = model_value
        if data_value is not None:
            self.args.data.source = data_value
        self.inputs = RunInputs(model=model_obj, tokenizer=tokenizer, train_rows=rows,
                                callbacks=CallbackList(callbacks, self.args))
        self.run_dir: Path | None = None

    def _data_source(self) -> str:
        return self.args.data.source

    def _eval_reward(self) -> Any:
        task = task_of(self.args.data.source)
        return task.reward if task else "math"

    def train(self, resume_from_checkpoint: str | Path | None = None) -> Path:
        """Train for ``args.max_steps`` (or continue a run); returns the run directory."""
        self.run_dir = train_sft(self.args, resume=resume_from_checkpoint, inputs=self.inputs)
        return self.run_dir


def as_reward_specs(reward_funcs: Any) -> dict[Any, float] | None:
    """TRL's ``reward_funcs`` (one or a list of names / callables, weight 1 each) as
    ``{reward: weight}``; a mapping is taken as is (how to weight them: TRL keeps its
    ``reward_weights`` in the config, dirl's config keeps ``rewards: {name: weight}``)."""
    if reward_funcs is None:
        return None
    if isinstance(reward_funcs, Mapping):
        return {func: float(weight) for func, weight in reward_funcs.items()}
    funcs = [reward_funcs] if isinstance(reward_funcs, str) or callable(reward_funcs) else list(reward_funcs)
    return dict.fromkeys(funcs, 1.0)


RewardArg = str | Callable | Sequence[str | Callable] | Mapping[str | Callable, float] | None


class DiPOTrainer(_Trainer):
    """RL with DiPO (or any estimator: ``args.algo.estimator``), as ``dirl rl`` runs it.

    ``reward_funcs``: one or a list of reward names / callables (TRL's signature: ``prompts``,
    ``completions``, ``completion_ids``, dataset columns by name, ``**kwargs``), weight 1 each,
    or a ``{reward: weight}`` mapping; None: ``args.rewards``
    (else the task's reward). Names go into the config; callables travel beside it. The held-out
    eval (``args.eval_every``) scores with the config's named rewards.

    >>> import tempfile
    >>> from dirl import DiPOTrainer, RLConfig, RolloutConfig
    >>> def reward_len(completions, **kwargs):  # TRL's quick-start reward
    ...     return [-abs(20 - len(completion)) for completion in completions]
    >>> args = RLConfig(out=tempfile.mkdtemp(), max_steps=1, report_to=["jsonl"],
    ...                 rollout=RolloutConfig(num_prompts=2, group_size=2))
    >>> args.rollout.sampling.max_new_tokens = 8
    >>> trainer = DiPOTrainer("init:tiny", reward_funcs=reward_len, args=args)
    >>> run_dir = trainer.train(progress=False)  # doctest: +ELLIPSIS
    step 1: reward=...
    >>> (run_dir / "final" / "model.safetensors").exists()
    True
    """

    def __init__(self, model: ModelArg = None, reward_funcs: RewardArg = None, *, tokenizer: Any = None,
                 train_dataset: DatasetArg = None, args: RLConfig | None = None,
                 callbacks: Iterable[TrainerCallback] = (), processing_class: Any = None):
        self.args = copy.deepcopy(args) if args is not None else RLConfig()
        tokenizer = _tokenizer_arg(tokenizer, processing_class)
        model_value, model_obj = _model_inputs(model, tokenizer)
        data_value, rows = _dataset_inputs(train_dataset)
        if model_value is not None:
            self.args.model = model_value
        if data_value is not None:
            self.args.data = data_value
        specs = as_reward_specs(reward_funcs)
        if specs is not None and all(isinstance(name, str) for name in specs):
            self.args.rewards, specs = dict(specs), None  # names only: a config like the CLI's
        self.inputs = RunInputs(model=model_obj, tokenizer=tokenizer, train_rows=rows, reward_funcs=specs,
                                callbacks=CallbackList(callbacks, self.args))
        self.run_dir: Path | None = None

    def _data_source(self) -> str:
        return self.args.data

    def _eval_reward(self) -> Any:
        return self.inputs.reward_funcs or task_defaults(self.args)[1]

    def train(self, resume_from_checkpoint: str | Path | None = None, progress: bool | None = None) -> Path:
        """Run ``args.max_steps`` RL steps (or continue a run); returns the run directory.
        ``progress`` None: ``args.progress``."""
        self.run_dir = train_rl(self.args, resume=resume_from_checkpoint, progress=progress, inputs=self.inputs)
        return self.run_dir
