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

__all__ = ["CallbackList", "HFCallback", "TrainerCallback"]


class TrainerCallback:
    """Hooks a trainer calls; override any of them."""

    def on_step_end(self, step: int, metrics: dict) -> None:
        """After optimizer step ``step`` (1-based) with that step's metrics (SFT: the step's own
        loss / learning_rate / grad_norm ...; RL: everything logged for the step)."""

    def on_save(self, step: int, checkpoint_dir: Path) -> None:
        """After a checkpoint of step ``step`` is complete on disk at ``checkpoint_dir``."""


def _is_hf_callback(callback) -> bool:
    return any(cls.__name__ == "TrainerCallback" and cls.__module__.startswith("transformers")
               for cls in type(callback).__mro__)


class HFCallback(TrainerCallback):
    """A transformers ``TrainerCallback`` under dirl: ``on_step_end`` and ``on_log`` (with the
    step's metrics as ``logs``) after every optimizer step, ``on_save`` after every checkpoint.
    ``args`` is the dirl config; ``state`` a transformers ``TrainerState`` (``global_step``,
    ``max_steps``, ``log_history``); ``control``'s requests (``should_training_stop`` ...) are
    not acted on."""

    def __init__(self, callback, args=None):
        from transformers import TrainerControl, TrainerState

        self.callback, self.args = callback, args
        self.state = TrainerState(max_steps=getattr(args, "max_steps", 0))
        self.control = TrainerControl()

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.state.global_step = step
        logs = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.state.log_history.append({**logs, "step": step})
        self.callback.on_step_end(self.args, self.state, self.control)
        self.callback.on_log(self.args, self.state, self.control, logs=logs)

    def on_save(self, step: int, checkpoint_dir: Path) -> None:
        self.callback.on_save(self.args, self.state, self.control)


class CallbackList(TrainerCallback):
    """Several callbacks called in order (a transformers ``TrainerCallback`` through :class:`HFCallback`)."""

    def __init__(self, callbacks: Iterable[TrainerCallback] = (), args=None):
        self.callbacks = [HFCallback(c, args) if _is_hf_callback(c) else c for c in callbacks]
        for callback in self.callbacks:
            if not isinstance(callback, TrainerCallback):
                raise TypeError(f"callbacks must subclass dirl.TrainerCallback or transformers.TrainerCallback, "
                                f"got {type(callback).__name__}")

    def on_step_end(self, step: int, metrics: dict) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step, metrics)

    def on_save(self, step: int, checkpoint_dir: Path) -> None:
        for callback in self.callbacks:
            callback.on_save(step, checkpoint_dir)
