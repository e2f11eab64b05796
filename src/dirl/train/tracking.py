"""Experiment trackers: ``metrics.jsonl`` always, TensorBoard and Weights & Biases on request.

``report_to`` (a trainer config field, as in transformers' ``TrainingArguments.report_to``) lists
the trackers: ``jsonl`` (always written, whether listed or not), ``tensorboard``
(``run_dir/tensorboard``) and ``wandb`` (the optional extra ``pip install 'dirl[wandb]'``; a run
under ``run_dir/wandb``, project ``$WANDB_PROJECT`` or ``dirl``; ``WANDB_MODE=offline`` works with
no network). Every tracker gets the same records: ``{"step": N, **metrics}``.

The metric names follow TRL's where the concept is the same (``loss``, ``learning_rate``,
``grad_norm``, ``reward``, ``reward_std``, ``rewards/<fn>/mean`` and ``/std``,
``completions/mean_length`` / ``min_length`` / ``max_length`` / ``clipped_ratio``, ``kl``,
``entropy``, ``clip_ratio/*``, ``frac_reward_zero_std``); the README lists the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["REPORTERS", "MetricsLogger", "check_report_to"]

REPORTERS = ("jsonl", "tensorboard", "wandb")
WANDB_ID_FILE = "wandb-run-id"  # so that a resumed run appends to the same W&B run

logger = logging.getLogger(__name__)


def check_report_to(report_to: Sequence[str]) -> list[str]:
    """The trackers to use (``jsonl`` first, always); an unknown name is a ``ValueError``."""
    unknown = [name for name in report_to if name not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; use any of {list(REPORTERS)}")
    return ["jsonl"] + [name for name in REPORTERS[1:] if name in report_to]


class MetricsLogger:
    """Append-only ``metrics.jsonl`` (one JSON object per logged step) + the other trackers.

    On resume the file is appended to; entries at or beyond the resume step from a
    run killed after its last checkpoint are dropped first, so the file reads as one
    uninterrupted run. A fresh run in a directory that already holds a
    ``metrics.jsonl`` moves it to ``metrics.prev.jsonl`` (kept, not mixed in).
    ``config`` (a plain dict) is the run's configuration, given to W&B.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 report_to: Sequence[str] = ("jsonl", "tensorboard"), config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.trackers = check_report_to(report_to)
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if resume_step is None:
                self.path.replace(self.path.with_name("metrics.prev.jsonl"))
            else:
                self._truncate_after(resume_step)
        if "tensorboard" in self.trackers:
            self._tb = _tensorboard_writer(self.run_dir / "tensorboard")
        if "wandb" in self.trackers:
            self._wandb = _wandb_run(self.run_dir, config, resumed=resume_step is not None)

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step``; a torn row (a kill mid-write) and what follows it go."""
        kept = []
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                break
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            self._wandb = None
            # finish() can return before the W&B service has written the run file (seen in offline
            # mode: the file still empty right after it); teardown waits for the service to flush.
            # Only when no other run of the caller's is still open in this process.
            if wandb.run is None:
                wandb.teardown()


def _tensorboard_writer(log_dir: Path):
    """A TensorBoard ``SummaryWriter``, or None with a warning if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a main dependency; only a broken install lacks it
        logger.warning("report_to has tensorboard but the tensorboard package is not installed: no "
                       "TensorBoard logs (pip install tensorboard); metrics.jsonl is written as usual")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _wandb_run(run_dir: Path, config: Mapping[str, Any] | None, resumed: bool):
    """A W&B run in ``run_dir/wandb`` (resumed under the same id when the training run resumes)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("report_to has wandb but wandb is not installed: pip install 'dirl[wandb]'") from None
    import os

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else None
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dirl"), dir=str(run_dir), name=run_dir.name,
                     config=dict(config or {}), id=run_id, resume="allow" if run_id else None)
    id_file.write_text(run.id)
    return run


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def format_metrics(metrics: dict) -> str:
    """``key=value`` pairs for the one-line console log (floats to 4 significant digits)."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)

