"""Trainer callbacks: user code that runs at the end of every step and after every save.

As in transformers' ``TrainerCallback``, subclass and override what you need; every hook
defaults to doing nothing. The trainers call them on rank 0 only (the rank that logs and
writes), after the step's metrics are complete (reduced over the ranks).

>>> class PrintReward(TrainerCallback):
...     def on_step_end(self, step, metrics):
...         print(step, round(metrics["loss"], 1))
>>> CallbackList([PrintReward()]).on_step_end(3, {"loss": 0.25})
3 0.2
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["CallbackList", "TrainerCallback"]


class TrainerCallback:
    """Hooks a trainer calls; override any of them."""

    def on_step_end(self, step: int, metrics: dict) -> None:
        """After optimizer step ``step`` (1-based) with that step's metrics (SFT: the step's own
        loss / learning_rate / grad_norm ...; RL: everything logged for the step)."""

    def on_save(self, step: int, checkpoint_dir: Path) -> None:
        """After a checkpoint of step ``step`` is complete on disk at ``checkpoint_dir``."""


class CallbackList(TrainerCallback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Iterable[TrainerCallback] = ()):
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, TrainerCallback):
                raise TypeError(f"callbacks must subclass dirl.TrainerCallback, got {type(callback).__name__}")

    def on_step_end(self, step: int, metrics: dict) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step, metrics)

    def on_save(self, step: int, checkpoint_dir: Path) -> None:
        for callback in self.callbacks:
            callback.on_save(step, checkpoint_dir)
